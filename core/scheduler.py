"""
The scheduler: every piece of linkup's state and every rule, with no I/O.

It is a state machine in the sans-I/O style. The shell (:mod:`core.server`)
calls one method per input — a client message, a lost client, a bridge
joining, the passing of time — passing the current time in. It then writes
:meth:`Scheduler.take_changes` to the store, and only then delivers
:meth:`Scheduler.messages_to_send`, so that nothing is acknowledged before it
is stored. Methods that refuse a request raise a :class:`~core.errors.LinkupError`
before changing anything.

Policy, in short (``docs/architecture.md`` has the long form):

* One task at a time per worker; an idle worker gets work as soon as any is
  pending. Idle workers are served longest-idle first; a worker rate-limited
  by the upload site rests until its wait is over.
* Sessions with pending work are served round-robin, one task each in turn,
  so a master with one file never waits behind another master's five hundred.
* An attempt starts when a task is assigned. It ends with the worker's
  report, or when the worker is lost (disconnected, silent for
  ``worker_timeout``, or without a result ``task_timeout`` after the
  assignment). A failed or lost attempt sends the task back to the front of
  its queue until ``max_attempts`` attempts have been used; then the master
  gets ``TASK_FAILED``.
* Only the worker holding the current attempt may report it, once; anything
  else is refused and counted.
* A master that goes away leaves its sessions paused for ``resume_grace``
  seconds; ``RESUME_SESSION`` picks one up again, with every result it missed.
  After the grace, its pending tasks are dropped and workers still holding its
  tasks are told ``TASK_CANCELLED``.
* Ended sessions are kept ``retention`` seconds for ``RESUME_SESSION``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import (
    InvalidField,
    LinkupError,
    SessionClosed,
    TaskNotHeld,
    UnknownSession,
    UnknownTask,
    WrongRole,
)
from core.model import (
    Broadcast,
    Changes,
    ClientClaim,
    ClientRef,
    Disconnect,
    Measure,
    Outgoing,
    Send,
    Session,
    SessionState,
    Task,
    TaskSpec,
    TaskState,
    Worker,
)

__all__ = ["Counters", "Scheduler"]

logger = logging.getLogger("linkup.core.scheduler")

# The first server's numbers, which users know.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_WORKER_TIMEOUT = 30.0
# Generous: a worker that is alive keeps its task while it uploads, even a
# large file over a slow line; this only catches uploads that hang.
DEFAULT_TASK_TIMEOUT = 3600.0
DEFAULT_RESUME_GRACE = 30.0
DEFAULT_RETENTION = 3600.0

# STATS_UPDATE pushes to every client are coalesced to at most one per this
# many seconds: a burst of N workers joining would otherwise send N pushes of
# N workers each to N clients.
STATS_PUSH_INTERVAL = 0.25

_NEVER = float("inf")

# JavaScript's largest exact integer: plugins cannot mean more, and the sums
# of sizes the core keeps stay within SQLite's 64-bit integers.
MAX_SIZE = 2**53 - 1


@dataclass(slots=True)
class Counters:
    """
    Running totals since the core started, for metrics.

    """

    tasks_submitted: int = 0
    tasks_completed: int = 0
    tasks_failed: int = 0
    tasks_retried: int = 0
    tasks_cancelled: int = 0
    attempts_expired: int = 0
    reports_refused: int = 0
    #: Base64 payload bytes accepted from masters, and sent to workers
    #: (an assignment sent again counts again).
    payload_bytes_received: int = 0
    payload_bytes_sent: int = 0
    #: Declared sizes of the files of completed tasks.
    bytes_completed: int = 0


class Scheduler:
    """
    Workers, sessions, the task queue and its rules.

    Args:
        id_prefix: Put into every id this instance makes, so that ids stay
            unique across restarts of the core.
        max_attempts: Attempts per task before it is reported as failed.
        worker_timeout: Seconds of silence after which a worker is dropped.
        task_timeout: Seconds an attempt may take from its assignment, or
            None for no limit. A TASK_WAITING adds its wait.
        resume_grace: Seconds a session waits for its master to come back.
        retention: Seconds an ended session is kept for RESUME_SESSION.

    """

    def __init__(
        self,
        id_prefix: str = "",
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        worker_timeout: float = DEFAULT_WORKER_TIMEOUT,
        task_timeout: float | None = DEFAULT_TASK_TIMEOUT,
        resume_grace: float = DEFAULT_RESUME_GRACE,
        retention: float = DEFAULT_RETENTION,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if worker_timeout <= 0:
            raise ValueError("worker_timeout must be positive")
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be positive or None")
        if resume_grace < 0 or retention < 0:
            raise ValueError("resume_grace and retention must not be negative")
        self.max_attempts = max_attempts
        self.worker_timeout = worker_timeout
        self.task_timeout = task_timeout
        self.resume_grace = resume_grace
        self.retention = retention
        self.counters = Counters()

        self._id_prefix = f"{id_prefix}-" if id_prefix else ""
        self._counter = itertools.count(1)

        self._workers: dict[str, Worker] = {}
        self._worker_by_client: dict[ClientRef, str] = {}
        #: Idle workers, longest idle first.
        self._idle: OrderedDict[str, None] = OrderedDict()
        #: Idle workers waiting out a rate limit.
        self._resting: dict[str, None] = {}

        self._sessions: dict[str, Session] = {}
        self._sessions_by_client: dict[ClientRef, list[str]] = {}
        #: Open, attached sessions with pending tasks, each with the number
        #: of its entry into this dict (the order of entry breaks ties).
        self._ready: dict[str, int] = {}
        self._entries = 0
        #: The round-robin order of ready sessions: (last_served, entry,
        #: session id), smallest first. Entries that no longer match the
        #: session (served since, or left and entered again) are skipped
        #: when they come up.
        self._turns: list[tuple[int, int, str]] = []
        #: Assignments made so far: the round-robin clock.
        self._assignments = 0

        #: Live tasks: pending or assigned. Ended tasks live on only as
        #: their outcome message in ``Session.results``.
        self._tasks: dict[str, Task] = {}
        self._pending_count = 0

        self._outgoing: list[Outgoing] = []
        self._changes = Changes()
        self._measurements: list[tuple[Measure, float]] = []
        #: No timer is due before this; a lower bound, so that tick() is
        #: cheap on the many turns where nothing is due.
        self._wake_at = _NEVER
        #: When the next STATS_UPDATE push is due, if workers came or went.
        self._stats_push_due: float | None = None
        self._last_stats_push = float("-inf")

    # Start-up.

    def restore(
        self,
        sessions: Iterable[Session],
        tasks: Iterable[Task],
        workers: Iterable[Worker],
        now: float,
    ) -> None:
        """
        Take over the state a previous run stored; call it once, first.

        Nobody is connected yet: masters and workers are waiting for their
        bridge to claim them (:meth:`bridge_joined`). A worker no bridge claims
        within ``worker_timeout`` is treated as gone; a session, ``resume_grace``
        after that.

        """
        restart_grace = now + self.worker_timeout + self.resume_grace
        for session in sessions:
            self._sessions[session.id] = session
            self._sessions_by_client.setdefault(session.master, []).append(session.id)
            session.attached = False
            session.restored = True
            if session.closed:
                session.expires_at = now + self.retention
            else:
                session.detached_until = restart_grace
        for worker in workers:
            worker.claimed = False
            worker.last_seen = now
            self._workers[worker.id] = worker
            self._worker_by_client[worker.client] = worker.id

        # Retried tasks were at the front of their queue; the store keeps no
        # finer order than that.
        for task in sorted(tasks, key=lambda t: (t.session_id, t.attempts == 0, t.seq)):
            if task.session_id not in self._sessions:
                logger.warning("stored task without a session dropped task=%s", task.id)
                self._changes.tasks[task.id] = None
                self._changes.freed_payloads.append(task.spec.payload_key)
                continue
            self._tasks[task.id] = task
            holder = self._workers.get(task.worker_id or "")
            if task.state is TaskState.PENDING:
                self._requeue(task, front=False, now=None)
            elif holder is not None and holder.task_id == task.id:
                task.deadline = self._attempt_deadline(now)
            else:
                # Stored as assigned to a worker that was not stored with it.
                self._end_attempt(task, "worker lost in a restart of the core", now)
        for worker in self._workers.values():
            held = self._tasks.get(worker.task_id or "")
            if worker.released is None and (
                held is None or held.worker_id != worker.id
            ):
                worker.task_id = None
        self._wake(now)
        logger.info(
            "restored sessions=%d tasks=%d workers=%d",
            len(self._sessions),
            len(self._tasks),
            len(self._workers),
        )

    # Inputs from workers.

    def register_worker(self, client: ClientRef, now: float) -> str:
        """
        Make ``client`` a worker and answer ``WORKER_REGISTERED``.

        Registering twice is harmless: the worker keeps its id and its task.

        """
        self._refuse_if_master(client, "WORKER_REGISTER")

        worker_id = self._worker_by_client.get(client)
        if worker_id is None:
            worker_id = self._new_id("w")
            worker = Worker(worker_id, client, last_seen=now)
            self._workers[worker_id] = worker
            self._worker_by_client[client] = worker_id
            self._idle[worker_id] = None
            self._changes.workers[client] = worker
            self._wake(now + self.worker_timeout)
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

        """
        worker_id = self._worker_by_client.get(client)
        if worker_id is not None:
            self._workers[worker_id].last_seen = now

    def heartbeat(self, client: ClientRef, now: float) -> None:
        """
        A worker's sign of life. Nothing is sent.

        """
        self._worker_for(client, "WORKER_HEARTBEAT").last_seen = now

    def complete_task(
        self,
        client: ClientRef,
        task_id: str,
        result_url: str,
        now: float,
        *,
        replayed: bool = False,
    ) -> None:
        """
        A worker reports that it uploaded ``task_id``.

        ``replayed`` marks a report that may be old news, as in a bridge's
        claims (:meth:`bridge_joined` applies those this way): refusing it is
        then not counted, and a late one draws no ERROR.

        Raises:
            TaskNotHeld: The sender is not busy with this task.

        """
        self._complete(client, task_id, result_url, now, replayed)
        self._dispatch(now)

    def fail_task(
        self,
        client: ClientRef,
        task_id: str,
        error: str,
        now: float,
        *,
        replayed: bool = False,
    ) -> None:
        """
        A worker reports that its upload of ``task_id`` failed.

        The task is tried again while attempts remain, else the master is told.

        Raises:
            TaskNotHeld: The sender is not busy with this task.

        """
        self._fail(client, task_id, error, now, replayed)
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
        A worker was rate-limited while uploading ``task_id``.

        The master is told; the worker gets no new task before the wait is
        over, and the attempt's time limit grows by the wait.

        Raises:
            TaskNotHeld: The sender is not busy with this task.

        """
        worker = self._worker_for(client, "TASK_WAITING")
        if worker.task_id != task_id:
            self.counters.reports_refused += 1
            raise TaskNotHeld(task_id)
        if worker.released is not None:
            return
        task = self._tasks[task_id]
        wait = max(0.0, wait_time)
        worker.not_before = max(worker.not_before, now + wait)
        if task.deadline is not None:
            task.deadline += wait
        logger.info(
            "worker rate-limited task=%s worker=%s wait=%ss",
            task_id,
            worker.id,
            wait_time,
        )
        session = self._sessions[task.session_id]
        self._to_master(
            session,
            {
                "type": "TASK_WAITING",
                "taskId": task_id,
                "filename": task.spec.filename,
                "waitTime": wait_time,
                "waitStart": wait_start,
                "workerId": worker.id,
            },
            outcome=False,
        )

    # Inputs from masters.

    def create_session(self, client: ClientRef, now: float) -> str:
        """
        Open an upload session for ``client`` and answer ``SESSION_CREATED``.

        """
        self._refuse_if_worker(client, "CREATE_SESSION")

        session = Session(self._new_id("s"), client)
        self._sessions[session.id] = session
        self._sessions_by_client.setdefault(client, []).append(session.id)
        self._changes.sessions[session.id] = session
        logger.info("session created session=%s", session.id)

        self._send(
            client,
            {
                "type": "SESSION_CREATED",
                "sessionId": session.id,
                "serverStats": self.statistics(),
            },
        )
        return session.id

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
            SessionClosed: The session has already ended.
            InvalidField: A size is negative.

        """
        session = self._own_session(client, session_id)
        for index, spec in enumerate(specs):
            if not 0 <= spec.size <= MAX_SIZE:
                raise InvalidField(f"tasks[{index}].size must be 0 to {MAX_SIZE}")

        task_ids = []
        for spec in specs:
            task = Task(self._new_id("t"), session_id, session.total, spec)
            task.submitted_at = now
            session.total += 1
            self._tasks[task.id] = task
            self._changes.tasks[task.id] = task
            self._requeue(task, front=False, now=now)
            task_ids.append(task.id)
            self._measurements.append((Measure.TASK_SIZE, spec.size))
            self.counters.payload_bytes_received += spec.payload_size
        self._changes.sessions[session_id] = session
        self.counters.tasks_submitted += len(specs)
        logger.info(
            "tasks submitted session=%s count=%d bytes=%d",
            session_id,
            len(specs),
            sum(spec.payload_size for spec in specs),
        )

        submitted = {
            "type": "TASKS_SUBMITTED",
            "sessionId": session_id,
            "taskCount": len(specs),
            "totalPending": self._pending_count,
            # An addition, in the order of the submitted files: what
            # CANCEL_TASK names.
            "taskIds": task_ids,
        }
        self._send(client, submitted)
        self._dispatch(now)
        # The reply goes out before the assignments but counts what is still
        # waiting after them.
        submitted["totalPending"] = self._pending_count
        return task_ids

    def cancel_task(self, client: ClientRef, task_id: str, now: float) -> None:
        """
        The master gives up on one task; answer ``TASK_CANCELLED``.

        A worker holding it is told ``TASK_CANCELLED`` too; it stays busy
        until it reports, and its report is discarded.

        Raises:
            UnknownTask: No pending or running task of ``client`` has this id.

        """
        task = self._tasks.get(task_id)
        session = None if task is None else self._sessions[task.session_id]
        if task is None or session is None or not self._is_master(client, session):
            raise UnknownTask(task_id)

        self._cancel(task, "cancelled by its master")
        session.cancelled += 1
        self.counters.tasks_cancelled += 1
        logger.info("task cancelled task=%s", task_id)
        self._to_master(
            session,
            {
                "type": "TASK_CANCELLED",
                "taskId": task_id,
                "filename": task.spec.filename,
                "reason": "cancelled by its master",
                "progress": session.progress(),
            },
        )
        self._session_changed(session, now)

    def cancel_session(self, client: ClientRef, session_id: str, now: float) -> None:
        """
        The master gives up on a whole session; answer ``SESSION_CANCELLED``.

        Raises:
            UnknownSession: ``client`` has no session ``session_id``.
            SessionClosed: The session has already ended.

        """
        session = self._own_session(client, session_id)
        cancelled = self._drop_tasks(session, "cancelled by its master")
        session.cancelled += cancelled
        self.counters.tasks_cancelled += cancelled
        session.state = SessionState.CANCELLED
        session.expires_at = now + self.retention
        self._wake(session.expires_at)
        logger.info("session cancelled session=%s tasks=%d", session_id, cancelled)
        self._to_master(
            session,
            {
                "type": "SESSION_CANCELLED",
                "sessionId": session_id,
                "stats": session.progress(),
            },
        )
        self._changes.sessions[session_id] = session

    def resume_session(
        self, client: ClientRef, session_id: str, after: int, now: float
    ) -> None:
        """
        Make ``client`` the master of ``session_id`` again.

        Answers ``SESSION_RESUMED``, then every outcome message of the session
        from the ``after``-th on (the ones the client has, it can skip), in
        their original order; the session's queue runs again.

        Raises:
            UnknownSession: No such session, or it expired.
            InvalidField: ``after`` is negative.

        """
        self._refuse_if_worker(client, "RESUME_SESSION")
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(
                session_id, f"no session {session_id!r}; it may have expired"
            )
        if after < 0:
            raise InvalidField("after must not be negative")

        self._move_session(session, client)
        session.attached = True
        session.detached_until = None
        self._update_ready(session)
        logger.info(
            "session resumed session=%s replayed=%d",
            session_id,
            max(0, len(session.results) - after),
        )
        self._send(
            client,
            {
                "type": "SESSION_RESUMED",
                "sessionId": session_id,
                "state": session.state.value,
                "results": len(session.results),
                "stats": session.progress(),
            },
        )
        for index in range(after, len(session.results)):
            self._send_result(session, index)
        self._dispatch(now)

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
        master's open sessions wait ``resume_grace`` for it to come back.

        """
        self._forget_client(client, "worker disconnected", now)
        self._dispatch(now)

    def bridge_joined(
        self, bridge: bytes, claims: Sequence[ClientClaim], now: float
    ) -> list[int]:
        """
        A bridge (re)joined and listed its live connections.

        Workers and masters the core has for this bridge are matched with the
        list: those still connected carry on, the others are gone. A worker
        whose task never reached it is sent it again, a master the outcomes
        it missed; each claim's ``report`` is applied before anything is
        handed out.

        Returns:
            The connection numbers that the core knows as a worker or master;
            the bridge must close any other connection that had a role.

        """
        # A master connection that had a session the core no longer has for
        # it (dropped while the bridge was away) must start over: the bridge
        # closes it, as the first server would have.
        by_conn = {
            claim.conn: claim
            for claim in claims
            if not any(
                self._lost_session(s, (bridge, claim.conn)) for s in claim.sessions
            )
        }
        # Masters first: a worker's claim below may end a task, and its
        # outcome must then go out once, live, not again with the backlog.
        for session in [s for s in self._sessions.values() if s.master[0] == bridge]:
            claim = by_conn.get(session.master[1])
            if session.restored:
                # Now it is known whether the master is still there; if not,
                # its grace runs from now.
                session.restored = False
                session.detached_until = None
            if claim is not None:
                session.attached = True
                session.detached_until = None
                self._update_ready(session)
                # Outcomes made while the master was unreachable, or lost on
                # the way when the core stopped, go out now.
                for index in range(
                    claim.results.get(session.id, 0), len(session.results)
                ):
                    self._send_result(session, index)
            else:
                self._detach(session, now)

        for client in sorted(c for c in self._worker_by_client if c[0] == bridge):
            claim = by_conn.get(client[1])
            if claim is None:
                self._forget_client(client, "connection gone while away", now)
            else:
                worker = self._worker_for(client, "claim")
                if not worker.claimed:
                    self._stats_changed(now)
                self._reclaim_worker(worker, claim, now)

        # Before any dispatch: a report must never meet a newer attempt of
        # its task.
        for claim in sorted(by_conn.values(), key=lambda c: c.conn):
            if claim.report is not None:
                self._apply_claimed_report((bridge, claim.conn), claim.report, now)
            if claim.gone:
                self._forget_client((bridge, claim.conn), "worker disconnected", now)

        self._dispatch(now)
        return self.known_clients(bridge)

    def _lost_session(self, session_id: str, client: ClientRef) -> bool:
        session = self._sessions.get(session_id)
        return session is None or session.master != client

    def known_clients(self, bridge: bytes) -> list[int]:
        """
        The connections of ``bridge`` that are a worker or an attached master.

        """
        workers = {c[1] for c in self._worker_by_client if c[0] == bridge}
        masters = {
            s.master[1]
            for s in self._sessions.values()
            if s.master[0] == bridge and s.attached
        }
        return sorted(workers | masters)

    def bridge_gone(self, bridge: bytes, now: float) -> None:
        """
        Forget every client of a bridge that the core lost.

        Nothing is sent to those clients: the bridge is gone, or will join
        again and list the connections it still has.

        """
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

    def tick(self, now: float) -> None:
        """
        Do what time makes due.

        Drops workers silent for ``worker_timeout`` (closed with a
        :class:`Disconnect`), ends attempts past ``task_timeout``, wakes
        rested workers, drops sessions whose master did not come back,
        forgets expired sessions, and pushes a ``STATS_UPDATE`` to every client
        if workers came or went (at most one per ``STATS_PUSH_INTERVAL``).
        Cheap when nothing is due; calling it early is harmless.

        """
        if now >= self._wake_at:
            self._wake_at = _NEVER
            self._expire_workers(now)
            self._expire_attempts(now)
            self._wake_rested(now)
            self._expire_sessions(now)
            self._dispatch(now)
            self._wake(self._earliest_deadline())

        if self._stats_push_due is not None and now >= self._stats_push_due:
            self._stats_push_due = None
            self._last_stats_push = now
            self._outgoing.append(
                Broadcast({"type": "STATS_UPDATE", "stats": self.statistics()})
            )

    def next_deadline(self) -> float | None:
        """
        When :meth:`tick` next has work to do (perhaps earlier), or None.

        """
        deadlines = [self._wake_at]
        if self._stats_push_due is not None:
            deadlines.append(self._stats_push_due)
        deadline = min(deadlines)
        return None if deadline == _NEVER else deadline

    # Outputs.

    def messages_to_send(self) -> list[Outgoing]:
        """
        Return and clear the messages produced since the last call.

        The shell must store :meth:`take_changes` first, then deliver these
        in order.

        """
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def take_measurements(self) -> list[tuple[Measure, float]]:
        """
        Return and forget the measurements taken since the last call.

        Sizes and durations for metrics' histograms, on the clock of the
        ``now`` arguments. Durations that began before a restart of the core
        are not measured.

        """
        measurements, self._measurements = self._measurements, []
        return measurements

    def take_changes(self) -> Changes:
        """
        Return and clear what changed since the last call, for the store.

        """
        changes, self._changes = self._changes, Changes()
        return changes

    # Read-only views for core.readout; callers must not change what they get.

    @property
    def workers(self) -> Mapping[str, Worker]:
        return self._workers

    @property
    def sessions(self) -> Mapping[str, Session]:
        return self._sessions

    @property
    def tasks(self) -> Mapping[str, Task]:
        return self._tasks

    @property
    def pending_count(self) -> int:
        return self._pending_count

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
            if worker.claimed
        ]
        idle = len(self._idle) + len(self._resting)
        return {
            "workerCount": len(workers),
            "idleWorkers": idle,
            "pendingTasks": self._pending_count,
            "activeTasks": len(workers) - idle,
            "activeSessions": sum(
                1 for session in self._sessions.values() if not session.closed
            ),
            "workers": workers,
        }

    # Internals: roles.

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{self._id_prefix}{next(self._counter)}"

    def _is_master(self, client: ClientRef, session: Session) -> bool:
        return session.master == client and session.attached

    def _refuse_if_master(self, client: ClientRef, message_type: str) -> None:
        sessions = self._sessions_by_client.get(client, ())
        if any(self._sessions[s].attached for s in sessions):
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

    def _own_session(self, client: ClientRef, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None or not self._is_master(client, session):
            raise UnknownSession(session_id)
        if session.closed:
            raise SessionClosed(session_id)
        return session

    def _take_report(
        self,
        client: ClientRef,
        task_id: str,
        message_type: str,
        now: float,
        replayed: bool,
    ) -> tuple[Worker, Task] | None:
        # The worker and task of a genuine report of the current attempt, or
        # None if the report was dealt with here (a worker freed from a task
        # that no longer counts).
        worker = self._worker_for(client, message_type)
        if worker.task_id != task_id:
            if not replayed:
                self.counters.reports_refused += 1
            raise TaskNotHeld(task_id)

        if worker.released is None:
            return worker, self._tasks[task_id]

        released, worker.released = worker.released, None
        self._release_worker(worker, now)
        if released == "expired" and not replayed:
            self.counters.reports_refused += 1
            logger.warning("late report refused task=%s worker=%s", task_id, worker.id)
            self._send(
                client,
                {
                    "type": "ERROR",
                    "code": TaskNotHeld.code,
                    "message": f"task {task_id!r} was taken from this worker "
                    "before it reported; the report was not used",
                },
            )
        else:
            logger.info("report of a cancelled task discarded task=%s", task_id)
        return None

    def _complete(
        self,
        client: ClientRef,
        task_id: str,
        result_url: str,
        now: float,
        replayed: bool,
    ) -> None:
        held = self._take_report(client, task_id, "TASK_COMPLETED", now, replayed)
        if held is None:
            return
        worker, task = held
        worker.completed += 1
        worker.total_bytes += task.spec.size
        self.counters.bytes_completed += task.spec.size
        if task.assigned_at is not None:
            self._measurements.append((Measure.UPLOAD, now - task.assigned_at))
        self._release_worker(worker, now)
        logger.info(
            "task completed task=%s worker=%s attempt=%d",
            task_id,
            worker.id,
            task.attempts,
        )
        self._end_task(task, now, result_url=result_url)

    def _fail(
        self, client: ClientRef, task_id: str, error: str, now: float, replayed: bool
    ) -> None:
        held = self._take_report(client, task_id, "TASK_FAILED", now, replayed)
        if held is None:
            return
        worker, task = held
        worker.failed += 1
        self._release_worker(worker, now)
        self._end_attempt(task, error, now)

    def _apply_claimed_report(
        self, client: ClientRef, report: dict[str, Any], now: float
    ) -> None:
        # A report the bridge kept because the core may not have it: applied
        # if the worker still holds that task, else it is old news, ignored.
        task_id = str(report.get("taskId"))
        try:
            if report.get("type") == "TASK_COMPLETED":
                url = str(report.get("resultUrl", ""))
                self._complete(client, task_id, url, now, replayed=True)
            elif report.get("type") == "TASK_FAILED":
                error = str(report.get("error", "upload failed"))
                self._fail(client, task_id, error, now, replayed=True)
        except LinkupError as exc:
            logger.debug("- claimed report ignored client=%s: %s", client[1], exc)

    # Internals: moving tasks.

    def _dispatch(self, now: float) -> None:
        # Pair the longest-idle worker with the next session in turn until
        # one side runs out.
        while self._idle and self._ready:
            # Round-robin: the ready session served least recently goes next,
            # a session never served before all others, and among those the
            # one that became ready first.
            session = self._next_turn()
            session_id = session.id
            task = self._tasks[session.pending.popleft()]
            self._assignments += 1
            session.last_served = self._assignments
            if session.pending:
                heapq.heappush(
                    self._turns,
                    (session.last_served, self._ready[session_id], session_id),
                )
            else:
                del self._ready[session_id]
            self._pending_count -= 1

            worker_id, _ = self._idle.popitem(last=False)
            worker = self._workers[worker_id]
            worker.task_id = task.id
            task.state = TaskState.ASSIGNED
            task.worker_id = worker_id
            task.attempts += 1
            if task.queued_at is not None:
                self._measurements.append((Measure.QUEUE_WAIT, now - task.queued_at))
            task.assigned_at = now
            task.deadline = self._attempt_deadline(now)
            if task.deadline is not None:
                self._wake(task.deadline)
            self._changes.tasks[task.id] = task
            self._changes.workers[worker.client] = worker
            self._assign(worker, task)

    def _assign(self, worker: Worker, task: Task) -> None:
        logger.debug(
            "= task assigned task=%s worker=%s attempt=%d bytes=%d",
            task.id,
            worker.id,
            task.attempts,
            task.spec.payload_size,
        )
        self.counters.payload_bytes_sent += task.spec.payload_size
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
            payload_key=task.spec.payload_key,
        )

    def _attempt_deadline(self, now: float) -> float | None:
        return None if self.task_timeout is None else now + self.task_timeout

    def _next_turn(self) -> Session:
        # The ready session with the smallest (last_served, entry); there is
        # one, as _ready is not empty.
        turns = self._turns
        while True:
            last_served, entry, session_id = heapq.heappop(turns)
            if self._ready.get(session_id) == entry:
                session = self._sessions[session_id]
                if session.last_served == last_served:
                    return session

    def _requeue(self, task: Task, *, front: bool, now: float | None) -> None:
        # now is None for a task restored from the store: when it entered
        # the queue is not known.
        task.queued_at = now
        task.state = TaskState.PENDING
        task.worker_id = None
        task.deadline = None
        session = self._sessions[task.session_id]
        if front:
            session.pending.appendleft(task.id)
        else:
            session.pending.append(task.id)
        self._pending_count += 1
        self._update_ready(session)

    def _update_ready(self, session: Session) -> None:
        if session.pending and session.attached and not session.closed:
            if session.id not in self._ready:
                self._entries += 1
                self._ready[session.id] = self._entries
                turns = self._turns
                if len(turns) > 2 * len(self._ready) + 64:
                    # Mostly entries of sessions that left: start afresh.
                    turns[:] = [
                        (self._sessions[id_].last_served, entry, id_)
                        for id_, entry in self._ready.items()
                        if id_ != session.id
                    ]
                    heapq.heapify(turns)
                heapq.heappush(turns, (session.last_served, self._entries, session.id))
        else:
            self._ready.pop(session.id, None)

    def _release_worker(self, worker: Worker, now: float) -> None:
        worker.task_id = None
        worker.released = None
        self._changes.workers[worker.client] = worker
        if worker.not_before > now:
            self._resting[worker.id] = None
            self._wake(worker.not_before)
        else:
            self._idle[worker.id] = None

    def _end_attempt(self, task: Task, error: str, now: float) -> None:
        # An attempt ended without a result: retry, or give up.
        task.last_error = error
        if task.attempts < self.max_attempts:
            logger.warning(
                "attempt failed, task requeued task=%s attempt=%d error=%s",
                task.id,
                task.attempts,
                error,
            )
            self.counters.tasks_retried += 1
            self._requeue(task, front=True, now=now)
            self._changes.tasks[task.id] = task
            return

        self._end_task(
            task, now, error=f"gave up after {task.attempts} attempts: {error}"
        )

    def _end_task(
        self,
        task: Task,
        now: float,
        *,
        result_url: str | None = None,
        error: str | None = None,
    ) -> None:
        # A task's final outcome: tell its master, and end the session if
        # this was its last task.
        self._delete_task(task)
        if task.submitted_at is not None:
            self._measurements.append((Measure.LATENCY, now - task.submitted_at))
        session = self._sessions[task.session_id]
        if error is None:
            session.completed += 1
            self.counters.tasks_completed += 1
            message: dict[str, Any] = {
                "type": "TASK_COMPLETED",
                "taskId": task.id,
                "filename": task.spec.filename,
                "resultUrl": result_url,
                "progress": session.progress(),
            }
        else:
            session.failed += 1
            self.counters.tasks_failed += 1
            logger.info("task failed task=%s error=%s", task.id, error)
            message = {
                "type": "TASK_FAILED",
                "taskId": task.id,
                "filename": task.spec.filename,
                "error": error,
                "progress": session.progress(),
            }
        self._to_master(session, message)
        self._session_changed(session, now)

    def _session_changed(self, session: Session, now: float) -> None:
        # After a task of ``session`` ended: store it, and close the session
        # if that was its last task.
        self._changes.sessions[session.id] = session
        if not session.all_ended or session.closed:
            return
        session.state = SessionState.COMPLETED
        session.detached_until = None
        session.expires_at = now + self.retention
        self._wake(session.expires_at)
        logger.info(
            "session completed session=%s completed=%d failed=%d cancelled=%d",
            session.id,
            session.completed,
            session.failed,
            session.cancelled,
        )
        self._to_master(
            session,
            {
                "type": "SESSION_COMPLETED",
                "sessionId": session.id,
                "stats": session.progress(),
            },
        )

    def _cancel(self, task: Task, reason: str) -> None:
        # Take a live task out of the queue, or from its worker, for good.
        session = self._sessions[task.session_id]
        if task.state is TaskState.PENDING:
            session.pending.remove(task.id)
            self._pending_count -= 1
            self._update_ready(session)
        else:
            worker = self._workers[task.worker_id or ""]
            worker.released = "cancelled"
            self._changes.workers[worker.client] = worker
            if worker.claimed:
                self._send(
                    worker.client,
                    {"type": "TASK_CANCELLED", "taskId": task.id, "reason": reason},
                )
        self._delete_task(task)

    def _drop_tasks(self, session: Session, reason: str) -> int:
        # Cancel every live task of a session; return how many there were.
        tasks = [t for t in self._tasks.values() if t.session_id == session.id]
        for task in tasks:
            self._cancel(task, reason)
        return len(tasks)

    def _delete_task(self, task: Task) -> None:
        del self._tasks[task.id]
        self._changes.tasks[task.id] = None
        self._changes.freed_payloads.append(task.spec.payload_key)

    # Internals: masters.

    def _to_master(
        self, session: Session, message: dict[str, Any], *, outcome: bool = True
    ) -> None:
        # Outcomes are kept for RESUME_SESSION; a detached master gets them
        # when it resumes.
        if not outcome:
            if session.attached:
                self._send(session.master, message)
            return
        index = len(session.results)
        self._changes.outcomes.append((session.id, index, message))
        session.results.append(message)
        if session.attached:
            self._send_result(session, index)

    def _move_session(self, session: Session, client: ClientRef) -> None:
        if session.master != client:
            old = self._sessions_by_client.get(session.master, [])
            if session.id in old:
                old.remove(session.id)
                if not old:
                    del self._sessions_by_client[session.master]
            self._sessions_by_client.setdefault(client, []).append(session.id)
            session.master = client
            self._changes.sessions[session.id] = session

    def _detach(self, session: Session, now: float) -> None:
        # The master is away: pause an open session for resume_grace, counted
        # from when it first went away.
        session.attached = False
        self._ready.pop(session.id, None)
        if session.closed or session.detached_until is not None:
            return
        session.detached_until = now + self.resume_grace
        self._wake(session.detached_until)
        logger.info(
            "session paused, master away session=%s grace=%gs",
            session.id,
            self.resume_grace,
        )

    def _drop_session(self, session: Session) -> None:
        # What the first server did when a master left: the queue goes, and
        # workers still holding its tasks are told.
        pending = len(session.pending)
        held = self._drop_tasks(session, "the master closed its session")
        self.counters.tasks_cancelled += held
        self._forget_session(session)
        logger.info(
            "session dropped, master did not come back session=%s dropped=%d "
            "cancelled=%d",
            session.id,
            pending,
            held - pending,
        )

    def _forget_session(self, session: Session) -> None:
        self._ready.pop(session.id, None)
        del self._sessions[session.id]
        owned = self._sessions_by_client.get(session.master, [])
        if session.id in owned:
            owned.remove(session.id)
            if not owned:
                del self._sessions_by_client[session.master]
        self._changes.sessions[session.id] = None

    # Internals: workers and clients going away.

    def _reclaim_worker(self, worker: Worker, claim: ClientClaim, now: float) -> None:
        # Match what the core knows of a worker with what its bridge says.
        worker.claimed = True
        worker.last_seen = now
        reported = (claim.report or {}).get("taskId")
        if worker.task_id is not None and worker.task_id not in (claim.holds, reported):
            task = self._tasks.get(worker.task_id)
            if worker.released is not None or task is None:
                worker.task_id = worker.released = None
            elif claim.holds is None:
                # The assignment was made but never reached the worker.
                logger.info(
                    "assignment sent again task=%s worker=%s", task.id, worker.id
                )
                self._assign(worker, task)
                return
            else:
                worker.task_id = None
                self._end_attempt(task, "lost in a restart of the core", now)
        if worker.task_id is None and claim.holds is not None:
            # The worker is still busy with a task the core took back: it gets
            # no second one until it reports, and that report is refused.
            worker.task_id, worker.released = claim.holds, "expired"
            self._idle.pop(worker.id, None)
        if worker.task_id is None and worker.id not in self._resting:
            self._idle[worker.id] = None
        self._changes.workers[worker.client] = worker

    def _forget_client(self, client: ClientRef, reason: str, now: float) -> None:
        worker_id = self._worker_by_client.pop(client, None)
        if worker_id is not None:
            self._forget_worker(self._workers.pop(worker_id), reason, now)
            self._stats_changed(now)

        for session_id in list(self._sessions_by_client.get(client, [])):
            session = self._sessions[session_id]
            if self.resume_grace == 0 and not session.closed:
                self._drop_session(session)
            else:
                self._detach(session, now)

    def _forget_worker(self, worker: Worker, reason: str, now: float) -> None:
        self._idle.pop(worker.id, None)
        self._resting.pop(worker.id, None)
        self._changes.workers[worker.client] = None
        logger.info("worker left worker=%s reason=%s", worker.id, reason)
        if worker.task_id is not None and worker.released is None:
            self._end_attempt(self._tasks[worker.task_id], reason, now)

    # Internals: time.

    def _wake(self, when: float) -> None:
        self._wake_at = min(self._wake_at, when)

    def _earliest_deadline(self) -> float:
        deadlines = [w.last_seen + self.worker_timeout for w in self._workers.values()]
        deadlines.extend(
            t.deadline for t in self._tasks.values() if t.deadline is not None
        )
        deadlines.extend(self._workers[w].not_before for w in self._resting)
        for session in self._sessions.values():
            if session.detached_until is not None:
                deadlines.append(session.detached_until)
            if session.expires_at is not None:
                deadlines.append(session.expires_at)
        return min(deadlines, default=_NEVER)

    def _expire_workers(self, now: float) -> None:
        silent = [
            worker
            for worker in self._workers.values()
            if now - worker.last_seen >= self.worker_timeout
        ]
        for worker in silent:
            if worker.claimed:
                logger.warning(
                    "worker silent for %.0fs, dropped worker=%s",
                    now - worker.last_seen,
                    worker.id,
                )
                reason = f"worker silent for {self.worker_timeout:g}s"
                self._outgoing.append(Disconnect(worker.client, reason))
            else:
                reason = "worker not back after a restart of the core"
            self._forget_client(worker.client, reason, now)

    def _expire_attempts(self, now: float) -> None:
        expired = [
            task
            for task in self._tasks.values()
            if task.deadline is not None and task.deadline <= now
        ]
        for task in expired:
            worker = self._workers[task.worker_id or ""]
            worker.released = "expired"
            self._changes.workers[worker.client] = worker
            self.counters.attempts_expired += 1
            reason = f"no result {self.task_timeout:g}s after assignment"
            logger.warning("attempt expired task=%s worker=%s", task.id, worker.id)
            if worker.claimed:
                self._send(
                    worker.client,
                    {"type": "TASK_CANCELLED", "taskId": task.id, "reason": reason},
                )
            self._end_attempt(task, reason, now)

    def _wake_rested(self, now: float) -> None:
        for worker_id in list(self._resting):
            if self._workers[worker_id].not_before <= now:
                del self._resting[worker_id]
                self._idle[worker_id] = None

    def _expire_sessions(self, now: float) -> None:
        for session in list(self._sessions.values()):
            if session.detached_until is not None and session.detached_until <= now:
                self._drop_session(session)
            elif session.expires_at is not None and session.expires_at <= now:
                logger.info("ended session forgotten session=%s", session.id)
                self._forget_session(session)

    def _stats_changed(self, now: float) -> None:
        # Workers came or went: everyone gets a STATS_UPDATE at the next tick
        # that is at least STATS_PUSH_INTERVAL after the last push.
        if self._stats_push_due is None:
            self._stats_push_due = max(now, self._last_stats_push + STATS_PUSH_INTERVAL)

    def _send(
        self,
        client: ClientRef,
        message: dict[str, Any],
        payload_key: str | None = None,
    ) -> None:
        self._outgoing.append(Send(client, message, payload_key))

    def _send_result(self, session: Session, index: int) -> None:
        message = session.results[index]
        self._outgoing.append(Send(session.master, message, result=(session.id, index)))

    def __repr__(self) -> str:
        return (
            f"Scheduler(workers={len(self._workers)}, sessions={len(self._sessions)}, "
            f"pending={self._pending_count}, tasks={len(self._tasks)})"
        )
