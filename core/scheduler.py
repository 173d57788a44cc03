"""
The scheduler: every piece of linkup's state and every rule, with no I/O.

It is a state machine in the sans-I/O style. The shell (:mod:`core.server`)
calls one method per input — a client message, a lost client, the passing of
time — passing the current time in, then drains :meth:`Scheduler.messages_to_send`
and sleeps until :meth:`Scheduler.next_deadline`. Methods that refuse a request
raise a :class:`~core.errors.LinkupError` before changing anything.

Policy, in short (``docs/architecture.md`` has the long form):

* One task at a time per worker; an idle worker gets work as soon as any is
  pending. Idle workers are served longest-idle first.
* Sessions with pending work are served round-robin, one task each in turn,
  so a master with one file never waits behind another master's five hundred.
* An attempt starts when a task is assigned. A failure report, or the loss of
  the worker that holds it, ends the attempt; the task goes back to the front
  of its session's queue until ``max_attempts`` attempts have been used, then
  the master gets ``TASK_FAILED``.
* A worker's lease on its task lives as long as the worker does: any message
  from it renews it; ``worker_timeout`` seconds of silence drop the worker.
* Only the worker holding a task may report on it, once.
* A master that goes away takes its sessions with it: pending tasks are
  dropped, workers holding its tasks are told ``TASK_CANCELLED`` and their
  reports are accepted and discarded.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from core.errors import (
    InvalidField,
    SessionClosed,
    TaskNotHeld,
    UnknownSession,
    WrongRole,
)
from core.model import (
    Broadcast,
    ClientRef,
    Disconnect,
    Outgoing,
    Send,
    Session,
    Task,
    TaskSpec,
    TaskState,
    Worker,
)

__all__ = ["Scheduler"]

logger = logging.getLogger("linkup.core.scheduler")

# The first server's numbers, which users know.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_WORKER_TIMEOUT = 30.0

# STATS_UPDATE pushes to every client are coalesced to at most one per this
# many seconds: a burst of N workers joining would otherwise send N pushes of
# N workers each to N clients.
STATS_PUSH_INTERVAL = 0.25


class Scheduler:
    """
    Workers, sessions, the task queue and its rules.

    Args:
        id_prefix: Put into every id this instance makes, so that ids stay
            unique across restarts of the core.
        max_attempts: Attempts per task before it is reported as failed.
        worker_timeout: Seconds of silence after which a worker is dropped.

    """

    def __init__(
        self,
        id_prefix: str = "",
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if worker_timeout <= 0:
            raise ValueError("worker_timeout must be positive")
        self.max_attempts = max_attempts
        self.worker_timeout = worker_timeout

        self._id_prefix = f"{id_prefix}-" if id_prefix else ""
        self._counter = itertools.count(1)

        self._workers: dict[str, Worker] = {}
        self._worker_by_client: dict[ClientRef, str] = {}
        #: Idle workers, longest idle first.
        self._idle: OrderedDict[str, None] = OrderedDict()

        self._sessions: dict[str, Session] = {}
        self._sessions_by_client: dict[ClientRef, list[str]] = {}
        #: Sessions with pending tasks, in the order they became ready.
        self._ready: dict[str, None] = {}
        #: Assignments made so far: the round-robin clock.
        self._assignments = 0

        # TODO: journal sessions and tasks so that a core restart loses
        # nothing; all of this state lives in memory only.
        self._tasks: dict[str, Task] = {}
        self._pending_count = 0

        self._outgoing: list[Outgoing] = []
        #: When the next STATS_UPDATE push is due, if workers came or went.
        self._stats_push_due: float | None = None
        self._last_stats_push = float("-inf")

    # Inputs from workers.

    def register_worker(self, client: ClientRef, now: float) -> str:
        """
        Make ``client`` a worker and answer ``WORKER_REGISTERED``.

        Registering twice is harmless: the worker keeps its id and its task.
        Drain :meth:`messages_to_send` afterwards.

        """
        self._refuse_if_master(client, "WORKER_REGISTER")

        worker_id = self._worker_by_client.get(client)
        if worker_id is None:
            worker_id = self._new_id("w")
            self._workers[worker_id] = Worker(worker_id, client, last_seen=now)
            self._worker_by_client[client] = worker_id
            self._idle[worker_id] = None
            logger.info("worker joined worker=%s", worker_id)
            joined = True
        else:
            self._workers[worker_id].last_seen = now
            joined = False

        self._send(
            client,
            {
                "type": "WORKER_REGISTERED",
                "workerId": worker_id,
                "serverStats": self.statistics(),
            },
        )
        if joined:
            self._stats_changed(now)
            self._dispatch(now)
        return worker_id

    def seen(self, client: ClientRef, now: float) -> None:
        """
        Note a sign of life from ``client``; call it for every message.

        Any message from a worker renews its lease, not only heartbeats.

        """
        worker_id = self._worker_by_client.get(client)
        if worker_id is not None:
            self._workers[worker_id].last_seen = now

    def heartbeat(self, client: ClientRef, now: float) -> None:
        """
        Renew a worker's lease. Nothing is sent.

        """
        self._worker_for(client, "WORKER_HEARTBEAT").last_seen = now

    def complete_task(
        self, client: ClientRef, task_id: str, result_url: str, now: float
    ) -> None:
        """
        A worker reports that it uploaded ``task_id``.

        Raises:
            TaskNotHeld: The sender does not hold this task.

        """
        worker, task = self._held_task(client, task_id, "TASK_COMPLETED")
        worker.completed += 1
        worker.total_bytes += task.spec.size
        self._release_worker(worker)

        if task.state is TaskState.CANCELLED:
            logger.info("result of cancelled task discarded task=%s", task_id)
            del self._tasks[task_id]
        else:
            logger.info(
                "task completed task=%s worker=%s attempt=%d",
                task_id,
                worker.id,
                task.attempts,
            )
            self._end_task(task, result_url=result_url)
        self._dispatch(now)

    def fail_task(
        self, client: ClientRef, task_id: str, error: str, now: float
    ) -> None:
        """
        A worker reports that its upload of ``task_id`` failed.

        The task is tried again while attempts remain, else the master is told.

        Raises:
            TaskNotHeld: The sender does not hold this task.

        """
        worker, task = self._held_task(client, task_id, "TASK_FAILED")
        worker.failed += 1
        self._release_worker(worker)
        self._end_attempt(task, error)
        self._dispatch(now)

    def report_waiting(
        self,
        client: ClientRef,
        task_id: str,
        wait_time: float,
        wait_start: float,
        now: float,
    ) -> None:
        """
        A worker was rate-limited while uploading ``task_id``; tell the master.

        Raises:
            TaskNotHeld: The sender does not hold this task.

        """
        worker, task = self._held_task(client, task_id, "TASK_WAITING")
        if task.state is TaskState.CANCELLED:
            return
        logger.info(
            "worker rate-limited task=%s worker=%s wait=%ss",
            task_id,
            worker.id,
            wait_time,
        )
        session = self._sessions[task.session_id]
        self._send(
            session.master,
            {
                "type": "TASK_WAITING",
                "taskId": task_id,
                "filename": task.spec.filename,
                "waitTime": wait_time,
                "waitStart": wait_start,
                "workerId": worker.id,
            },
        )

    # Inputs from masters.

    def create_session(self, client: ClientRef, now: float) -> str:
        """
        Open an upload session for ``client`` and answer ``SESSION_CREATED``.

        """
        self._refuse_if_worker(client, "CREATE_SESSION")

        session_id = self._new_id("s")
        self._sessions[session_id] = Session(session_id, client, created_at=now)
        self._sessions_by_client.setdefault(client, []).append(session_id)
        logger.info("session created session=%s", session_id)

        self._send(
            client,
            {
                "type": "SESSION_CREATED",
                "sessionId": session_id,
                "serverStats": self.statistics(),
            },
        )
        return session_id

    def submit_tasks(
        self,
        client: ClientRef,
        session_id: str,
        specs: Sequence[TaskSpec],
        now: float,
    ) -> list[str]:
        """
        Queue files in a session of ``client``; answer ``TASKS_SUBMITTED``.

        Raises:
            UnknownSession: ``client`` has no session ``session_id``.
            SessionClosed: The session has already completed.
            InvalidField: A size is negative.

        """
        session = self._sessions.get(session_id)
        if session is None or session.master != client:
            raise UnknownSession(session_id)
        if session.finished:
            raise SessionClosed(session_id)
        for index, spec in enumerate(specs):
            if spec.size < 0:
                raise InvalidField(f"tasks[{index}].size must not be negative")

        task_ids = []
        for spec in specs:
            task = Task(self._new_id("t"), session_id, spec)
            self._tasks[task.id] = task
            session.pending.append(task.id)
            task_ids.append(task.id)
        session.total += len(specs)
        self._pending_count += len(specs)
        if specs:
            self._ready[session_id] = None
        logger.info(
            "tasks submitted session=%s count=%d bytes=%d",
            session_id,
            len(specs),
            sum(spec.size for spec in specs),
        )

        submitted = {
            "type": "TASKS_SUBMITTED",
            "sessionId": session_id,
            "taskCount": len(specs),
            "totalPending": self._pending_count,
        }
        self._send(client, submitted)
        self._dispatch(now)
        # The reply goes out before the assignments but counts what is still
        # waiting after them.
        submitted["totalPending"] = self._pending_count
        return task_ids

    # Inputs from anyone, and from the shell.

    def request_stats(self, client: ClientRef) -> None:
        """
        Answer ``GET_STATS`` with a ``STATS_UPDATE``.

        """
        self._send(client, {"type": "STATS_UPDATE", "stats": self.statistics()})

    def client_gone(self, client: ClientRef, now: float) -> None:
        """
        Forget a client whose connection closed, whatever its role.

        A worker's task goes back to the queue, using up its attempt; a
        master's sessions end.

        """
        self._forget_client(client, "worker disconnected", now)
        self._dispatch(now)

    def bridge_gone(self, bridge: bytes, now: float) -> None:
        """
        Forget every client of a bridge that the core lost.

        Nothing is sent to those clients: the bridge may come back with new
        connections under the same numbers.

        """
        # Workers first, so that a task of a master on the same bridge is
        # requeued, then dropped with its session, in one fixed order.
        workers = sorted(c for c in self._worker_by_client if c[0] == bridge)
        masters = sorted(c for c in self._sessions_by_client if c[0] == bridge)
        first_new = len(self._outgoing)
        for client in workers + masters:
            self._forget_client(client, "worker's bridge lost", now)
        self._outgoing[first_new:] = [
            item
            for item in self._outgoing[first_new:]
            if isinstance(item, Broadcast) or item.client[0] != bridge
        ]
        self._dispatch(now)

    # TODO: a per-attempt time limit; a worker that keeps heartbeating but
    # never reports (a hung upload) holds its task for as long as it lives.
    def tick(self, now: float) -> None:
        """
        Do what time makes due: drop workers silent for ``worker_timeout``
        (closed with a :class:`Disconnect`), and push a ``STATS_UPDATE`` to
        every client if workers came or went (at most one per
        ``STATS_PUSH_INTERVAL``, with the statistics of this moment).

        Call it when :meth:`next_deadline` has passed; calling it earlier is
        harmless.

        """
        silent = [
            worker
            for worker in self._workers.values()
            if now - worker.last_seen >= self.worker_timeout
        ]
        for worker in silent:
            logger.warning(
                "worker silent for %.0fs, dropped worker=%s",
                now - worker.last_seen,
                worker.id,
            )
            reason = f"worker silent for {self.worker_timeout:g}s"
            self._forget_client(worker.client, reason, now)
            self._outgoing.append(Disconnect(worker.client, reason))
        if silent:
            self._dispatch(now)

        if self._stats_push_due is not None and now >= self._stats_push_due:
            self._stats_push_due = None
            self._last_stats_push = now
            self._outgoing.append(
                Broadcast({"type": "STATS_UPDATE", "stats": self.statistics()})
            )

    def next_deadline(self) -> float | None:
        """
        When :meth:`tick` next has work to do, or None if never.

        """
        deadlines = []
        if self._workers:
            oldest = min(worker.last_seen for worker in self._workers.values())
            deadlines.append(oldest + self.worker_timeout)
        if self._stats_push_due is not None:
            deadlines.append(self._stats_push_due)
        return min(deadlines, default=None)

    # Outputs.

    def messages_to_send(self) -> list[Outgoing]:
        """
        Return and clear the messages produced since the last call.

        The shell must deliver them in order.

        """
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def statistics(self) -> dict[str, Any]:
        """
        The plugin's ``serverStats``/``stats`` object, exact at this moment.

        """
        workers = [
            {
                "id": worker.id,
                "status": "busy" if worker.task_id else "idle",
                "stats": {
                    "completed": worker.completed,
                    "failed": worker.failed,
                    "totalBytes": worker.total_bytes,
                },
            }
            for worker in self._workers.values()
        ]
        return {
            "workerCount": len(self._workers),
            "idleWorkers": len(self._idle),
            "pendingTasks": self._pending_count,
            "activeTasks": len(self._workers) - len(self._idle),
            "activeSessions": sum(
                1 for session in self._sessions.values() if not session.finished
            ),
            "workers": workers,
        }

    # Internals: roles.

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{self._id_prefix}{next(self._counter)}"

    def _refuse_if_master(self, client: ClientRef, message_type: str) -> None:
        if client in self._sessions_by_client:
            raise WrongRole(f"{message_type} from a master connection")

    def _refuse_if_worker(self, client: ClientRef, message_type: str) -> None:
        if client in self._worker_by_client:
            raise WrongRole(f"{message_type} from a worker connection")

    def _worker_for(self, client: ClientRef, message_type: str) -> Worker:
        worker_id = self._worker_by_client.get(client)
        if worker_id is None:
            raise WrongRole(
                f"{message_type} from a connection that is not a registered worker; "
                "send WORKER_REGISTER first"
            )
        return self._workers[worker_id]

    def _held_task(
        self, client: ClientRef, task_id: str, message_type: str
    ) -> tuple[Worker, Task]:
        worker = self._worker_for(client, message_type)
        if worker.task_id != task_id:
            raise TaskNotHeld(task_id)
        return worker, self._tasks[task_id]

    # Internals: moving tasks.

    def _dispatch(self, now: float) -> None:
        # Pair the longest-idle worker with the next session in turn until
        # one side runs out.
        while self._idle and self._ready:
            # Round-robin: the ready session served least recently goes next,
            # a session never served before all others. Sessions are few, so
            # a scan beats keeping a heap in step.
            session_id = min(self._ready, key=self._last_served)
            session = self._sessions[session_id]
            task = self._tasks[session.pending.popleft()]
            if not session.pending:
                del self._ready[session_id]
            self._assignments += 1
            session.last_served = self._assignments
            self._pending_count -= 1

            worker_id, _ = self._idle.popitem(last=False)
            worker = self._workers[worker_id]
            worker.task_id = task.id
            task.state = TaskState.ASSIGNED
            task.worker_id = worker_id
            task.attempts += 1
            logger.debug(
                "= task assigned task=%s worker=%s attempt=%d bytes=%d",
                task.id,
                worker_id,
                task.attempts,
                task.spec.size,
            )
            self._send(
                worker.client,
                {
                    "type": "TASK_ASSIGNED",
                    "task": {
                        "id": task.id,
                        "filename": task.spec.filename,
                        "mimeType": task.spec.mime_type,
                        "size": task.spec.size,
                    },
                },
                payload=task.spec.payload,
            )

    def _last_served(self, session_id: str) -> int:
        return self._sessions[session_id].last_served

    def _release_worker(self, worker: Worker) -> None:
        worker.task_id = None
        self._idle[worker.id] = None

    def _end_attempt(self, task: Task, error: str) -> None:
        # An attempt ended without a result: retry, or give up.
        task.worker_id = None
        if task.state is TaskState.CANCELLED:
            del self._tasks[task.id]
            return

        if task.attempts < self.max_attempts:
            logger.warning(
                "attempt failed, task requeued task=%s attempt=%d error=%s",
                task.id,
                task.attempts,
                error,
            )
            task.state = TaskState.PENDING
            session = self._sessions[task.session_id]
            session.pending.appendleft(task.id)
            self._ready[session.id] = None
            self._pending_count += 1
            return

        self._end_task(task, error=f"gave up after {task.attempts} attempts: {error}")

    def _end_task(
        self, task: Task, *, result_url: str | None = None, error: str | None = None
    ) -> None:
        # A task's final outcome: tell its master, and close the session if
        # this was its last task.
        del self._tasks[task.id]
        session = self._sessions[task.session_id]
        if error is None:
            session.completed += 1
            message: dict[str, Any] = {
                "type": "TASK_COMPLETED",
                "taskId": task.id,
                "filename": task.spec.filename,
                "resultUrl": result_url,
                "progress": session.progress(),
            }
        else:
            session.failed += 1
            logger.info("task failed task=%s error=%s", task.id, error)
            message = {
                "type": "TASK_FAILED",
                "taskId": task.id,
                "filename": task.spec.filename,
                "error": error,
                "progress": session.progress(),
            }
        self._send(session.master, message)

        if session.finished:
            # TODO: forget finished sessions after a retention period; until
            # then each stays (a few counters, no payloads) while its master
            # is connected, so that a late SUBMIT_TASKS gets session_closed.
            logger.info(
                "session completed session=%s completed=%d failed=%d",
                session.id,
                session.completed,
                session.failed,
            )
            self._send(
                session.master,
                {
                    "type": "SESSION_COMPLETED",
                    "sessionId": session.id,
                    "stats": session.progress(),
                },
            )

    # Internals: clients going away.

    def _forget_client(self, client: ClientRef, reason: str, now: float) -> None:
        worker_id = self._worker_by_client.pop(client, None)
        if worker_id is not None:
            self._forget_worker(self._workers.pop(worker_id), reason)
            self._stats_changed(now)

        for session_id in self._sessions_by_client.pop(client, []):
            self._forget_session(self._sessions.pop(session_id))

    def _forget_worker(self, worker: Worker, reason: str) -> None:
        self._idle.pop(worker.id, None)
        logger.info("worker left worker=%s reason=%s", worker.id, reason)
        if worker.task_id is not None:
            self._end_attempt(self._tasks[worker.task_id], reason)

    def _forget_session(self, session: Session) -> None:
        self._ready.pop(session.id, None)
        for task_id in session.pending:
            del self._tasks[task_id]
        self._pending_count -= len(session.pending)

        # Tasks out with workers stay until the worker reports, so that the
        # worker is not handed a second task while it still uploads this one.
        held = [t for t in self._tasks.values() if t.session_id == session.id]
        for task in held:
            task.state = TaskState.CANCELLED
            assert task.worker_id is not None
            self._send(
                self._workers[task.worker_id].client,
                {
                    "type": "TASK_CANCELLED",
                    "taskId": task.id,
                    "reason": "the master closed its session",
                },
            )
        if not session.finished:
            logger.info(
                "session dropped with its master session=%s dropped=%d cancelled=%d",
                session.id,
                len(session.pending),
                len(held),
            )

    def _stats_changed(self, now: float) -> None:
        # Workers came or went: everyone gets a STATS_UPDATE at the next tick
        # that is at least STATS_PUSH_INTERVAL after the last push.
        if self._stats_push_due is None:
            self._stats_push_due = max(now, self._last_stats_push + STATS_PUSH_INTERVAL)

    def _send(
        self, client: ClientRef, message: dict[str, Any], payload: Any = None
    ) -> None:
        self._outgoing.append(Send(client, message, payload))

    def __repr__(self) -> str:
        return (
            f"Scheduler(workers={len(self._workers)}, sessions={len(self._sessions)}, "
            f"pending={self._pending_count}, tasks={len(self._tasks)})"
        )
