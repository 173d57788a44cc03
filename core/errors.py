"""
Errors raised by linkup's pure layers and turned into ``ERROR`` replies.

Each error carries a stable snake_case ``code``: the code is the contract with
clients, the message is for humans. The shells catch :class:`LinkupError` in
one place, log it at WARNING and answer ``{"type": "ERROR", "code": ...,
"message": ...}``; anything else is a bug, logged at ERROR and answered with
``internal_error`` only.

    LinkupError
    ├── ProtocolError        a message that is malformed or not understood
    │   ├── InvalidJson
    │   ├── UnknownType
    │   └── InvalidField
    ├── InvalidState         a well-formed request that is not allowed now
    │   ├── WrongRole
    │   ├── UnknownSession
    │   ├── SessionClosed
    │   ├── UnknownTask
    │   └── TaskNotHeld
    ├── Unavailable          linkup cannot serve the request right now
    │   └── StorageFailed    the core could not store the files
    └── InternalError        a bug in linkup; the log has the details
"""

from __future__ import annotations

__all__ = [
    "ERROR_CODES",
    "INTERNAL_ERROR",
    "InternalError",
    "InvalidField",
    "InvalidJson",
    "InvalidState",
    "LinkupError",
    "ProtocolError",
    "SessionClosed",
    "StorageFailed",
    "TaskNotHeld",
    "Unavailable",
    "UnknownSession",
    "UnknownTask",
    "UnknownType",
    "WrongRole",
]


class LinkupError(Exception):
    """
    Base class of every error a client can be told about.

    """

    code = "linkup_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ProtocolError(LinkupError):
    code = "protocol_error"


class InvalidJson(ProtocolError):
    code = "invalid_json"


class UnknownType(ProtocolError):
    code = "unknown_type"

    def __init__(self, message_type: str) -> None:
        super().__init__(f"unknown message type {message_type!r}")
        self.message_type = message_type


class InvalidField(ProtocolError):
    code = "invalid_field"


class InvalidState(LinkupError):
    code = "invalid_state"


class WrongRole(InvalidState):
    code = "wrong_role"


class UnknownSession(InvalidState):
    code = "unknown_session"

    def __init__(self, session_id: str, message: str | None = None) -> None:
        super().__init__(
            message or f"no session {session_id!r} belongs to this connection"
        )
        self.session_id = session_id


class SessionClosed(InvalidState):
    code = "session_closed"

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} has ended; create a new session")
        self.session_id = session_id


class UnknownTask(InvalidState):
    code = "unknown_task"

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"no pending or running task {task_id!r} belongs to this connection"
        )
        self.task_id = task_id


class TaskNotHeld(InvalidState):
    code = "task_not_held"

    def __init__(self, task_id: str, message: str | None = None) -> None:
        super().__init__(message or f"task {task_id!r} is not assigned to this worker")
        self.task_id = task_id


class Unavailable(LinkupError):
    code = "unavailable"


class StorageFailed(Unavailable):
    """
    The core could not write the submitted files to its data dir (disk full,
    for one); nothing of the request was accepted.

    """

    code = "storage_error"


class InternalError(LinkupError):
    """
    What a client is told when linkup itself is at fault; details stay in
    the log.

    """

    code = "internal_error"

    def __init__(self) -> None:
        super().__init__("internal error")


INTERNAL_ERROR = InternalError.code


def _codes(cls: type[LinkupError]) -> set[str]:
    codes = {cls.code}
    for subclass in cls.__subclasses__():
        codes |= _codes(subclass)
    return codes


#: Every code an ERROR message may carry.
ERROR_CODES = frozenset(_codes(LinkupError))
