"""
What the scheduler's state looks like from outside: counts for metrics, the
status page's view, and throughput over the last minutes.

Pure functions of the scheduler and of the time passed in, like the scheduler
itself; :mod:`core.server` decides when to call them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from core.model import Session, Worker
from core.scheduler import Scheduler

__all__ = ["Census", "ThroughputHistory", "census", "view"]

#: The status page lists at most this many workers and sessions; the rest are
#: counted, so that a page stays small however many come.
MAX_LISTED_WORKERS = 500
MAX_LISTED_SESSIONS = 50
#: Filenames come from clients and may be any length; a page shows this many
#: characters at most, so that a view stays small whatever the names.
MAX_SHOWN_FILENAME = 200


@dataclass(frozen=True, slots=True)
class Census:
    """
    How many workers, sessions and tasks are in each state.

    """

    workers: dict[str, int]
    sessions: dict[str, int]
    tasks: dict[str, int]


def worker_state(worker: Worker, now: float) -> str:
    if worker.task_id is not None:
        return "busy"
    if worker.not_before > now:
        return "resting"
    return "idle"


def session_state(session: Session) -> str:
    if session.closed:
        return session.state.value
    return "open" if session.attached else "paused"


def census(scheduler: Scheduler, now: float) -> Census:
    """
    Count the scheduler's workers, sessions and tasks by state.

    Workers a restarted core has not yet seen again are not counted.

    """
    workers = dict.fromkeys(("idle", "busy", "resting"), 0)
    for worker in scheduler.workers.values():
        if worker.claimed:
            workers[worker_state(worker, now)] += 1

    sessions = dict.fromkeys(("open", "paused", "ended"), 0)
    for session in scheduler.sessions.values():
        sessions["ended" if session.closed else session_state(session)] += 1

    pending = scheduler.pending_count
    tasks = {"pending": pending, "active": len(scheduler.tasks) - pending}
    return Census(workers, sessions, tasks)


def view(scheduler: Scheduler, now: float) -> dict[str, Any]:
    """
    The scheduler's part of the status page's view: queue, totals, workers
    and sessions (see docs/metrics.md).

    """
    claimed = [w for w in scheduler.workers.values() if w.claimed]
    workers = [_worker_view(scheduler, w, now) for w in claimed[:MAX_LISTED_WORKERS]]

    # Sessions still running first, then ended ones; newest first in each.
    newest_first = list(scheduler.sessions.values())[::-1]
    ordered = sorted(newest_first, key=_closed)
    sessions = [_session_view(s) for s in ordered[:MAX_LISTED_SESSIONS]]

    counters = scheduler.counters
    counted = census(scheduler, now)
    return {
        "queue": counted.tasks,
        "totals": {
            "submitted": counters.tasks_submitted,
            "completed": counters.tasks_completed,
            "failed": counters.tasks_failed,
            "cancelled": counters.tasks_cancelled,
            "retried": counters.tasks_retried,
        },
        "workers": workers,
        "workersOmitted": len(claimed) - len(workers),
        "workerStates": counted.workers,
        "sessions": sessions,
        "sessionsOmitted": len(ordered) - len(sessions),
        "sessionStates": counted.sessions,
    }


def _closed(session: Session) -> bool:
    return session.closed


def _worker_view(scheduler: Scheduler, worker: Worker, now: float) -> dict[str, Any]:
    task = scheduler.tasks.get(worker.task_id or "")
    held = task is not None and task.worker_id == worker.id
    return {
        "id": worker.id,
        "state": worker_state(worker, now),
        "completed": worker.completed,
        "failed": worker.failed,
        "totalBytes": worker.total_bytes,
        "file": _shortened(task.spec.filename) if held and task else None,
        "fileSize": task.spec.size if held and task else None,
    }


def _shortened(filename: str) -> str:
    if len(filename) <= MAX_SHOWN_FILENAME:
        return filename
    return filename[: MAX_SHOWN_FILENAME - 1] + "\u2026"


def _session_view(session: Session) -> dict[str, Any]:
    pending = len(session.pending)
    return {
        "id": session.id,
        "state": session_state(session),
        "total": session.total,
        "completed": session.completed,
        "failed": session.failed,
        "cancelled": session.cancelled,
        "pending": pending,
        "active": session.total - session.ended - pending,
    }


class ThroughputHistory:
    """
    Tasks and bytes completed per interval over the last ``length`` intervals.

    Fed running totals with :meth:`record`; an interval in which nothing was
    recorded counts as zero.

    """

    def __init__(self, interval: float = 5.0, length: int = 60) -> None:
        self.interval = interval
        self.length = length
        #: (interval number, tasks, bytes), oldest first.
        self._buckets: deque[tuple[int, int, int]] = deque(maxlen=length)
        self._last_totals: tuple[int, int] | None = None

    def record(self, now: float, completed: int, completed_bytes: int) -> None:
        """
        Note the running totals at ``now``; what grew since the last call
        counts in the interval that ``now`` falls in.

        """
        previous = self._last_totals or (completed, completed_bytes)
        self._last_totals = (completed, completed_bytes)
        # Totals restart from zero with the core; never count backwards.
        tasks = max(0, completed - previous[0])
        size = max(0, completed_bytes - previous[1])

        number = math.floor(now / self.interval)
        if self._buckets and self._buckets[-1][0] == number:
            _, old_tasks, old_size = self._buckets.pop()
            tasks, size = tasks + old_tasks, size + old_size
        self._buckets.append((number, tasks, size))

    def series(self, now: float) -> dict[str, Any]:
        """
        The last ``length`` intervals up to the one ``now`` falls in.

        """
        current = math.floor(now / self.interval)
        first = current - self.length + 1
        completed = [0] * self.length
        sizes = [0] * self.length
        for number, tasks, size in self._buckets:
            if first <= number <= current:
                completed[number - first] = tasks
                sizes[number - first] = size
        return {"interval": self.interval, "completed": completed, "bytes": sizes}
