"""
The records the scheduler keeps: workers, sessions and tasks.

Plain data with no behaviour; :mod:`core.scheduler` owns every transition.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from core.wire import Payload

__all__ = [
    "Broadcast",
    "ClientRef",
    "Disconnect",
    "Outgoing",
    "Send",
    "Session",
    "Task",
    "TaskSpec",
    "TaskState",
    "Worker",
]

# A client is one WebSocket connection: the routing id of the bridge that holds
# it, and the connection number the bridge gave it.
ClientRef = tuple[bytes, int]


class TaskState(enum.Enum):
    PENDING = "pending"
    ASSIGNED = "assigned"
    #: The master went away while a worker held the task; the worker's report
    #: is still accepted, so that the worker is freed, and then discarded.
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """
    One file of a ``SUBMIT_TASKS`` message, as the scheduler receives it.

    """

    filename: str
    mime_type: str
    size: int
    payload: Payload


@dataclass(slots=True)
class Task:
    id: str
    session_id: str
    spec: TaskSpec
    state: TaskState = TaskState.PENDING
    #: Attempts started so far; an attempt starts when the task is assigned.
    attempts: int = 0
    worker_id: str | None = None


@dataclass(slots=True)
class Worker:
    id: str
    client: ClientRef
    #: The last time the worker said anything: its lease and liveness.
    last_seen: float
    task_id: str | None = None
    completed: int = 0
    failed: int = 0
    total_bytes: int = 0


@dataclass(slots=True)
class Session:
    id: str
    master: ClientRef
    created_at: float
    #: Task ids waiting for a worker, oldest first; retries go to the front.
    pending: deque[str] = field(default_factory=deque)
    total: int = 0
    completed: int = 0
    failed: int = 0
    #: When the session last had a task assigned, in assignments made by the
    #: scheduler; 0 if never. Round-robin serves the smallest first.
    last_served: int = 0

    @property
    def ended(self) -> int:
        return self.completed + self.failed

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.ended == self.total

    def progress(self) -> dict[str, int]:
        return {"completed": self.completed, "failed": self.failed, "total": self.total}


@dataclass(frozen=True, slots=True)
class Send:
    """
    Output: deliver ``message`` to one client, with an optional payload that
    the bridge splices into ``task.dataBase64``.

    """

    client: ClientRef
    message: dict[str, Any]
    payload: Payload | None = None


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
