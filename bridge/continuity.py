"""
What a bridge remembers about each connection so that the core can restart
under it without the plugins noticing.

The core stores its queue, but not what was on the wire when it stopped. The
bridge sees both directions, so it keeps, per connection, the few facts that
close the gap (:class:`Continuity`): whether the core gave the connection a
role, which task the core last handed it, its last report, and which request
still waits for an answer. When it joins a core, the bridge lists these as
claims; the core then keeps the workers and masters it has, sends again an
assignment that never arrived, and applies a report it never got.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["OPENING_REQUESTS", "REPORTS", "Continuity"]

#: A worker's reports on its task: kept until the next assignment, since the
#: core may not have received them.
REPORTS = frozenset({"TASK_COMPLETED", "TASK_FAILED"})

#: What a plugin asks first and waits for an answer to before anything else;
#: it ignores ERROR, so a connection whose opening request cannot be served
#: is closed instead, and the plugin reconnects and asks again.
OPENING_REQUESTS = frozenset({"WORKER_REGISTER", "CREATE_SESSION"})

# Messages from the core that give a connection a role the core remembers.
_ROLE_GIVEN = frozenset({"WORKER_REGISTERED", "SESSION_CREATED", "SESSION_RESUMED"})

# Requests whose loss in a core crash would leave the plugin waiting forever,
# and the answer that ends the wait.
_ANSWERS = {
    "WORKER_REGISTER": "WORKER_REGISTERED",
    "CREATE_SESSION": "SESSION_CREATED",
    "SUBMIT_TASKS": "TASKS_SUBMITTED",
    "RESUME_SESSION": "SESSION_RESUMED",
}


@dataclass(slots=True)
class Continuity:
    has_role: bool = False
    #: The task the core last handed this connection, until it reports it.
    holds: str | None = None
    #: The connection's last TASK_COMPLETED or TASK_FAILED, as sent.
    report: dict[str, Any] | None = None
    #: A request forwarded to the core and not yet answered.
    awaiting: str | None = None
    #: For each session, how many of its outcome messages the core delivered
    #: here: a restarted core sends the ones after these.
    results: dict[str, int] = field(default_factory=dict)
    #: Sessions the core made this connection the master of.
    sessions: list[str] = field(default_factory=list)

    @property
    def role(self) -> str:
        """
        ``worker``, ``master`` or ``none``, for metrics.

        """
        if not self.has_role:
            return "none"
        return "master" if self.sessions else "worker"

    def forwarded(self, message_type: str, header: dict[str, Any]) -> None:
        """
        Note a message that went to the core.

        """
        if message_type in REPORTS:
            self.keep_report(header)
        elif message_type in _ANSWERS:
            self.awaiting = message_type
        if message_type == "RESUME_SESSION":
            # The client has the first `after` outcomes already: a restarted
            # core must not send them again.
            session_id = header["sessionId"]
            count = max(self.results.get(session_id, 0), header.get("after", 0))
            self.results[session_id] = count

    def keep_report(self, header: dict[str, Any]) -> None:
        self.report = header
        if header.get("taskId") == self.holds:
            self.holds = None

    def delivered(
        self, message: dict[str, Any], result: list[Any] | None = None
    ) -> None:
        """
        Note a message from the core on its way to the connection; ``result``
        is the link's ``[session id, index]`` of a session outcome.

        """
        if result is not None:
            session_id, index = result
            self.results[session_id] = max(self.results.get(session_id, 0), index + 1)
        message_type = message.get("type")
        if message_type in _ROLE_GIVEN:
            self.has_role = True
        if message_type in ("SESSION_CREATED", "SESSION_RESUMED"):
            self.sessions.append(message["sessionId"])
        if message_type == "TASK_ASSIGNED":
            self.holds = message["task"]["id"]
            self.report = None
        if self.awaiting is not None and message_type in (
            _ANSWERS[self.awaiting],
            "ERROR",
        ):
            self.awaiting = None

    def claim(self, number: int) -> dict[str, Any]:
        """
        This connection as HELLO lists it.

        """
        return {
            "client": number,
            "holds": self.holds,
            "report": self.report,
            "results": dict(self.results),
            "sessions": list(self.sessions),
        }
