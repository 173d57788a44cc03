"""
The records the scheduler keeps: workers, sessions and tasks.

Plain data with no behaviour; :mod:`core.scheduler` owns every transition and
:mod:`core.store` writes these records to disk as they are.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Broadcast",
    "Changes",
    "ClientClaim",
    "ClientRef",
    "Disconnect",
    "Measure",
    "Outgoing",
    "Send",
    "Session",
    "SessionState",
    "Task",
    "TaskSpec",
    "TaskState",
    "Worker",
]

# A client is one WebSocket connection: the routing id of the bridge that holds
# it, and the connection number the bridge gave it.
ClientRef = tuple[bytes, int]


class TaskState(enum.Enum):
    #: Waiting in its session's queue for a worker.
    PENDING = "pending"
    #: Out with a worker: the current attempt.
    ASSIGNED = "assigned"


class SessionState(enum.Enum):
    OPEN = "open"
    #: Every task has its outcome; SESSION_COMPLETED was sent.
    COMPLETED = "completed"
    #: The master cancelled it; SESSION_CANCELLED was sent.
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """
    One file of a ``SUBMIT_TASKS`` message, as the scheduler receives it.

    The file itself is already in the spool, under ``payload_key``.

    """

    filename: str
    mime_type: str
    size: int
    payload_key: str
    payload_size: int


@dataclass(slots=True)
class Task:
    id: str
    session_id: str
    #: Position in its session, in submission order.
    seq: int
    spec: TaskSpec
    state: TaskState = TaskState.PENDING
    #: Attempts started so far; an attempt starts when the task is assigned.
    attempts: int = 0
    worker_id: str | None = None
    #: When the current attempt must have ended, or None for no limit.
    deadline: float | None = None
    last_error: str | None = None
    # When the task was submitted, last entered the queue, and was last
    # assigned, on the scheduler's clock; for metrics only. They are not
    # stored: after a restart of the core they are None, and what they would
    # measure is not measured.
    submitted_at: float | None = None
    queued_at: float | None = None
    assigned_at: float | None = None


class Measure(enum.Enum):
    """
    What a measurement taken by the scheduler is of; see
    :meth:`core.scheduler.Scheduler.take_measurements`.

    """

    #: Declared size of a submitted file, in bytes.
    TASK_SIZE = "task_size"
    #: Seconds from entering the queue (submission or retry) to assignment.
    QUEUE_WAIT = "queue_wait"
    #: Seconds from assignment to the worker's TASK_COMPLETED.
    UPLOAD = "upload"
    #: Seconds from submission to the task's final outcome.
    LATENCY = "latency"


@dataclass(slots=True)
class Worker:
    id: str
    client: ClientRef
    #: The last time the worker said anything: its liveness.
    last_seen: float
    #: The task the worker is busy with, from its own point of view.
    task_id: str | None = None
    #: Why ``task_id`` no longer counts, if it does not: "cancelled" (its
    #: report is discarded quietly) or "expired" (its report is refused).
    #: The worker stays busy until it reports, so it never gets two files.
    released: str | None = None
    #: Rate-limited by the upload site: no new task before this time.
    not_before: float = 0.0
    #: False for a worker restored from the store whose bridge has not yet
    #: said that the connection is still there.
    claimed: bool = True
    completed: int = 0
    failed: int = 0
    total_bytes: int = 0


@dataclass(slots=True)
class Session:
    id: str
    #: The master's connection, current or last known.
    master: ClientRef
    state: SessionState = SessionState.OPEN
    #: False while the master is away; its queue is then paused.
    attached: bool = True
    #: While detached: when the session is dropped unless resumed.
    detached_until: float | None = None
    #: Restored from the store, and its bridge has not said yet whether the
    #: master's connection is still there.
    restored: bool = False
    #: Once ended: when it is forgotten.
    expires_at: float | None = None
    #: Task ids waiting for a worker, in order; retries go to the front.
    pending: deque[str] = field(default_factory=deque)
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    #: Every outcome message sent to the master, in order, for RESUME_SESSION.
    results: list[dict[str, Any]] = field(default_factory=list)
    #: When the session last had a task assigned, in assignments made by the
    #: scheduler; 0 if never. Round-robin serves the smallest first.
    last_served: int = 0

    @property
    def ended(self) -> int:
        return self.completed + self.failed + self.cancelled

    @property
    def all_ended(self) -> bool:
        return self.total > 0 and self.ended == self.total

    @property
    def closed(self) -> bool:
        return self.state is not SessionState.OPEN

    def progress(self) -> dict[str, int]:
        # "cancelled" is an addition, there only once a task was cancelled,
        # which only linkup's own clients do: plugins see the object they know.
        progress = {"completed": self.completed, "failed": self.failed}
        if self.cancelled:
            progress["cancelled"] = self.cancelled
        progress["total"] = self.total
        return progress


@dataclass(frozen=True, slots=True)
class ClientClaim:
    """
    A bridge's word about one of its live connections, sent when it joins.

    Attributes:
        conn: The connection number.
        holds: The task the bridge last handed this connection and has not
            seen reported, if any.
        report: A TASK_COMPLETED or TASK_FAILED from this connection that may
            not have reached the core, if any.
        results: For each session whose outcomes the connection received,
            how many it received; the core sends it the rest.
        sessions: The sessions the connection was told it is the master of.
        gone: The connection closed while the core was away; only its report
            is news.

    """

    conn: int
    holds: str | None = None
    report: dict[str, Any] | None = None
    results: dict[str, int] = field(default_factory=dict)
    sessions: tuple[str, ...] = ()
    gone: bool = False


@dataclass(slots=True)
class Changes:
    """
    What to write to the store before any message goes out.

    Records are the live objects; ``None`` means delete.

    """

    sessions: dict[str, Session | None] = field(default_factory=dict)
    tasks: dict[str, Task | None] = field(default_factory=dict)
    #: (session id, index in ``Session.results``, message).
    outcomes: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    workers: dict[ClientRef, Worker | None] = field(default_factory=dict)
    #: Spooled files no longer needed once this is written.
    freed_payloads: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.sessions
            or self.tasks
            or self.outcomes
            or self.workers
            or self.freed_payloads
        )


@dataclass(frozen=True, slots=True)
class Send:
    """
    Output: deliver ``message`` to one client, with an optional spooled file
    that the bridge splices into ``task.dataBase64``.

    """

    client: ClientRef
    message: dict[str, Any]
    payload_key: str | None = None
    #: For a session's outcome message: (session id, its index in
    #: ``Session.results``), so that the bridge can count what it delivered.
    result: tuple[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Broadcast:
    """
    Output: deliver ``message`` to every client of every bridge.

    """

    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """
    Output: close a client's WebSocket; the scheduler has already forgotten it.

    """

    client: ClientRef
    reason: str


Outgoing = Send | Broadcast | Disconnect
