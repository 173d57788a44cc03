"""
Tests of :mod:`core.scheduler`: pure, no I/O, time passed in explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import pytest

from core.errors import (
    InvalidField,
    InvalidState,
    LinkupError,
    SessionClosed,
    TaskNotHeld,
    UnknownSession,
    UnknownTask,
    WrongRole,
)
from core.model import (
    Broadcast,
    ClientClaim,
    ClientRef,
    Disconnect,
    Outgoing,
    Send,
    TaskSpec,
    TaskState,
)
from core.scheduler import STATS_PUSH_INTERVAL, Scheduler
from core.store import SqliteStore

BRIDGE = b"bridge-a"
OTHER_BRIDGE = b"bridge-b"


def client(number: int, bridge: bytes = BRIDGE) -> ClientRef:
    return (bridge, number)


MASTER = client(1)
MASTER_2 = client(2)
MASTER_3 = client(3)
W1 = client(11)
W2 = client(12)
W3 = client(13)
FAR_WORKER = client(21, OTHER_BRIDGE)

IDLE_STATS = {"completed": 0, "failed": 0, "totalBytes": 0}

#: Longer than any test's clock runs.
LONG = 1_000_000.0

#: The messages a master keeps for RESUME_SESSION.
OUTCOMES = {
    "TASK_COMPLETED",
    "TASK_FAILED",
    "TASK_CANCELLED",
    "SESSION_COMPLETED",
    "SESSION_CANCELLED",
}


# Helpers: building input.


def spec(
    filename: str = "photo.jpg",
    size: int = 100,
    payload_key: str | None = None,
    mime_type: str = "image/jpeg",
) -> TaskSpec:
    """A file already in the spool, under ``payload_key`` (``spool-FILENAME``)."""
    if payload_key is None:
        payload_key = f"spool-{filename}"
    return TaskSpec(filename, mime_type, size, payload_key, (size + 2) // 3 * 4)


def specs(count: int, prefix: str = "f") -> list[TaskSpec]:
    return [spec(f"{prefix}{i}.jpg", size=10 + i) for i in range(count)]


def add_worker(s: Scheduler, worker: ClientRef, now: float = 0.0) -> str:
    """Register ``worker``, let its STATS_UPDATE push go, throw away the output."""
    worker_id = s.register_worker(worker, now)
    s.tick(now)
    s.messages_to_send()
    return worker_id


def add_session(s: Scheduler, master: ClientRef = MASTER, now: float = 0.0) -> str:
    """Open a session for ``master`` and throw away the output."""
    session_id = s.create_session(master, now)
    s.messages_to_send()
    return session_id


def patient(**options: Any) -> Scheduler:
    """A scheduler whose workers never fall silent while a test's clock runs."""
    options.setdefault("worker_timeout", LONG)
    return Scheduler("t", **options)


def resume(
    s: Scheduler, new_master: ClientRef, session_id: str, now: float, after: int = 0
) -> list[Outgoing]:
    """RESUME_SESSION from ``new_master``; return the output."""
    s.resume_session(new_master, session_id, after, now)
    return s.messages_to_send()


# Helpers: reading output.


def sends(
    out: Iterable[Outgoing], type_: str, to: ClientRef | None = None
) -> list[Send]:
    """The Sends of message type ``type_``, to ``to`` if given."""
    return [
        item
        for item in out
        if isinstance(item, Send)
        and item.message["type"] == type_
        and (to is None or item.client == to)
    ]


def sent(
    out: Iterable[Outgoing], type_: str, to: ClientRef | None = None
) -> list[dict[str, Any]]:
    """The messages of type ``type_`` sent to one client, to ``to`` if given."""
    return [item.message for item in sends(out, type_, to)]


def types(out: Iterable[Outgoing]) -> list[str]:
    """The message types of the Sends, in order."""
    return [item.message["type"] for item in out if isinstance(item, Send)]


def broadcasts(out: Iterable[Outgoing]) -> list[dict[str, Any]]:
    return [item.message for item in out if isinstance(item, Broadcast)]


def disconnects(out: Iterable[Outgoing]) -> list[Disconnect]:
    return [item for item in out if isinstance(item, Disconnect)]


def sent_to(out: Iterable[Outgoing], to: ClientRef) -> list[dict[str, Any]]:
    """Every message sent to ``to``, in order."""
    return [
        item.message for item in out if isinstance(item, Send) and item.client == to
    ]


def outcomes(out: Iterable[Outgoing]) -> list[dict[str, Any]]:
    """The outcome messages (those kept for RESUME_SESSION), in order."""
    return [
        item.message
        for item in out
        if isinstance(item, Send) and item.message["type"] in OUTCOMES
    ]


def one(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


def assigned(out: Iterable[Outgoing], to: ClientRef | None = None) -> list[str]:
    """Ids of the tasks handed out, in order."""
    return [m["task"]["id"] for m in sent(out, "TASK_ASSIGNED", to)]


def counts(s: Scheduler) -> dict[str, Any]:
    """The statistics without the per-worker list."""
    stats = s.statistics()
    del stats["workers"]
    return stats


def worker_row(s: Scheduler, worker_id: str) -> dict[str, Any]:
    row: dict[str, Any] = one(
        [w for w in s.statistics()["workers"] if w["id"] == worker_id]
    )
    return row


def snapshot(s: Scheduler) -> tuple[Any, ...]:
    return (s.statistics(), repr(s), s.next_deadline())


def assert_refused(
    s: Scheduler,
    error: type[LinkupError],
    call: Callable[..., Any],
    *args: Any,
) -> LinkupError:
    """``call(*args)`` raises ``error``, queues nothing and changes nothing."""
    s.messages_to_send()
    before = snapshot(s)
    with pytest.raises(error) as info:
        call(*args)
    assert s.messages_to_send() == []
    assert snapshot(s) == before
    return info.value


def serve_one_by_one(s: Scheduler, worker: ClientRef, count: int) -> list[str]:
    """
    Let ``worker`` complete ``count`` tasks in turn; return their filenames in
    the order they were handed out.

    """
    return serve_one_by_one_from(s, worker, s.messages_to_send(), count)


def serve_one_by_one_from(
    s: Scheduler, worker: ClientRef, out: list[Outgoing], count: int
) -> list[str]:
    """:func:`serve_one_by_one`, the first assignment being in ``out``."""
    names = []
    for step in range(count):
        message = one(sent(out, "TASK_ASSIGNED", worker))
        names.append(message["task"]["filename"])
        s.complete_task(worker, message["task"]["id"], "url", 100.0 + step)
        out = s.messages_to_send()
    return names


# Helpers: storing and restarting.


def persist(s: Scheduler, store: SqliteStore) -> list[Outgoing]:
    """What the shell does after every turn: store the changes, then send."""
    store.save(s.take_changes())
    return s.messages_to_send()


def restart(store: SqliteStore, now: float, **options: Any) -> Scheduler:
    """A new scheduler taking over what ``store`` holds, as the core starts up."""
    snapshot = store.load()
    s = Scheduler("b", **options)
    s.restore(snapshot.sessions, snapshot.tasks, snapshot.workers, now)
    return s


@dataclass
class Stopped:
    """What a run of scheduler A left behind when it stopped."""

    before: Scheduler
    store: SqliteStore
    #: MASTER_2's session, completed.
    done: str
    #: MASTER's session of eight tasks, still running.
    running: str
    tasks: list[str]
    #: The outcome messages each master received from A, in order.
    seen: dict[ClientRef, list[dict[str, Any]]]


def run_then_stop(store: SqliteStore) -> Stopped:
    """
    Run scheduler A, storing every turn as the shell does, and stop it with:

    - MASTER_2's session completed (x.jpg by W1);
    - MASTER's session of eight: f0 completed by W2, f1 failed once and now
      retried by FAR_WORKER (of OTHER_BRIDGE), f2 with W1, f3 with W2, and
      f4 to f7 pending.

    """
    a = Scheduler("a")
    seen: dict[ClientRef, list[dict[str, Any]]] = {MASTER: [], MASTER_2: []}

    def step() -> None:
        out = persist(a, store)
        for master, messages in seen.items():
            messages.extend(m for m in sent_to(out, master) if m["type"] in OUTCOMES)

    for worker in (W1, W2, FAR_WORKER):
        a.register_worker(worker, 0.0)
        step()
    a.tick(0.0)
    step()
    done = a.create_session(MASTER_2, 1.0)
    step()
    (x,) = a.submit_tasks(MASTER_2, done, [spec("x.jpg")], 1.0)
    step()
    a.complete_task(W1, x, "url-x", 2.0)
    step()
    running = a.create_session(MASTER, 3.0)
    step()
    tasks = a.submit_tasks(MASTER, running, specs(8), 3.0)
    step()
    a.complete_task(W2, tasks[0], "url-0", 4.0)
    step()
    a.fail_task(FAR_WORKER, tasks[1], "HTTP 500", 5.0)
    step()
    return Stopped(a, store, done, running, tasks, seen)


def rejoin(s: Scheduler, stopped: Stopped, now: float) -> list[Outgoing]:
    """Both bridges join again, every connection still there; return the output."""
    tasks = stopped.tasks
    received = {master: len(seen) for master, seen in stopped.seen.items()}
    s.bridge_joined(
        BRIDGE,
        [
            ClientClaim(MASTER[1], results={stopped.running: received[MASTER]}),
            ClientClaim(MASTER_2[1], results={stopped.done: received[MASTER_2]}),
            ClientClaim(W1[1], holds=tasks[2]),
            ClientClaim(W2[1], holds=tasks[3]),
        ],
        now,
    )
    s.bridge_joined(OTHER_BRIDGE, [ClientClaim(FAR_WORKER[1], holds=tasks[1])], now)
    return s.messages_to_send()


@pytest.fixture
def sched() -> Scheduler:
    return Scheduler("t")


@pytest.fixture
def no_grace() -> Scheduler:
    """The first server's policy: a master's session ends the moment it leaves."""
    return Scheduler("t", resume_grace=0.0)


@pytest.fixture
def store() -> Iterator[SqliteStore]:
    """A real store, in memory, as the shell writes it."""
    with closing(SqliteStore(":memory:")) as store:
        yield store


@pytest.fixture
def stopped(store: SqliteStore) -> Stopped:
    """See run_then_stop()."""
    return run_then_stop(store)


# Construction.


def test_scheduler_rejects_zero_attempts() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        Scheduler(max_attempts=0)


@pytest.mark.parametrize("timeout", [0.0, -1.0])
def test_scheduler_rejects_non_positive_worker_timeout(timeout: float) -> None:
    with pytest.raises(ValueError, match="worker_timeout"):
        Scheduler(worker_timeout=timeout)


def test_default_limits_are_those_of_the_first_server() -> None:
    s = Scheduler()
    assert s.max_attempts == 3
    assert s.worker_timeout == 30.0


def test_default_time_limits() -> None:
    s = Scheduler()

    assert s.task_timeout == 3600.0
    assert s.resume_grace == 30.0
    assert s.retention == 3600.0


@pytest.mark.parametrize("timeout", [0.0, -1.0])
def test_scheduler_rejects_non_positive_task_timeout(timeout: float) -> None:
    with pytest.raises(ValueError, match="task_timeout"):
        Scheduler(task_timeout=timeout)


@pytest.mark.parametrize("option", ["resume_grace", "retention"])
def test_scheduler_rejects_negative_grace_and_retention(option: str) -> None:
    options: dict[str, Any] = {option: -1.0}
    with pytest.raises(ValueError, match=option):
        Scheduler(**options)


def test_ids_carry_the_prefix_and_are_unique() -> None:
    s = Scheduler("core7")
    worker_id = add_worker(s, W1)
    session_id = add_session(s)
    task_ids = s.submit_tasks(MASTER, session_id, specs(2), 0.0)
    ids = [worker_id, session_id, *task_ids]
    assert len(set(ids)) == len(ids)
    assert worker_id.startswith("w-core7-")
    assert session_id.startswith("s-core7-")
    assert all(task_id.startswith("t-core7-") for task_id in task_ids)


def test_new_scheduler_is_empty(sched: Scheduler) -> None:
    assert sched.statistics() == {
        "workerCount": 0,
        "idleWorkers": 0,
        "pendingTasks": 0,
        "activeTasks": 0,
        "activeSessions": 0,
        "workers": [],
    }
    assert sched.messages_to_send() == []
    assert sched.next_deadline() is None


# Worker registration.


def test_register_worker_replies_with_worker_id_and_server_stats(
    sched: Scheduler,
) -> None:
    worker_id = sched.register_worker(W1, 0.0)
    out = sched.messages_to_send()
    assert isinstance(out[0], Send)
    assert out[0].client == W1
    reply = out[0].message
    assert reply["type"] == "WORKER_REGISTERED"
    assert reply["workerId"] == worker_id
    assert reply["serverStats"] == {
        "workerCount": 1,
        "idleWorkers": 1,
        "pendingTasks": 0,
        "activeTasks": 0,
        "activeSessions": 0,
        "workers": [{"id": worker_id, "status": "idle", "stats": IDLE_STATS}],
    }


def test_worker_joining_broadcasts_stats_update(sched: Scheduler) -> None:
    add_worker(sched, W1)
    sched.register_worker(W2, 1.0)
    sched.tick(1.0)
    update = one(broadcasts(sched.messages_to_send()))
    assert update["type"] == "STATS_UPDATE"
    assert update["stats"]["workerCount"] == 2
    assert update["stats"]["idleWorkers"] == 2


def test_worker_leaving_broadcasts_stats_update(sched: Scheduler) -> None:
    add_worker(sched, W1)
    add_worker(sched, W2)
    sched.client_gone(W1, 1.0)
    sched.tick(1.0)
    update = one(broadcasts(sched.messages_to_send()))
    assert update["type"] == "STATS_UPDATE"
    assert update["stats"]["workerCount"] == 1


def test_register_twice_keeps_worker_id_without_broadcast(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    again = sched.register_worker(W1, 5.0)
    out = sched.messages_to_send()
    assert again == worker_id
    assert one(sent(out, "WORKER_REGISTERED", W1))["workerId"] == worker_id
    assert broadcasts(out) == []
    assert len(out) == 1
    assert counts(sched)["workerCount"] == 1


def test_register_twice_keeps_the_task_held(sched: Scheduler) -> None:
    """A busy worker that registers again neither loses nor gains a task."""
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    first, _ = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.messages_to_send()

    sched.register_worker(W1, 5.0)
    out = sched.messages_to_send()
    assert assigned(out) == []
    assert worker_row(sched, worker_id)["status"] == "busy"
    assert counts(sched)["pendingTasks"] == 1
    # It still holds the first task: it may report on it.
    sched.complete_task(W1, first, "url", 6.0)
    assert one(sent(sched.messages_to_send(), "TASK_COMPLETED"))["taskId"] == first


def test_register_twice_renews_the_lease(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)

    sched.register_worker(W1, 20.0)
    sched.messages_to_send()
    # next_deadline() may be early; a tick there does nothing and sets it right.
    sched.tick(30.0)

    assert sched.messages_to_send() == []
    assert sched.next_deadline() == 50.0


def test_worker_register_from_a_master_is_wrong_role(sched: Scheduler) -> None:
    add_session(sched, MASTER)
    error = assert_refused(sched, WrongRole, sched.register_worker, MASTER, 1.0)
    assert error.code == "wrong_role"
    assert "WORKER_REGISTER" in str(error)


def test_new_worker_picks_up_waiting_task(sched: Scheduler) -> None:
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, [spec()], 0.0)
    sched.messages_to_send()
    sched.register_worker(W1, 1.0)
    out = sched.messages_to_send()
    assert assigned(out, W1) == [task_id]
    # The worker hears that it is registered before it is given work.
    assert types(out) == ["WORKER_REGISTERED", "TASK_ASSIGNED"]


# Sessions.


def test_create_session_replies_with_session_id_and_server_stats(
    sched: Scheduler,
) -> None:
    session_id = sched.create_session(MASTER, 0.0)
    reply = one(sent(sched.messages_to_send(), "SESSION_CREATED", MASTER))
    assert reply["sessionId"] == session_id
    assert reply["serverStats"]["activeSessions"] == 1
    assert reply["serverStats"]["workerCount"] == 0


def test_session_created_reports_the_current_worker_count(sched: Scheduler) -> None:
    """The master splits its batch by ``workerCount``: it must be exact."""
    add_worker(sched, W1)
    add_worker(sched, W2)
    add_worker(sched, W3)
    sched.client_gone(W2, 1.0)
    sched.messages_to_send()
    sched.create_session(MASTER, 2.0)
    reply = one(sent(sched.messages_to_send(), "SESSION_CREATED"))
    assert reply["serverStats"]["workerCount"] == 2
    assert len(reply["serverStats"]["workers"]) == 2


def test_create_session_sends_nothing_else(sched: Scheduler) -> None:
    add_worker(sched, W1)
    sched.create_session(MASTER, 0.0)
    out = sched.messages_to_send()
    assert len(out) == 1


def test_one_master_may_open_several_sessions(sched: Scheduler) -> None:
    first = add_session(sched)
    second = add_session(sched)
    assert first != second
    assert counts(sched)["activeSessions"] == 2


def test_create_session_from_a_worker_is_wrong_role(sched: Scheduler) -> None:
    add_worker(sched, W1)
    error = assert_refused(sched, WrongRole, sched.create_session, W1, 1.0)
    assert "CREATE_SESSION" in str(error)


# Submitting tasks.


def test_submit_tasks_replies_with_count_and_total_pending(sched: Scheduler) -> None:
    session_id = add_session(sched)
    task_ids = sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    reply = one(sent(sched.messages_to_send(), "TASKS_SUBMITTED", MASTER))
    assert reply == {
        "type": "TASKS_SUBMITTED",
        "sessionId": session_id,
        "taskCount": 3,
        "totalPending": 3,
        "taskIds": task_ids,
    }
    assert len(task_ids) == 3
    assert counts(sched)["pendingTasks"] == 3


def test_total_pending_counts_every_session(sched: Scheduler) -> None:
    first = add_session(sched, MASTER)
    second = add_session(sched, MASTER_2)
    sched.submit_tasks(MASTER, first, specs(3), 0.0)
    sched.submit_tasks(MASTER_2, second, specs(2), 0.0)
    reply = one(sent(sched.messages_to_send(), "TASKS_SUBMITTED", MASTER_2))
    assert reply["taskCount"] == 2
    assert reply["totalPending"] == 5


def test_total_pending_leaves_out_tasks_held_by_busy_workers(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.messages_to_send()
    sched.submit_tasks(MASTER, session_id, specs(2, "g"), 1.0)
    reply = one(sent(sched.messages_to_send(), "TASKS_SUBMITTED"))
    assert reply["taskCount"] == 2
    assert reply["totalPending"] == 2


def test_submit_to_an_unknown_session_is_refused(sched: Scheduler) -> None:
    add_session(sched)
    error = assert_refused(
        sched, UnknownSession, sched.submit_tasks, MASTER, "s-nope", specs(1), 1.0
    )
    assert error.code == "unknown_session"


def test_submit_to_another_masters_session_is_refused(sched: Scheduler) -> None:
    session_id = add_session(sched, MASTER)
    add_session(sched, MASTER_2)
    assert_refused(
        sched, UnknownSession, sched.submit_tasks, MASTER_2, session_id, specs(1), 1.0
    )


def test_submit_from_a_worker_is_refused(sched: Scheduler) -> None:
    session_id = add_session(sched, MASTER)
    add_worker(sched, W1)
    assert_refused(
        sched, UnknownSession, sched.submit_tasks, W1, session_id, specs(1), 1.0
    )


def test_submit_to_a_finished_session_is_session_closed(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, [spec()], 0.0)
    sched.complete_task(W1, task_id, "url", 1.0)
    error = assert_refused(
        sched, SessionClosed, sched.submit_tasks, MASTER, session_id, specs(1), 2.0
    )
    assert error.code == "session_closed"


@pytest.mark.parametrize("size", [-1, 2**53])
def test_submit_with_a_size_out_of_range_is_refused_whole(
    sched: Scheduler, size: int
) -> None:
    """One bad size refuses the batch: none of its tasks is queued."""
    add_worker(sched, W1)
    session_id = add_session(sched)
    batch = [spec("a.jpg", 1), spec("b.jpg", size), spec("c.jpg", 3)]
    error = assert_refused(
        sched, InvalidField, sched.submit_tasks, MASTER, session_id, batch, 1.0
    )
    assert "tasks[1].size" in str(error)


def test_submit_to_an_unfinished_session_adds_to_it(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (first,) = sched.submit_tasks(MASTER, session_id, [spec("a.jpg")], 0.0)
    sched.submit_tasks(MASTER, session_id, [spec("b.jpg")], 0.0)
    sched.messages_to_send()
    sched.complete_task(W1, first, "url", 1.0)
    out = sched.messages_to_send()
    assert one(sent(out, "TASK_COMPLETED"))["progress"] == {
        "completed": 1,
        "failed": 0,
        "total": 2,
    }
    assert sent(out, "SESSION_COMPLETED") == []


def test_submitting_no_tasks_keeps_the_session_open(sched: Scheduler) -> None:
    session_id = add_session(sched)
    assert sched.submit_tasks(MASTER, session_id, [], 0.0) == []
    reply = one(sent(sched.messages_to_send(), "TASKS_SUBMITTED"))
    assert reply["taskCount"] == 0
    assert counts(sched)["activeSessions"] == 1
    sched.submit_tasks(MASTER, session_id, specs(1), 1.0)
    assert counts(sched)["pendingTasks"] == 1


# Dispatch.


def test_idle_worker_gets_a_task_at_once_with_its_payload(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    task = spec("cat.png", size=5, payload_key="spool-key-7", mime_type="image/png")
    (task_id,) = sched.submit_tasks(MASTER, session_id, [task], 0.0)
    send = one(sends(sched.messages_to_send(), "TASK_ASSIGNED", W1))
    assert send.message == {
        "type": "TASK_ASSIGNED",
        "task": {
            "id": task_id,
            "filename": "cat.png",
            "mimeType": "image/png",
            "size": 5,
        },
    }
    # The file travels beside the message: the bridge splices it in.
    assert send.payload_key == "spool-key-7"


def test_tasks_submitted_is_sent_before_the_assignment(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    out = sched.messages_to_send()
    assert len(out) == 2
    assert types(out) == ["TASKS_SUBMITTED", "TASK_ASSIGNED"]


def test_only_the_assignment_carries_a_payload(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.complete_task(W1, task_id, "url", 1.0)
    out = sched.messages_to_send()
    carrying = [i for i in out if isinstance(i, Send) and i.payload_key is not None]
    assert [i.message["type"] for i in carrying] == ["TASK_ASSIGNED"]


def test_a_worker_holds_one_task_at_a_time(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    assert len(assigned(sched.messages_to_send(), W1)) == 1
    assert counts(sched) == {
        "workerCount": 1,
        "idleWorkers": 0,
        "pendingTasks": 2,
        "activeTasks": 1,
        "activeSessions": 1,
    }
    assert worker_row(sched, worker_id)["status"] == "busy"


def test_every_idle_worker_gets_a_task(sched: Scheduler) -> None:
    for worker in (W1, W2, W3):
        add_worker(sched, worker)
    session_id = add_session(sched)
    task_ids = sched.submit_tasks(MASTER, session_id, specs(5), 0.0)
    out = sched.messages_to_send()
    assert assigned(out, W1) == [task_ids[0]]
    assert assigned(out, W2) == [task_ids[1]]
    assert assigned(out, W3) == [task_ids[2]]
    assert counts(sched)["pendingTasks"] == 2
    assert counts(sched)["idleWorkers"] == 0


def test_tasks_of_one_session_go_out_in_submission_order(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(4), 0.0)
    assert serve_one_by_one(sched, W1, 4) == ["f0.jpg", "f1.jpg", "f2.jpg", "f3.jpg"]


def test_longest_idle_worker_is_served_first(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)
    add_worker(sched, W2, now=1.0)
    add_worker(sched, W3, now=2.0)
    session_id = add_session(sched)
    (first,) = sched.submit_tasks(MASTER, session_id, specs(1), 3.0)
    assert assigned(sched.messages_to_send(), W1) == [first]

    # W1 is now the most recently idle of the three.
    sched.complete_task(W1, first, "url", 4.0)
    other = add_session(sched, MASTER_2)
    second, third = sched.submit_tasks(MASTER_2, other, specs(2, "g"), 5.0)
    out = sched.messages_to_send()
    assert assigned(out, W2) == [second]
    assert assigned(out, W3) == [third]
    assert assigned(out, W1) == []


def test_sessions_are_served_round_robin(sched: Scheduler) -> None:
    a = add_session(sched, MASTER)
    b = add_session(sched, MASTER_2)
    c = add_session(sched, MASTER_3)
    sched.submit_tasks(MASTER, a, specs(3, "a"), 0.0)
    sched.submit_tasks(MASTER_2, b, specs(3, "b"), 0.0)
    sched.submit_tasks(MASTER_3, c, specs(1, "c"), 0.0)
    sched.messages_to_send()
    sched.register_worker(W1, 1.0)
    order = serve_one_by_one(sched, W1, 7)
    assert order == [
        "a0.jpg",
        "b0.jpg",
        "c0.jpg",
        "a1.jpg",
        "b1.jpg",
        "a2.jpg",
        "b2.jpg",
    ]


def test_a_session_back_from_a_pause_waits_behind_those_ready_meanwhile(
    sched: Scheduler,
) -> None:
    """
    Among sessions never served, the one that became ready first goes first;
    a paused session becomes ready again when it is resumed.

    """
    a = add_session(sched, MASTER)
    b = add_session(sched, MASTER_2)
    sched.submit_tasks(MASTER, a, specs(2, "a"), 0.0)
    sched.client_gone(MASTER, 0.5)
    sched.submit_tasks(MASTER_2, b, specs(2, "b"), 1.0)
    sched.resume_session(MASTER_3, a, 0, 1.5)
    sched.messages_to_send()
    sched.register_worker(W1, 2.0)
    order = serve_one_by_one(sched, W1, 4)
    assert order == ["b0.jpg", "a0.jpg", "b1.jpg", "a1.jpg"]


def test_a_session_that_ran_dry_takes_its_turn_by_when_it_was_last_served(
    sched: Scheduler,
) -> None:
    a = add_session(sched, MASTER)
    b = add_session(sched, MASTER_2)
    c = add_session(sched, MASTER_3)
    sched.submit_tasks(MASTER, a, specs(1, "a"), 0.0)
    sched.submit_tasks(MASTER_2, b, specs(2, "b"), 0.0)
    sched.submit_tasks(MASTER_3, c, specs(2, "c"), 0.0)
    sched.messages_to_send()
    # Served in turn a, b, c; a has nothing left (its file is still out).
    for worker in (W2, W3, W1):
        sched.register_worker(worker, 1.0)
    out = sched.messages_to_send()
    assert [
        one(sent(out, "TASK_ASSIGNED", w))["task"]["filename"] for w in (W2, W3)
    ] == [
        "a0.jpg",
        "b0.jpg",
    ]
    # a was served longest ago: its new file goes before b's and c's next.
    sched.submit_tasks(MASTER, a, specs(1, "again"), 2.0)
    out = sched.messages_to_send() + out
    assert serve_one_by_one_from(sched, W1, out, 3) == [
        "c0.jpg",
        "again0.jpg",
        "b1.jpg",
    ]


def test_small_session_is_not_starved_when_the_worker_comes_later(
    sched: Scheduler,
) -> None:
    big = add_session(sched, MASTER)
    small = add_session(sched, MASTER_2)
    sched.submit_tasks(MASTER, big, specs(500, "big"), 0.0)
    sched.submit_tasks(MASTER_2, small, specs(1, "small"), 0.0)
    sched.messages_to_send()
    sched.register_worker(W1, 1.0)
    assert "small0.jpg" in serve_one_by_one(sched, W1, 2)


def test_small_session_is_not_starved_by_a_busy_worker_on_a_big_one(
    sched: Scheduler,
) -> None:
    """
    A 500-task session already feeds the only worker; a 1-task session
    submitted next gets its task assigned no later than second.

    """
    add_worker(sched, W1)
    big = add_session(sched, MASTER)
    small = add_session(sched, MASTER_2)
    sched.submit_tasks(MASTER, big, specs(500, "big"), 0.0)
    sched.submit_tasks(MASTER_2, small, specs(1, "small"), 0.0)
    assert "small0.jpg" in serve_one_by_one(sched, W1, 2)


# Completing tasks.


def test_complete_task_tells_the_master(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, _ = sched.submit_tasks(
        MASTER, session_id, [spec("a.jpg"), spec("b.jpg")], 0.0
    )
    sched.messages_to_send()
    sched.complete_task(W1, first, "https://img.example/a", 1.0)
    message = one(sent(sched.messages_to_send(), "TASK_COMPLETED", MASTER))
    assert message == {
        "type": "TASK_COMPLETED",
        "taskId": first,
        "filename": "a.jpg",
        "resultUrl": "https://img.example/a",
        "progress": {"completed": 1, "failed": 0, "total": 2},
    }


def test_complete_task_counts_in_worker_stats(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    first, second = sched.submit_tasks(
        MASTER, session_id, [spec("a", 1000), spec("b", 24)], 0.0
    )
    sched.complete_task(W1, first, "url", 1.0)
    sched.complete_task(W1, second, "url", 2.0)
    row = worker_row(sched, worker_id)
    assert row == {
        "id": worker_id,
        "status": "idle",
        "stats": {"completed": 2, "failed": 0, "totalBytes": 1024},
    }


def test_worker_that_completes_gets_the_next_task(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, second = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.messages_to_send()
    sched.complete_task(W1, first, "url", 1.0)
    out = sched.messages_to_send()
    assert len(out) == 2
    assert types(out) == ["TASK_COMPLETED", "TASK_ASSIGNED"]
    assert assigned(out, W1) == [second]


def test_worker_that_completes_with_nothing_pending_becomes_idle(
    sched: Scheduler,
) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.complete_task(W1, task_id, "url", 1.0)
    assert worker_row(sched, worker_id)["status"] == "idle"
    assert counts(sched)["idleWorkers"] == 1
    assert counts(sched)["activeTasks"] == 0


# Failing tasks and retries.


def test_failed_attempt_is_retried_without_telling_the_master(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.messages_to_send()
    sched.fail_task(W1, task_id, "HTTP 500", 1.0)
    out = sched.messages_to_send()
    assert sent(out, "TASK_FAILED") == []
    assert [item for item in out if isinstance(item, Send)] == sends(
        out, "TASK_ASSIGNED", W1
    )
    assert assigned(out, W1) == [task_id]


def test_task_fails_for_good_after_max_attempts(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, [spec("a.jpg")], 0.0)
    sched.fail_task(W1, task_id, "HTTP 500", 1.0)
    sched.fail_task(W1, task_id, "HTTP 502", 2.0)
    sched.messages_to_send()
    sched.fail_task(W1, task_id, "quota exceeded", 3.0)
    out = sched.messages_to_send()
    message = one(sent(out, "TASK_FAILED", MASTER))
    assert message["taskId"] == task_id
    assert message["filename"] == "a.jpg"
    assert message["error"].startswith("gave up after 3 attempts")
    assert "quota exceeded" in message["error"]
    assert message["progress"] == {"completed": 0, "failed": 1, "total": 1}
    assert assigned(out) == []


def test_every_failed_attempt_counts_in_worker_stats(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, [spec("a", 50)], 0.0)
    for attempt in range(3):
        sched.fail_task(W1, task_id, "boom", float(attempt))
    assert worker_row(sched, worker_id)["stats"] == {
        "completed": 0,
        "failed": 3,
        "totalBytes": 0,
    }


def test_max_attempts_is_configurable() -> None:
    s = Scheduler(max_attempts=1)
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.fail_task(W1, task_id, "boom", 1.0)
    message = one(sent(s.messages_to_send(), "TASK_FAILED"))
    assert message["error"].startswith("gave up after 1 attempts")


def test_a_retry_goes_to_the_front_of_its_session_queue(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, second, _ = sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    sched.messages_to_send()
    sched.fail_task(W1, first, "boom", 1.0)
    assert assigned(sched.messages_to_send(), W1) == [first]
    sched.complete_task(W1, first, "url", 2.0)
    assert assigned(sched.messages_to_send(), W1) == [second]


def test_a_retry_goes_to_the_longest_idle_worker(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    add_worker(sched, W2, now=1.0)
    sched.fail_task(W1, task_id, "boom", 2.0)
    out = sched.messages_to_send()
    assert assigned(out, W2) == [task_id]
    assert assigned(out, W1) == []


def test_pending_count_includes_a_requeued_task(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, _ = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.fail_task(W1, first, "boom", 1.0)
    # The retry went straight back to W1: one held, one pending.
    assert counts(sched)["pendingTasks"] == 1
    assert counts(sched)["activeTasks"] == 1


# Workers that go away.


def test_worker_disconnect_requeues_its_task(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.messages_to_send()
    sched.client_gone(W1, 1.0)
    out = sched.messages_to_send()
    assert sends(out, "TASK_FAILED") == []
    assert counts(sched)["pendingTasks"] == 1
    assert counts(sched)["workerCount"] == 0
    sched.register_worker(W2, 2.0)
    assert assigned(sched.messages_to_send(), W2) == [task_id]


def test_worker_disconnect_uses_up_an_attempt() -> None:
    s = Scheduler(max_attempts=2)
    add_worker(s, W1)
    add_worker(s, W2)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.client_gone(W1, 1.0)
    assert assigned(s.messages_to_send(), W2) == [task_id]
    s.fail_task(W2, task_id, "boom", 2.0)
    message = one(sent(s.messages_to_send(), "TASK_FAILED"))
    assert message["error"].startswith("gave up after 2 attempts")


def test_task_that_kills_every_worker_fails(sched: Scheduler) -> None:
    for worker in (W1, W2, W3):
        add_worker(sched, worker)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, [spec("bomb.jpg")], 0.0)
    out = sched.messages_to_send()
    for now, (worker, successor) in enumerate([(W1, W2), (W2, W3)], start=1):
        assert assigned(out, worker) == [task_id]
        sched.client_gone(worker, float(now))
        out = sched.messages_to_send()
        assert assigned(out, successor) == [task_id]
        assert sent(out, "TASK_FAILED") == []
    sched.client_gone(W3, 3.0)
    out = sched.messages_to_send()
    message = one(sent(out, "TASK_FAILED", MASTER))
    assert message["taskId"] == task_id
    assert message["error"].startswith("gave up after 3 attempts")
    assert "worker disconnected" in message["error"]
    completed = one(sent(out, "SESSION_COMPLETED", MASTER))
    assert completed["stats"] == {"completed": 0, "failed": 1, "total": 1}
    assert counts(sched) == {
        "workerCount": 0,
        "idleWorkers": 0,
        "pendingTasks": 0,
        "activeTasks": 0,
        "activeSessions": 0,
    }


def test_idle_worker_disconnect_only_updates_stats(sched: Scheduler) -> None:
    add_worker(sched, W1)
    add_worker(sched, W2)
    add_session(sched)
    sched.client_gone(W1, 1.0)
    sched.tick(1.0)
    out = sched.messages_to_send()
    assert len(out) == 1
    assert one(broadcasts(out))["stats"]["workerCount"] == 1
    assert counts(sched)["idleWorkers"] == 1


def test_gone_worker_can_no_longer_report(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(W1, 1.0)
    assert_refused(sched, WrongRole, sched.complete_task, W1, task_id, "url", 2.0)


def test_unknown_client_gone_is_harmless(sched: Scheduler) -> None:
    add_worker(sched, W1)
    add_session(sched)
    before = snapshot(sched)
    sched.client_gone(client(99), 1.0)
    assert sched.messages_to_send() == []
    assert snapshot(sched) == before


# Worker silence.


def test_next_deadline_is_none_without_workers(sched: Scheduler) -> None:
    add_session(sched)
    assert sched.next_deadline() is None


def test_next_deadline_follows_the_oldest_sign_of_life(sched: Scheduler) -> None:
    """
    next_deadline() may be early, never late: a tick at it finds nothing to
    do and moves it on to the next real deadline.

    """
    add_worker(sched, W1, now=0.0)
    add_worker(sched, W2, now=10.0)
    assert sched.next_deadline() == 30.0

    sched.heartbeat(W1, 20.0)
    sched.tick(30.0)
    assert sched.messages_to_send() == []
    assert sched.next_deadline() == 40.0

    sched.client_gone(W2, 31.0)
    sched.tick(40.0)
    assert disconnects(sched.messages_to_send()) == []
    assert sched.next_deadline() == 50.0

    sched.client_gone(W1, 41.0)
    sched.tick(50.0)
    assert sched.next_deadline() is None


def test_next_deadline_uses_the_configured_timeout() -> None:
    s = Scheduler(worker_timeout=5.0)
    add_worker(s, W1, now=100.0)
    assert s.next_deadline() == 105.0


def test_tick_before_the_deadline_does_nothing(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)
    before = snapshot(sched)
    sched.tick(29.9)
    assert sched.messages_to_send() == []
    assert snapshot(sched) == before


def test_expire_at_the_deadline_drops_the_silent_worker(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)
    add_worker(sched, W2, now=10.0)
    sched.tick(30.0)
    out = sched.messages_to_send()
    dropped = one(disconnects(out))
    assert dropped.client == W1
    assert "30" in dropped.reason
    assert one(broadcasts(out))["stats"]["workerCount"] == 1
    assert counts(sched)["workerCount"] == 1
    assert sched.next_deadline() == 40.0


def test_expire_requeues_the_silent_workers_task(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    add_worker(sched, W2, now=20.0)
    sched.tick(30.0)
    out = sched.messages_to_send()
    assert one(disconnects(out)).client == W1
    assert assigned(out, W2) == [task_id]
    assert sent(out, "TASK_FAILED") == []


def test_expired_worker_uses_up_an_attempt() -> None:
    s = Scheduler(max_attempts=1)
    add_worker(s, W1, now=0.0)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.tick(30.0)
    message = one(sent(s.messages_to_send(), "TASK_FAILED", MASTER))
    assert message["taskId"] == task_id
    assert "silent" in message["error"]


def test_seen_renews_the_lease(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)
    sched.seen(W1, 25.0)
    sched.tick(30.0)
    assert sched.messages_to_send() == []
    assert sched.next_deadline() == 55.0


def test_heartbeat_renews_the_lease_and_sends_nothing(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)
    sched.heartbeat(W1, 25.0)
    assert sched.messages_to_send() == []
    sched.tick(54.9)
    assert sched.messages_to_send() == []
    sched.tick(55.0)
    assert one(disconnects(sched.messages_to_send())).client == W1


def test_a_busy_worker_keeps_its_task_while_it_heartbeats(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    for now in (10.0, 20.0, 30.0, 40.0):
        sched.heartbeat(W1, now)
        sched.tick(now + 29.0)
    sched.messages_to_send()
    sched.complete_task(W1, task_id, "url", 69.0)
    assert one(sent(sched.messages_to_send(), "TASK_COMPLETED"))["taskId"] == task_id


def test_seen_from_a_non_worker_is_harmless(sched: Scheduler) -> None:
    add_session(sched)
    before = snapshot(sched)
    sched.seen(MASTER, 5.0)
    sched.seen(client(99), 5.0)
    assert sched.messages_to_send() == []
    assert snapshot(sched) == before


def test_heartbeat_from_a_non_worker_is_wrong_role(sched: Scheduler) -> None:
    add_session(sched)
    assert_refused(sched, WrongRole, sched.heartbeat, client(99), 1.0)
    assert_refused(sched, WrongRole, sched.heartbeat, MASTER, 1.0)


# Masters that go away, with resume_grace=0: the session ends at once.


def test_master_disconnect_drops_its_pending_tasks(no_grace: Scheduler) -> None:
    add_worker(no_grace, W1)
    session_id = add_session(no_grace)
    other = add_session(no_grace, MASTER_2)
    no_grace.submit_tasks(MASTER, session_id, specs(3), 0.0)
    no_grace.submit_tasks(MASTER_2, other, specs(2, "o"), 0.0)
    assert counts(no_grace)["pendingTasks"] == 4
    no_grace.client_gone(MASTER, 1.0)
    assert counts(no_grace)["pendingTasks"] == 2
    assert counts(no_grace)["activeSessions"] == 1


def test_master_disconnect_cancels_held_tasks(no_grace: Scheduler) -> None:
    worker_id = add_worker(no_grace, W1)
    session_id = add_session(no_grace)
    (task_id, _) = no_grace.submit_tasks(MASTER, session_id, specs(2), 0.0)
    no_grace.messages_to_send()
    no_grace.client_gone(MASTER, 1.0)
    out = no_grace.messages_to_send()
    message = one(sent(out, "TASK_CANCELLED", W1))
    assert message["taskId"] == task_id
    assert message["reason"]
    assert len(out) == 1
    # The worker is still busy uploading until it reports.
    assert worker_row(no_grace, worker_id)["status"] == "busy"
    assert counts(no_grace) == {
        "workerCount": 1,
        "idleWorkers": 0,
        "pendingTasks": 0,
        "activeTasks": 1,
        "activeSessions": 0,
    }


def test_worker_with_a_cancelled_task_gets_no_new_work_before_it_reports(
    no_grace: Scheduler,
) -> None:
    add_worker(no_grace, W1)
    session_id = add_session(no_grace)
    no_grace.submit_tasks(MASTER, session_id, specs(1), 0.0)
    no_grace.client_gone(MASTER, 1.0)
    other = add_session(no_grace, MASTER_2)
    no_grace.submit_tasks(MASTER_2, other, specs(1, "o"), 2.0)
    assert assigned(no_grace.messages_to_send()) == []
    assert counts(no_grace)["pendingTasks"] == 1


def test_report_on_a_cancelled_task_is_accepted_silently(no_grace: Scheduler) -> None:
    worker_id = add_worker(no_grace, W1)
    session_id = add_session(no_grace)
    (task_id,) = no_grace.submit_tasks(MASTER, session_id, specs(1), 0.0)
    no_grace.client_gone(MASTER, 1.0)
    no_grace.messages_to_send()
    no_grace.complete_task(W1, task_id, "url", 2.0)
    assert no_grace.messages_to_send() == []
    assert worker_row(no_grace, worker_id)["status"] == "idle"
    assert counts(no_grace)["activeTasks"] == 0


def test_worker_freed_from_a_cancelled_task_gets_new_work(no_grace: Scheduler) -> None:
    add_worker(no_grace, W1)
    session_id = add_session(no_grace)
    (task_id,) = no_grace.submit_tasks(MASTER, session_id, specs(1), 0.0)
    no_grace.client_gone(MASTER, 1.0)
    other = add_session(no_grace, MASTER_2)
    (other_task,) = no_grace.submit_tasks(MASTER_2, other, specs(1, "o"), 2.0)
    no_grace.messages_to_send()
    no_grace.complete_task(W1, task_id, "url", 3.0)
    out = no_grace.messages_to_send()
    assert len(out) == 1
    assert assigned(out, W1) == [other_task]


def test_failure_of_a_cancelled_task_is_accepted_silently(no_grace: Scheduler) -> None:
    worker_id = add_worker(no_grace, W1)
    session_id = add_session(no_grace)
    (task_id,) = no_grace.submit_tasks(MASTER, session_id, specs(1), 0.0)
    no_grace.client_gone(MASTER, 1.0)
    no_grace.messages_to_send()
    no_grace.fail_task(W1, task_id, "boom", 2.0)
    assert no_grace.messages_to_send() == []
    assert worker_row(no_grace, worker_id)["status"] == "idle"
    # Not retried: the task is gone.
    assert counts(no_grace)["pendingTasks"] == 0


def test_waiting_on_a_cancelled_task_is_accepted_silently(no_grace: Scheduler) -> None:
    worker_id = add_worker(no_grace, W1)
    session_id = add_session(no_grace)
    (task_id,) = no_grace.submit_tasks(MASTER, session_id, specs(1), 0.0)
    no_grace.client_gone(MASTER, 1.0)
    no_grace.messages_to_send()
    no_grace.report_waiting(W1, task_id, 60.0, 1_700_000_000_000, 2.0)
    assert no_grace.messages_to_send() == []
    assert worker_row(no_grace, worker_id)["status"] == "busy"


def test_second_report_on_a_cancelled_task_is_refused(no_grace: Scheduler) -> None:
    add_worker(no_grace, W1)
    session_id = add_session(no_grace)
    (task_id,) = no_grace.submit_tasks(MASTER, session_id, specs(1), 0.0)
    no_grace.client_gone(MASTER, 1.0)
    no_grace.complete_task(W1, task_id, "url", 2.0)
    assert_refused(
        no_grace, TaskNotHeld, no_grace.complete_task, W1, task_id, "url", 3.0
    )
    assert_refused(no_grace, TaskNotHeld, no_grace.fail_task, W1, task_id, "boom", 3.0)


def test_worker_holding_a_cancelled_task_may_disconnect(no_grace: Scheduler) -> None:
    add_worker(no_grace, W1)
    session_id = add_session(no_grace)
    no_grace.submit_tasks(MASTER, session_id, specs(1), 0.0)
    no_grace.client_gone(MASTER, 1.0)
    no_grace.messages_to_send()
    no_grace.client_gone(W1, 2.0)
    no_grace.tick(2.0)
    out = no_grace.messages_to_send()
    assert [type(item) for item in out] == [Broadcast]
    assert counts(no_grace) == {
        "workerCount": 0,
        "idleWorkers": 0,
        "pendingTasks": 0,
        "activeTasks": 0,
        "activeSessions": 0,
    }


def test_master_disconnect_after_its_session_finished_is_quiet(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.complete_task(W1, task_id, "url", 1.0)
    sched.messages_to_send()
    sched.client_gone(MASTER, 2.0)
    assert sched.messages_to_send() == []
    assert counts(sched)["activeSessions"] == 0


def test_master_that_left_is_forgotten(no_grace: Scheduler) -> None:
    """Its old sessions are gone, and the connection may now be a worker."""
    session_id = add_session(no_grace)
    no_grace.client_gone(MASTER, 1.0)
    assert_refused(
        no_grace,
        UnknownSession,
        no_grace.submit_tasks,
        MASTER,
        session_id,
        specs(1),
        2.0,
    )
    no_grace.register_worker(MASTER, 3.0)
    assert counts(no_grace)["workerCount"] == 1


# Masters that go away, with a grace: the session waits for RESUME_SESSION.


def test_master_disconnect_keeps_its_pending_tasks_for_the_grace(
    sched: Scheduler,
) -> None:
    session_id = add_session(sched)
    other = add_session(sched, MASTER_2)
    sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    sched.submit_tasks(MASTER_2, other, specs(2, "o"), 0.0)
    sched.messages_to_send()

    sched.client_gone(MASTER, 1.0)

    assert sched.messages_to_send() == []
    assert counts(sched)["pendingTasks"] == 5
    assert counts(sched)["activeSessions"] == 2


def test_master_disconnect_leaves_held_tasks_with_their_workers(
    sched: Scheduler,
) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.messages_to_send()

    sched.client_gone(MASTER, 1.0)
    assert sent(sched.messages_to_send(), "TASK_CANCELLED") == []
    assert worker_row(sched, worker_id)["status"] == "busy"

    sched.complete_task(W1, task_id, "url", 2.0)
    assert sched.counters.tasks_completed == 1
    assert sched.counters.reports_refused == 0


def test_paused_session_hands_out_no_new_task(sched: Scheduler) -> None:
    """Its worker, once free, serves the other sessions only."""
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, _ = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    other = add_session(sched, MASTER_2)
    (other_task,) = sched.submit_tasks(MASTER_2, other, specs(1, "o"), 0.0)
    sched.client_gone(MASTER, 1.0)
    sched.messages_to_send()

    sched.complete_task(W1, first, "url", 2.0)
    assert assigned(sched.messages_to_send(), W1) == [other_task]

    sched.complete_task(W1, other_task, "url", 3.0)
    assert assigned(sched.messages_to_send()) == []
    assert counts(sched)["pendingTasks"] == 1


def test_retry_of_a_paused_sessions_task_waits_for_the_master(
    sched: Scheduler,
) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(MASTER, 1.0)
    sched.messages_to_send()

    sched.fail_task(W1, task_id, "boom", 2.0)

    assert assigned(sched.messages_to_send()) == []
    assert worker_row(sched, worker_id)["status"] == "idle"
    assert counts(sched)["pendingTasks"] == 1


def test_outcomes_while_the_master_is_away_are_sent_to_nobody(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(MASTER, 1.0)
    sched.messages_to_send()

    sched.complete_task(W1, task_id, "url", 2.0)

    assert sched.messages_to_send() == []


def test_session_is_dropped_when_the_grace_ends() -> None:
    s = patient(resume_grace=30.0)
    add_worker(s, W1)
    session_id = add_session(s)
    first, _, _ = s.submit_tasks(MASTER, session_id, specs(3), 0.0)
    s.client_gone(MASTER, 1.0)
    s.messages_to_send()

    s.tick(30.9)
    assert s.messages_to_send() == []
    assert counts(s)["pendingTasks"] == 2

    s.tick(31.0)
    out = s.messages_to_send()
    assert one(sent(out, "TASK_CANCELLED", W1)) == {
        "type": "TASK_CANCELLED",
        "taskId": first,
        "reason": "the master closed its session",
    }
    assert counts(s)["pendingTasks"] == 0
    assert counts(s)["activeSessions"] == 0
    assert s.counters.tasks_cancelled == 3


def test_next_deadline_covers_the_end_of_the_grace() -> None:
    s = patient(resume_grace=30.0)
    add_worker(s, W1)
    session_id = add_session(s)
    s.submit_tasks(MASTER, session_id, specs(1), 0.0)

    s.client_gone(MASTER, 1.0)

    assert s.next_deadline() == 31.0


@pytest.mark.parametrize("kind", ["completed", "failed"])
def test_report_on_a_task_of_a_session_dropped_after_the_grace_is_discarded(
    kind: str,
) -> None:
    s = patient(resume_grace=30.0)
    worker_id = add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.client_gone(MASTER, 1.0)
    s.tick(31.0)
    s.messages_to_send()

    _report(kind, s)(W1, task_id, 32.0)

    assert s.messages_to_send() == []
    assert s.counters.reports_refused == 0
    assert worker_row(s, worker_id)["status"] == "idle"


def test_master_that_left_may_take_its_session_back_from_a_new_connection(
    sched: Scheduler,
) -> None:
    session_id = add_session(sched)
    sched.client_gone(MASTER, 1.0)

    resume(sched, MASTER_2, session_id, 2.0)

    sched.submit_tasks(MASTER_2, session_id, specs(1), 3.0)
    assert one(sent(sched.messages_to_send(), "TASKS_SUBMITTED", MASTER_2))
    assert_refused(
        sched, UnknownSession, sched.submit_tasks, MASTER, session_id, specs(1), 4.0
    )


def test_grace_runs_from_the_masters_loss_not_from_its_bridges() -> None:
    s = Scheduler("t", resume_grace=30.0)
    session_id = add_session(s)
    s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.client_gone(MASTER, 0.0)

    s.bridge_gone(BRIDGE, 20.0)
    s.tick(30.0)

    assert_refused(
        s,
        UnknownSession,
        s.resume_session,
        client(5, OTHER_BRIDGE),
        session_id,
        0,
        31.0,
    )


# Bridges that go away.


def test_bridge_gone_forgets_only_the_clients_of_that_bridge(
    no_grace: Scheduler,
) -> None:
    lost_worker = client(1, OTHER_BRIDGE)
    lost_master = client(2, OTHER_BRIDGE)
    kept_id = add_worker(no_grace, W1)
    add_worker(no_grace, lost_worker)
    kept_session = add_session(no_grace, MASTER)
    lost_session = add_session(no_grace, lost_master)
    no_grace.submit_tasks(lost_master, lost_session, specs(3, "lost"), 0.0)
    no_grace.messages_to_send()

    no_grace.bridge_gone(OTHER_BRIDGE, 1.0)
    stats = no_grace.statistics()
    assert stats["workerCount"] == 1
    assert [w["id"] for w in stats["workers"]] == [kept_id]
    assert stats["activeSessions"] == 1
    assert stats["pendingTasks"] == 0
    # The clients of the other bridge still work.
    no_grace.heartbeat(W1, 2.0)
    no_grace.submit_tasks(MASTER, kept_session, specs(1), 2.0)
    # The lost ones do not.
    assert_refused(no_grace, WrongRole, no_grace.heartbeat, lost_worker, 3.0)


def test_bridge_gone_requeues_tasks_of_its_workers(sched: Scheduler) -> None:
    lost_worker = client(1, OTHER_BRIDGE)
    add_worker(sched, lost_worker)
    session_id = add_session(sched, MASTER)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    add_worker(sched, W1)
    sched.bridge_gone(OTHER_BRIDGE, 1.0)
    sched.tick(1.0)
    out = sched.messages_to_send()
    assert assigned(out, W1) == [task_id]
    assert one(broadcasts(out))["stats"]["workerCount"] == 1


def test_bridge_gone_sends_nothing_to_its_own_clients() -> None:
    """
    Clients of a lost bridge are gone: no message may be addressed to them,
    whatever order the scheduler forgets them in.

    """
    s = Scheduler(max_attempts=1)
    add_worker(s, W1)
    session_id = add_session(s, MASTER)
    s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.messages_to_send()
    s.bridge_gone(BRIDGE, 1.0)
    out = s.messages_to_send()
    to_lost = [i for i in out if isinstance(i, Send) and i.client[0] == BRIDGE]
    assert to_lost == []
    assert counts(s) == {
        "workerCount": 0,
        "idleWorkers": 0,
        "pendingTasks": 0,
        "activeTasks": 0,
        "activeSessions": 0,
    }


def test_unknown_bridge_gone_is_harmless(sched: Scheduler) -> None:
    add_worker(sched, W1)
    add_session(sched)
    before = snapshot(sched)
    sched.bridge_gone(b"never-seen", 1.0)
    assert sched.messages_to_send() == []
    assert snapshot(sched) == before


def test_bridge_gone_uses_up_the_attempts_of_its_workers_tasks() -> None:
    s = Scheduler(max_attempts=1)
    add_worker(s, FAR_WORKER)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.messages_to_send()

    s.bridge_gone(OTHER_BRIDGE, 1.0)

    message = one(sent(s.messages_to_send(), "TASK_FAILED", MASTER))
    assert message["taskId"] == task_id
    assert message["error"] == "gave up after 1 attempts: worker's bridge lost"


def test_bridge_gone_pauses_the_sessions_of_its_masters(sched: Scheduler) -> None:
    lost_master = client(2, OTHER_BRIDGE)
    session_id = add_session(sched, lost_master)
    sched.submit_tasks(lost_master, session_id, specs(3), 0.0)
    sched.messages_to_send()

    sched.bridge_gone(OTHER_BRIDGE, 1.0)
    sched.register_worker(W1, 2.0)

    assert assigned(sched.messages_to_send()) == []
    assert counts(sched)["pendingTasks"] == 3
    assert counts(sched)["activeSessions"] == 1


# Bridges that come back: bridge_joined() matches the core's clients with the
# bridge's claims.


def test_bridge_joined_lets_a_claimed_worker_keep_its_task(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.messages_to_send()

    sched.bridge_joined(BRIDGE, [ClientClaim(1), ClientClaim(11, holds=task_id)], 1.0)
    assert assigned(sched.messages_to_send()) == []
    assert worker_row(sched, worker_id)["status"] == "busy"

    sched.complete_task(W1, task_id, "url", 2.0)
    assert one(sent(sched.messages_to_send(), "TASK_COMPLETED", MASTER))


def test_bridge_joined_sends_again_an_assignment_that_never_arrived(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, [spec("a.jpg")], 0.0)
    sched.messages_to_send()

    sched.bridge_joined(BRIDGE, [ClientClaim(1), ClientClaim(11)], 1.0)

    send = one(sends(sched.messages_to_send(), "TASK_ASSIGNED", W1))
    assert send.message["task"]["id"] == task_id
    assert send.payload_key == "spool-a.jpg"


def test_assignment_sent_again_is_not_a_new_attempt() -> None:
    s = Scheduler(max_attempts=2)
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.bridge_joined(BRIDGE, [ClientClaim(1), ClientClaim(11)], 1.0)
    s.messages_to_send()

    s.fail_task(W1, task_id, "boom", 2.0)
    assert assigned(s.messages_to_send(), W1) == [task_id]

    s.fail_task(W1, task_id, "boom", 3.0)
    message = one(sent(s.messages_to_send(), "TASK_FAILED", MASTER))
    assert message["error"] == "gave up after 2 attempts: boom"


def test_bridge_joined_forgets_unclaimed_workers_and_requeues_their_tasks(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    add_worker(sched, W2)

    sched.bridge_joined(BRIDGE, [ClientClaim(1), ClientClaim(12)], 1.0)

    assert assigned(sched.messages_to_send(), W2) == [task_id]
    assert counts(sched)["workerCount"] == 1
    assert_refused(sched, WrongRole, sched.heartbeat, W1, 2.0)


def test_unclaimed_worker_uses_up_an_attempt() -> None:
    far_master = client(1, OTHER_BRIDGE)
    s = Scheduler(max_attempts=1)
    add_worker(s, W1)
    session_id = add_session(s, far_master)
    s.submit_tasks(far_master, session_id, specs(1), 0.0)
    s.messages_to_send()

    s.bridge_joined(BRIDGE, [], 1.0)

    message = one(sent(s.messages_to_send(), "TASK_FAILED", far_master))
    assert message["error"] == "gave up after 1 attempts: connection gone while away"


def test_outcome_made_while_its_masters_bridge_joins_is_sent_once() -> None:
    s = Scheduler(max_attempts=1)
    add_worker(s, W1)
    session_id = add_session(s)
    s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.messages_to_send()

    s.bridge_joined(BRIDGE, [ClientClaim(1, results={session_id: 0})], 1.0)

    out = s.messages_to_send()
    assert types(out) == ["TASK_FAILED", "SESSION_COMPLETED"]


def test_worker_claimed_with_another_task_loses_its_assignment(
    sched: Scheduler,
) -> None:
    """It stays busy with what it has, and its task goes back to the queue."""
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.messages_to_send()

    sched.bridge_joined(BRIDGE, [ClientClaim(1), ClientClaim(11, holds="t-old")], 1.0)

    assert assigned(sched.messages_to_send()) == []
    assert worker_row(sched, worker_id)["status"] == "busy"
    assert counts(sched)["pendingTasks"] == 2


def test_bridge_joined_reattaches_a_claimed_master(sched: Scheduler) -> None:
    add_worker(sched, FAR_WORKER)
    session_id = add_session(sched)
    first, second = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.bridge_gone(BRIDGE, 1.0)
    sched.complete_task(FAR_WORKER, first, "url", 2.0)
    sched.messages_to_send()

    sched.bridge_joined(BRIDGE, [ClientClaim(1)], 3.0)
    assert assigned(sched.messages_to_send(), FAR_WORKER) == [second]

    sched.complete_task(FAR_WORKER, second, "url", 4.0)
    out = sched.messages_to_send()
    assert types(out) == ["TASK_COMPLETED", "SESSION_COMPLETED"]
    assert len(sent_to(out, MASTER)) == len(out)


def test_reattached_master_gets_the_outcomes_it_missed(sched: Scheduler) -> None:
    add_worker(sched, FAR_WORKER)
    session_id = add_session(sched)
    first, _ = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.bridge_gone(BRIDGE, 1.0)
    sched.complete_task(FAR_WORKER, first, "url", 2.0)
    sched.messages_to_send()

    sched.bridge_joined(BRIDGE, [ClientClaim(1)], 3.0)

    completed = one(sent(sched.messages_to_send(), "TASK_COMPLETED", MASTER))
    assert completed["taskId"] == first


def test_reattached_master_gets_only_the_outcomes_it_did_not_receive(
    sched: Scheduler,
) -> None:
    add_worker(sched, FAR_WORKER)
    session_id = add_session(sched)
    first, second, _ = sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    sched.complete_task(FAR_WORKER, first, "url", 1.0)
    sched.bridge_gone(BRIDGE, 2.0)
    sched.complete_task(FAR_WORKER, second, "url", 3.0)
    sched.messages_to_send()

    sched.bridge_joined(BRIDGE, [ClientClaim(1, results={session_id: 1})], 4.0)

    out = sched.messages_to_send()
    assert [m["taskId"] for m in outcomes(out)] == [second]
    assert one(sends(out, "TASK_COMPLETED")).result == (session_id, 1)


def test_unclaimed_master_is_detached(sched: Scheduler) -> None:
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)

    sched.bridge_joined(BRIDGE, [], 1.0)
    sched.register_worker(W1, 2.0)

    assert assigned(sched.messages_to_send()) == []
    assert_refused(
        sched, UnknownSession, sched.submit_tasks, MASTER, session_id, specs(1), 3.0
    )


def test_bridge_joined_returns_the_connections_the_core_knows(
    sched: Scheduler,
) -> None:
    """Claimed workers and masters; not the unclaimed, the unknown, or other bridges."""
    add_worker(sched, W1)
    add_worker(sched, W2)
    add_worker(sched, FAR_WORKER)
    add_session(sched, MASTER)
    add_session(sched, MASTER_2)

    known = sched.bridge_joined(
        BRIDGE, [ClientClaim(1), ClientClaim(11), ClientClaim(99)], 1.0
    )

    assert known == [1, 11]
    assert sched.known_clients(BRIDGE) == [1, 11]


# Rate-limit reports.


def test_report_waiting_is_forwarded_to_the_master(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, [spec("a.jpg")], 0.0)
    sched.messages_to_send()
    sched.report_waiting(W1, task_id, 42.5, 1_700_000_000_123, 1.0)
    out = sched.messages_to_send()
    assert one(out).client == MASTER
    assert one(sent(out, "TASK_WAITING", MASTER)) == {
        "type": "TASK_WAITING",
        "taskId": task_id,
        "filename": "a.jpg",
        "waitTime": 42.5,
        "waitStart": 1_700_000_000_123,
        "workerId": worker_id,
    }


def test_report_waiting_keeps_the_task_with_its_worker(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    before = sched.statistics()
    sched.report_waiting(W1, task_id, 10.0, 0, 1.0)
    sched.report_waiting(W1, task_id, 10.0, 0, 2.0)
    assert sched.statistics() == before
    sched.complete_task(W1, task_id, "url", 3.0)
    assert one(sent(sched.messages_to_send(), "TASK_COMPLETED"))["taskId"] == task_id


def test_rate_limited_worker_gets_no_task_before_its_wait_is_over() -> None:
    s = patient(task_timeout=None)
    add_worker(s, W1)
    session_id = add_session(s)
    first, _ = s.submit_tasks(MASTER, session_id, specs(2), 0.0)
    s.report_waiting(W1, first, 60.0, 0, 10.0)
    s.messages_to_send()

    s.complete_task(W1, first, "url", 20.0)
    assert assigned(s.messages_to_send()) == []
    assert counts(s)["pendingTasks"] == 1

    s.tick(69.9)
    assert assigned(s.messages_to_send()) == []


def test_rested_worker_gets_a_task_once_its_wait_is_over() -> None:
    """The wait counts from the TASK_WAITING, not from the report."""
    s = patient(task_timeout=None)
    add_worker(s, W1)
    session_id = add_session(s)
    first, second = s.submit_tasks(MASTER, session_id, specs(2), 0.0)
    s.report_waiting(W1, first, 60.0, 0, 10.0)
    s.complete_task(W1, first, "url", 20.0)
    s.messages_to_send()

    s.tick(70.0)

    assert assigned(s.messages_to_send(), W1) == [second]


def test_other_workers_get_tasks_while_one_rests() -> None:
    s = patient(task_timeout=None)
    add_worker(s, W1)
    add_worker(s, W2)
    session_id = add_session(s)
    first, second, third = s.submit_tasks(MASTER, session_id, specs(3), 0.0)
    s.report_waiting(W1, first, 60.0, 0, 10.0)
    s.complete_task(W1, first, "url", 20.0)
    s.messages_to_send()

    # W1 has been idle longer, but rests.
    s.complete_task(W2, second, "url", 21.0)

    assert assigned(s.messages_to_send()) == [third]
    assert sends(s.messages_to_send(), "TASK_ASSIGNED") == []


def test_next_deadline_covers_the_end_of_a_rest() -> None:
    s = patient(task_timeout=None)
    add_worker(s, W1)
    session_id = add_session(s)
    first, _ = s.submit_tasks(MASTER, session_id, specs(2), 0.0)
    s.report_waiting(W1, first, 60.0, 0, 10.0)

    s.complete_task(W1, first, "url", 20.0)

    assert s.next_deadline() == 70.0


def test_resting_worker_counts_as_idle() -> None:
    s = patient(task_timeout=None)
    worker_id = add_worker(s, W1)
    session_id = add_session(s)
    first, _ = s.submit_tasks(MASTER, session_id, specs(2), 0.0)
    s.report_waiting(W1, first, 60.0, 0, 10.0)

    s.complete_task(W1, first, "url", 20.0)

    assert worker_row(s, worker_id)["status"] == "idle"
    assert counts(s)["idleWorkers"] == 1
    assert counts(s)["activeTasks"] == 0


# Reports that are refused.


def _report(kind: str, s: Scheduler) -> Callable[..., None]:
    """A reporting method with the same (client, task_id, now) signature."""
    if kind == "completed":
        return lambda c, t, now: s.complete_task(c, t, "url", now)
    if kind == "failed":
        return lambda c, t, now: s.fail_task(c, t, "boom", now)
    return lambda c, t, now: s.report_waiting(c, t, 5.0, 0, now)


def _replay(kind: str, s: Scheduler) -> Callable[..., None]:
    """A report a bridge sends again after a restart, as _report does."""
    if kind == "completed":
        return lambda c, t, now: s.complete_task(c, t, "url", now, replayed=True)
    return lambda c, t, now: s.fail_task(c, t, "boom", now, replayed=True)


REPORTS = ["completed", "failed", "waiting"]


@pytest.mark.parametrize("kind", REPORTS)
def test_report_from_a_worker_not_holding_the_task_is_refused(
    sched: Scheduler, kind: str
) -> None:
    add_worker(sched, W1)
    add_worker(sched, W2)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    error = assert_refused(sched, TaskNotHeld, _report(kind, sched), W2, task_id, 1.0)
    assert error.code == "task_not_held"
    assert isinstance(error, InvalidState)


@pytest.mark.parametrize("kind", REPORTS)
def test_report_on_an_unknown_task_is_refused(sched: Scheduler, kind: str) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    assert_refused(sched, TaskNotHeld, _report(kind, sched), W1, "t-nope", 1.0)


@pytest.mark.parametrize("kind", REPORTS)
def test_report_on_a_pending_task_is_refused(sched: Scheduler, kind: str) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    _, pending = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    assert_refused(sched, TaskNotHeld, _report(kind, sched), W1, pending, 1.0)


@pytest.mark.parametrize("kind", REPORTS)
def test_report_after_completion_is_refused(sched: Scheduler, kind: str) -> None:
    """A duplicate report, or a report on a finished task."""
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.complete_task(W1, task_id, "url", 1.0)
    assert_refused(sched, TaskNotHeld, _report(kind, sched), W1, task_id, 2.0)


@pytest.mark.parametrize("kind", REPORTS)
def test_report_on_a_task_that_failed_for_good_is_refused(kind: str) -> None:
    s = Scheduler(max_attempts=1)
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.fail_task(W1, task_id, "boom", 1.0)
    assert_refused(s, TaskNotHeld, _report(kind, s), W1, task_id, 2.0)


@pytest.mark.parametrize("kind", REPORTS)
def test_report_on_a_task_taken_back_is_refused(sched: Scheduler, kind: str) -> None:
    """After a failure the retry went to another worker: the first may not report."""
    add_worker(sched, W1, now=0.0)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    add_worker(sched, W2, now=1.0)
    sched.fail_task(W1, task_id, "boom", 2.0)
    assert assigned(sched.messages_to_send(), W2) == [task_id]
    assert_refused(sched, TaskNotHeld, _report(kind, sched), W1, task_id, 3.0)


@pytest.mark.parametrize("kind", REPORTS)
def test_report_from_a_master_is_wrong_role(sched: Scheduler, kind: str) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    assert_refused(sched, WrongRole, _report(kind, sched), MASTER, task_id, 1.0)


def test_duplicate_completion_is_refused_and_counted_once(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id, _) = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.complete_task(W1, task_id, "url", 1.0)
    assert_refused(sched, TaskNotHeld, sched.complete_task, W1, task_id, "url", 2.0)
    assert worker_row(sched, worker_id)["stats"]["completed"] == 1


@pytest.mark.parametrize("kind", REPORTS)
def test_duplicate_report_is_counted_as_refused(sched: Scheduler, kind: str) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.complete_task(W1, task_id, "url", 1.0)

    assert_refused(sched, TaskNotHeld, _report(kind, sched), W1, task_id, 2.0)

    assert sched.counters.reports_refused == 1


@pytest.mark.parametrize("kind", REPORTS)
def test_report_from_another_worker_is_counted_as_refused(
    sched: Scheduler, kind: str
) -> None:
    add_worker(sched, W1)
    add_worker(sched, W2)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)

    assert_refused(sched, TaskNotHeld, _report(kind, sched), W2, task_id, 1.0)

    assert sched.counters.reports_refused == 1


@pytest.mark.parametrize("kind", REPORTS)
def test_report_on_an_unknown_task_is_counted_as_refused(
    sched: Scheduler, kind: str
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)

    assert_refused(sched, TaskNotHeld, _report(kind, sched), W1, "t-nope", 1.0)

    assert sched.counters.reports_refused == 1


@pytest.mark.parametrize("kind", ["completed", "failed"])
def test_replayed_report_the_core_already_has_is_ignored_uncounted(
    sched: Scheduler, kind: str
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.complete_task(W1, task_id, "url", 1.0)

    assert_refused(sched, TaskNotHeld, _replay(kind, sched), W1, task_id, 2.0)

    assert sched.counters.reports_refused == 0


@pytest.mark.parametrize("kind", ["completed", "failed"])
def test_replayed_late_report_is_ignored_without_error_or_count(kind: str) -> None:
    """It frees the worker, whose attempt expired, without a word."""
    s = patient(task_timeout=100.0)
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.tick(100.0)
    s.messages_to_send()

    _replay(kind, s)(W1, task_id, 101.0)

    out = s.messages_to_send()
    assert sent(out, "ERROR") == []
    assert sent_to(out, MASTER) == []
    assert assigned(out, W1) == [task_id]
    assert s.counters.reports_refused == 0


def test_replayed_report_that_is_news_is_applied(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.messages_to_send()

    sched.complete_task(W1, task_id, "url", 1.0, replayed=True)

    assert one(sent(sched.messages_to_send(), "TASK_COMPLETED", MASTER))


# Sessions completing.


def test_session_completed_once_when_the_last_task_completes(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, second = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.complete_task(W1, first, "url", 1.0)
    assert sent(sched.messages_to_send(), "SESSION_COMPLETED") == []
    sched.complete_task(W1, second, "url", 2.0)
    out = sched.messages_to_send()
    assert len(out) == 2
    assert types(out) == [
        "TASK_COMPLETED",
        "SESSION_COMPLETED",
    ]
    assert one(sent(out, "SESSION_COMPLETED", MASTER)) == {
        "type": "SESSION_COMPLETED",
        "sessionId": session_id,
        "stats": {"completed": 2, "failed": 0, "total": 2},
    }
    assert counts(sched)["activeSessions"] == 0

    # Nothing later repeats it.
    other = add_session(sched, MASTER_2)
    (other_task,) = sched.submit_tasks(MASTER_2, other, specs(1), 3.0)
    sched.complete_task(W1, other_task, "url", 4.0)
    sched.client_gone(W1, 5.0)
    assert sent(sched.messages_to_send(), "SESSION_COMPLETED", MASTER) == []


def test_session_completed_when_the_last_task_fails(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, second = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.complete_task(W1, first, "url", 1.0)
    for now in (2.0, 3.0):
        sched.fail_task(W1, second, "boom", now)
    assert sent(sched.messages_to_send(), "SESSION_COMPLETED") == []
    sched.fail_task(W1, second, "boom", 4.0)
    out = sched.messages_to_send()
    assert len(out) == 2
    assert types(out) == [
        "TASK_FAILED",
        "SESSION_COMPLETED",
    ]
    assert one(sent(out, "SESSION_COMPLETED"))["stats"] == {
        "completed": 1,
        "failed": 1,
        "total": 2,
    }


def test_sessions_complete_independently(sched: Scheduler) -> None:
    add_worker(sched, W1)
    add_worker(sched, W2)
    a = add_session(sched, MASTER)
    b = add_session(sched, MASTER_2)
    (task_a,) = sched.submit_tasks(MASTER, a, specs(1, "a"), 0.0)
    (task_b,) = sched.submit_tasks(MASTER_2, b, specs(1, "b"), 0.0)
    sched.complete_task(W1, task_a, "url", 1.0)
    out = sched.messages_to_send()
    assert one(sent(out, "SESSION_COMPLETED"))["sessionId"] == a
    assert sent(out, "SESSION_COMPLETED", MASTER_2) == []
    assert counts(sched)["activeSessions"] == 1
    sched.complete_task(W2, task_b, "url", 2.0)
    assert one(sent(sched.messages_to_send(), "SESSION_COMPLETED", MASTER_2))


def test_session_completed_is_sent_exactly_once_whatever_follows() -> None:
    s = patient(task_timeout=100.0)
    add_worker(s, W1)
    add_worker(s, W2)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.tick(100.0)  # W1's attempt expires; W2 takes the task.

    s.complete_task(W2, task_id, "url", 101.0)
    s.complete_task(W1, task_id, "url", 102.0)  # late: refused
    with pytest.raises(TaskNotHeld):
        s.complete_task(W2, task_id, "url", 103.0)
    with pytest.raises(TaskNotHeld):
        s.complete_task(W2, task_id, "url", 104.0, replayed=True)
    with pytest.raises(UnknownTask):
        s.cancel_task(MASTER, task_id, 105.0)
    with pytest.raises(SessionClosed):
        s.cancel_session(MASTER, session_id, 106.0)
    s.tick(1000.0)

    assert len(sent(s.messages_to_send(), "SESSION_COMPLETED")) == 1
    replay = resume(s, MASTER_2, session_id, 1001.0)
    assert len(sent(replay, "SESSION_COMPLETED")) == 1


def test_progress_never_exceeds_total() -> None:
    """Through expiry, cancelling, late, discarded and duplicate reports."""
    s = patient(task_timeout=100.0)
    s.register_worker(W1, 0.0)
    session_id = add_session(s)
    slow, cancelled, done = s.submit_tasks(MASTER, session_id, specs(3), 0.0)
    s.register_worker(W2, 50.0)
    s.register_worker(W3, 50.0)
    s.cancel_task(MASTER, cancelled, 60.0)
    s.complete_task(W2, cancelled, "url", 61.0)  # discarded
    s.complete_task(W3, done, "url", 62.0)
    with pytest.raises(TaskNotHeld):
        s.complete_task(W3, done, "url", 63.0)
    s.tick(100.0)  # slow expires on W1 and goes to W2.
    s.complete_task(W1, slow, "url", 101.0)  # late: refused

    s.complete_task(W2, slow, "url", 102.0)

    out = s.messages_to_send()
    to_master = [m for m in sent_to(out, MASTER) if m["type"] in OUTCOMES]
    progress = [m.get("progress") or m["stats"] for m in to_master]
    assert [m["type"] for m in to_master] == [
        "TASK_CANCELLED",
        "TASK_COMPLETED",
        "TASK_COMPLETED",
        "SESSION_COMPLETED",
    ]
    for p in progress:
        assert p["completed"] + p["failed"] + p.get("cancelled", 0) <= p["total"]
    assert progress[-1] == {"completed": 2, "failed": 0, "cancelled": 1, "total": 3}


def test_progress_counts_across_the_session(sched: Scheduler) -> None:
    s = Scheduler(max_attempts=1)
    add_worker(s, W1)
    session_id = add_session(s)
    ids = s.submit_tasks(MASTER, session_id, specs(3), 0.0)
    s.complete_task(W1, ids[0], "url", 1.0)
    s.fail_task(W1, ids[1], "boom", 2.0)
    s.complete_task(W1, ids[2], "url", 3.0)
    out = s.messages_to_send()
    progress = [
        item.message["progress"]
        for item in out
        if isinstance(item, Send) and "progress" in item.message
    ]
    assert progress == [
        {"completed": 1, "failed": 0, "total": 3},
        {"completed": 1, "failed": 1, "total": 3},
        {"completed": 2, "failed": 1, "total": 3},
    ]


# The attempt time limit.


def test_attempt_expires_task_timeout_after_its_assignment() -> None:
    """A task that waited long in the queue still gets the full time."""
    s = patient(task_timeout=100.0)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    add_worker(s, W1, now=500.0)

    s.tick(599.9)
    assert s.messages_to_send() == []

    s.tick(600.0)
    assert one(sent(s.messages_to_send(), "TASK_CANCELLED", W1)) == {
        "type": "TASK_CANCELLED",
        "taskId": task_id,
        "reason": "no result 100s after assignment",
    }
    assert s.counters.attempts_expired == 1


def test_next_deadline_covers_the_attempt_deadline() -> None:
    s = patient(task_timeout=100.0)
    session_id = add_session(s)
    s.submit_tasks(MASTER, session_id, specs(1), 0.0)

    add_worker(s, W1, now=500.0)

    assert s.next_deadline() == 600.0


def test_expired_attempt_is_retried_without_telling_the_master() -> None:
    s = patient(task_timeout=100.0)
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.messages_to_send()

    s.tick(100.0)
    assert sent_to(s.messages_to_send(), MASTER) == []
    assert counts(s)["pendingTasks"] == 1

    s.register_worker(W2, 101.0)
    assert assigned(s.messages_to_send(), W2) == [task_id]


def test_expired_attempt_uses_up_an_attempt() -> None:
    s = patient(task_timeout=100.0, max_attempts=2)
    add_worker(s, W1)
    add_worker(s, W2)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.tick(100.0)  # the retry goes to W2
    s.messages_to_send()

    s.fail_task(W2, task_id, "boom", 101.0)

    message = one(sent(s.messages_to_send(), "TASK_FAILED", MASTER))
    assert message["error"] == "gave up after 2 attempts: boom"


def test_worker_whose_attempt_expired_gets_no_new_task_until_it_reports() -> None:
    s = patient(task_timeout=100.0)
    worker_id = add_worker(s, W1)
    session_id = add_session(s)
    s.submit_tasks(MASTER, session_id, specs(2), 0.0)
    s.messages_to_send()

    s.tick(100.0)

    assert assigned(s.messages_to_send()) == []
    assert worker_row(s, worker_id)["status"] == "busy"
    assert counts(s)["pendingTasks"] == 2


@pytest.mark.parametrize("kind", ["completed", "failed"])
def test_late_report_after_expiry_is_refused_and_counted(kind: str) -> None:
    s = patient(task_timeout=100.0)
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.tick(100.0)
    s.messages_to_send()

    _report(kind, s)(W1, task_id, 101.0)

    out = s.messages_to_send()
    error = one(sent(out, "ERROR", W1))
    assert error["code"] == "task_not_held"
    assert task_id in error["message"]
    assert sent_to(out, MASTER) == []
    assert s.counters.reports_refused == 1


def test_worker_is_idle_again_after_its_late_report() -> None:
    s = patient(task_timeout=100.0)
    worker_id = add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.tick(100.0)
    add_worker(s, W2, now=101.0)  # takes the retry

    s.complete_task(W1, task_id, "url", 102.0)
    assert worker_row(s, worker_id)["status"] == "idle"

    (later,) = s.submit_tasks(MASTER, session_id, specs(1, "g"), 103.0)
    assert assigned(s.messages_to_send(), W1) == [later]


def test_task_waiting_extends_the_attempt_by_its_wait() -> None:
    s = patient(task_timeout=100.0)
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)

    s.report_waiting(W1, task_id, 50.0, 0, 10.0)
    s.messages_to_send()

    s.tick(149.9)
    assert sent(s.messages_to_send(), "TASK_CANCELLED") == []
    s.tick(150.0)
    assert one(sent(s.messages_to_send(), "TASK_CANCELLED", W1))["taskId"] == task_id


def test_without_task_timeout_an_attempt_never_expires() -> None:
    s = patient(task_timeout=None)
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.messages_to_send()

    s.tick(LONG - 1.0)
    assert s.messages_to_send() == []
    assert s.next_deadline() == LONG

    s.complete_task(W1, task_id, "url", LONG - 1.0)
    assert one(sent(s.messages_to_send(), "TASK_COMPLETED", MASTER))


def test_third_expiry_fails_the_task() -> None:
    s = patient(task_timeout=100.0)
    for worker in (W1, W2, W3):
        add_worker(s, worker)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.tick(100.0)  # W2 takes it
    s.tick(200.0)  # W3 takes it
    s.messages_to_send()

    s.tick(300.0)

    out = s.messages_to_send()
    assert one(sent(out, "TASK_CANCELLED", W3))["taskId"] == task_id
    message = one(sent(out, "TASK_FAILED", MASTER))
    assert message["error"] == (
        "gave up after 3 attempts: no result 100s after assignment"
    )
    assert one(sent(out, "SESSION_COMPLETED", MASTER))
    assert s.counters.attempts_expired == 3


# Cancelling tasks and sessions.


def test_cancel_pending_task_takes_it_out_of_the_queue(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, second, third = sched.submit_tasks(MASTER, session_id, specs(3), 0.0)

    sched.cancel_task(MASTER, second, 1.0)
    assert counts(sched)["pendingTasks"] == 1

    sched.messages_to_send()
    sched.complete_task(W1, first, "url", 2.0)
    assert assigned(sched.messages_to_send(), W1) == [third]


def test_cancel_task_answers_task_cancelled_with_progress(sched: Scheduler) -> None:
    session_id = add_session(sched)
    _, second = sched.submit_tasks(
        MASTER, session_id, [spec("a.jpg"), spec("b.jpg")], 0.0
    )
    sched.messages_to_send()

    sched.cancel_task(MASTER, second, 1.0)

    out = sched.messages_to_send()
    assert one(out).client == MASTER
    assert one(sent(out, "TASK_CANCELLED")) == {
        "type": "TASK_CANCELLED",
        "taskId": second,
        "filename": "b.jpg",
        "reason": "cancelled by its master",
        "progress": {"completed": 0, "failed": 0, "cancelled": 1, "total": 2},
    }
    assert sched.counters.tasks_cancelled == 1


def test_session_completes_when_its_last_tasks_are_cancelled(
    sched: Scheduler,
) -> None:
    session_id = add_session(sched)
    first, second = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.cancel_task(MASTER, first, 1.0)
    sched.messages_to_send()

    sched.cancel_task(MASTER, second, 2.0)

    out = sched.messages_to_send()
    assert types(out) == ["TASK_CANCELLED", "SESSION_COMPLETED"]
    assert one(sent(out, "SESSION_COMPLETED"))["stats"] == {
        "completed": 0,
        "failed": 0,
        "cancelled": 2,
        "total": 2,
    }
    assert counts(sched)["activeSessions"] == 0


def test_cancel_assigned_task_tells_its_worker(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id, _) = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.messages_to_send()

    sched.cancel_task(MASTER, task_id, 1.0)

    out = sched.messages_to_send()
    assert one(sent(out, "TASK_CANCELLED", W1)) == {
        "type": "TASK_CANCELLED",
        "taskId": task_id,
        "reason": "cancelled by its master",
    }
    assert one(sent(out, "TASK_CANCELLED", MASTER))["taskId"] == task_id


def test_worker_whose_task_was_cancelled_gets_no_new_task_until_it_reports(
    sched: Scheduler,
) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id, _) = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.messages_to_send()

    sched.cancel_task(MASTER, task_id, 1.0)

    assert assigned(sched.messages_to_send()) == []
    assert worker_row(sched, worker_id)["status"] == "busy"
    assert counts(sched)["pendingTasks"] == 1


@pytest.mark.parametrize("kind", ["completed", "failed"])
def test_report_on_a_task_its_master_cancelled_is_discarded_quietly(
    sched: Scheduler, kind: str
) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id, other) = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.cancel_task(MASTER, task_id, 1.0)
    sched.messages_to_send()

    _report(kind, sched)(W1, task_id, 2.0)

    out = sched.messages_to_send()
    assert sent(out, "ERROR") == []
    assert sent_to(out, MASTER) == []
    assert assigned(out, W1) == [other]
    assert sched.counters.reports_refused == 0
    # Neither a completion nor a failure of this worker.
    assert worker_row(sched, worker_id)["stats"] == IDLE_STATS


def _end_first_task(s: Scheduler, how: str, task_id: str) -> None:
    if how == "completed":
        s.complete_task(W1, task_id, "url", 1.0)
    elif how == "failed":
        s.fail_task(W1, task_id, "boom", 1.0)
    else:
        s.cancel_task(MASTER, task_id, 1.0)


@pytest.mark.parametrize("how", ["completed", "failed", "cancelled"])
def test_cancel_of_an_ended_task_is_unknown_task(how: str) -> None:
    s = Scheduler("t", max_attempts=1)
    add_worker(s, W1)
    session_id = add_session(s)
    first, _ = s.submit_tasks(MASTER, session_id, specs(2), 0.0)
    _end_first_task(s, how, first)

    error = assert_refused(s, UnknownTask, s.cancel_task, MASTER, first, 2.0)

    assert error.code == "unknown_task"


def test_cancel_of_an_unknown_task_is_unknown_task(sched: Scheduler) -> None:
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)

    assert_refused(sched, UnknownTask, sched.cancel_task, MASTER, "t-nope", 1.0)


def test_cancel_of_another_masters_task_is_unknown_task(sched: Scheduler) -> None:
    session_id = add_session(sched, MASTER)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    add_session(sched, MASTER_2)

    assert_refused(sched, UnknownTask, sched.cancel_task, MASTER_2, task_id, 1.0)


def test_cancel_session_drops_its_pending_tasks(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (first, _, _) = sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    other = add_session(sched, MASTER_2)
    (other_task,) = sched.submit_tasks(MASTER_2, other, specs(1, "o"), 0.0)

    sched.cancel_session(MASTER, session_id, 1.0)
    assert counts(sched)["pendingTasks"] == 1

    sched.messages_to_send()
    sched.complete_task(W1, first, "url", 2.0)  # discarded: the task was cancelled
    assert assigned(sched.messages_to_send(), W1) == [other_task]


def test_cancel_session_tells_the_workers_holding_its_tasks(
    sched: Scheduler,
) -> None:
    w1 = add_worker(sched, W1)
    w2 = add_worker(sched, W2)
    session_id = add_session(sched)
    first, second, _ = sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    sched.messages_to_send()

    sched.cancel_session(MASTER, session_id, 1.0)

    out = sched.messages_to_send()
    assert one(sent(out, "TASK_CANCELLED", W1))["taskId"] == first
    assert one(sent(out, "TASK_CANCELLED", W2))["taskId"] == second
    assert worker_row(sched, w1)["status"] == "busy"
    assert worker_row(sched, w2)["status"] == "busy"


def test_cancel_session_answers_session_cancelled_with_stats(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, _, _ = sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    sched.complete_task(W1, first, "url", 1.0)
    sched.messages_to_send()

    sched.cancel_session(MASTER, session_id, 2.0)

    out = sched.messages_to_send()
    assert one(sent(out, "SESSION_CANCELLED", MASTER)) == {
        "type": "SESSION_CANCELLED",
        "sessionId": session_id,
        "stats": {"completed": 1, "failed": 0, "cancelled": 2, "total": 3},
    }
    assert counts(sched)["activeSessions"] == 0
    assert sched.counters.tasks_cancelled == 2


def test_cancelled_session_never_completes(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.cancel_session(MASTER, session_id, 1.0)
    sched.messages_to_send()

    sched.complete_task(W1, task_id, "url", 2.0)

    assert sched.messages_to_send() == []


def test_submit_to_a_cancelled_session_is_session_closed(sched: Scheduler) -> None:
    session_id = add_session(sched)
    sched.cancel_session(MASTER, session_id, 1.0)

    assert_refused(
        sched, SessionClosed, sched.submit_tasks, MASTER, session_id, specs(1), 2.0
    )


def test_cancel_session_twice_is_session_closed(sched: Scheduler) -> None:
    session_id = add_session(sched)
    sched.cancel_session(MASTER, session_id, 1.0)

    error = assert_refused(
        sched, SessionClosed, sched.cancel_session, MASTER, session_id, 2.0
    )

    assert error.code == "session_closed"


def test_cancel_of_another_masters_session_is_unknown_session(
    sched: Scheduler,
) -> None:
    session_id = add_session(sched, MASTER)
    add_session(sched, MASTER_2)

    assert_refused(
        sched, UnknownSession, sched.cancel_session, MASTER_2, session_id, 1.0
    )


# Resuming a session.


def _leave_with_results(s: Scheduler) -> tuple[str, list[str]]:
    """
    MASTER submits four tasks to W1..W3 and leaves; then b completes, a
    fails for good and c completes while it is away. d is still pending.

    """
    for worker in (W1, W2, W3):
        add_worker(s, worker)
    session_id = add_session(s)
    a, b, c, d = s.submit_tasks(MASTER, session_id, specs(4), 0.0)
    s.client_gone(MASTER, 1.0)
    s.complete_task(W2, b, "url-b", 2.0)
    s.fail_task(W1, a, "boom", 3.0)
    s.complete_task(W3, c, "url-c", 4.0)
    s.messages_to_send()
    return session_id, [a, b, c, d]


def test_resume_answers_session_resumed() -> None:
    s = Scheduler("t", max_attempts=1)
    session_id, _ = _leave_with_results(s)

    out = resume(s, MASTER_2, session_id, 5.0)

    assert out[0] == Send(
        MASTER_2,
        {
            "type": "SESSION_RESUMED",
            "sessionId": session_id,
            "state": "open",
            "results": 3,
            "stats": {"completed": 2, "failed": 1, "total": 4},
        },
    )


def test_resume_replays_every_outcome_in_order() -> None:
    s = Scheduler("t", max_attempts=1)
    session_id, (a, b, c, _) = _leave_with_results(s)

    out = resume(s, MASTER_2, session_id, 5.0)

    replayed = sent_to(out, MASTER_2)[1:]
    assert [(m["type"], m["taskId"]) for m in replayed] == [
        ("TASK_COMPLETED", b),
        ("TASK_FAILED", a),
        ("TASK_COMPLETED", c),
    ]
    assert [m["progress"] for m in replayed] == [
        {"completed": 1, "failed": 0, "total": 4},
        {"completed": 1, "failed": 1, "total": 4},
        {"completed": 2, "failed": 1, "total": 4},
    ]
    assert replayed[0]["resultUrl"] == "url-b"


def test_resume_after_n_skips_the_outcomes_the_client_has() -> None:
    s = Scheduler("t", max_attempts=1)
    session_id, (_, _, c, _) = _leave_with_results(s)

    out = resume(s, MASTER_2, session_id, 5.0, after=2)

    to_master = sent_to(out, MASTER_2)
    assert to_master[0]["results"] == 3
    assert [(m["type"], m["taskId"]) for m in to_master[1:]] == [("TASK_COMPLETED", c)]


def test_resumed_session_hands_out_its_tasks_again() -> None:
    s = Scheduler("t", max_attempts=1)
    session_id, (_, _, _, d) = _leave_with_results(s)

    out = resume(s, MASTER_2, session_id, 5.0)

    assert len(assigned(out)) == 1
    assert assigned(out) == [d]
    # After the replay, not before.
    assert types(out)[-1] == "TASK_ASSIGNED"


def test_resumed_session_reports_to_the_new_master() -> None:
    s = Scheduler("t", max_attempts=1)
    session_id, (_, _, _, d) = _leave_with_results(s)
    worker = one(sends(resume(s, MASTER_2, session_id, 5.0), "TASK_ASSIGNED")).client

    s.complete_task(worker, d, "url-d", 6.0)

    out = s.messages_to_send()
    assert types(out) == ["TASK_COMPLETED", "SESSION_COMPLETED"]
    assert len(sent_to(out, MASTER_2)) == len(out)


def test_resume_after_the_grace_is_unknown_session() -> None:
    s = patient(resume_grace=30.0)
    session_id = add_session(s)
    s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.client_gone(MASTER, 1.0)
    s.tick(31.0)

    error = assert_refused(
        s, UnknownSession, s.resume_session, MASTER_2, session_id, 0, 32.0
    )

    assert error.code == "unknown_session"


def test_resume_within_the_grace_keeps_the_session() -> None:
    s = patient(resume_grace=30.0)
    session_id = add_session(s)
    s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.client_gone(MASTER, 1.0)
    resume(s, MASTER_2, session_id, 30.9)

    s.tick(31.0)

    assert counts(s)["activeSessions"] == 1
    assert counts(s)["pendingTasks"] == 1


def test_resume_of_a_completed_session_replays_its_completion(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.complete_task(W1, task_id, "url", 1.0)
    sched.client_gone(MASTER, 2.0)
    sched.messages_to_send()

    out = resume(sched, MASTER_2, session_id, 3.0)

    assert types(out) == ["SESSION_RESUMED", "TASK_COMPLETED", "SESSION_COMPLETED"]
    assert sent(out, "SESSION_RESUMED")[0]["state"] == "completed"
    assert sent(out, "SESSION_COMPLETED")[0]["sessionId"] == session_id


def test_resume_of_a_cancelled_session_says_so(sched: Scheduler) -> None:
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.cancel_session(MASTER, session_id, 1.0)
    sched.client_gone(MASTER, 2.0)
    sched.messages_to_send()

    out = resume(sched, MASTER_2, session_id, 3.0)

    assert types(out) == ["SESSION_RESUMED", "SESSION_CANCELLED"]
    assert sent(out, "SESSION_RESUMED")[0]["state"] == "cancelled"


def test_session_completed_while_its_master_was_away_outlives_the_grace() -> None:
    s = patient(resume_grace=30.0)
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    s.client_gone(MASTER, 1.0)
    s.complete_task(W1, task_id, "url", 2.0)

    s.tick(31.0)
    s.messages_to_send()

    out = resume(s, MASTER_2, session_id, 40.0)
    assert types(out) == ["SESSION_RESUMED", "TASK_COMPLETED", "SESSION_COMPLETED"]


def test_resume_from_a_worker_is_wrong_role(sched: Scheduler) -> None:
    session_id = add_session(sched)
    sched.client_gone(MASTER, 1.0)
    add_worker(sched, W1, now=1.0)

    error = assert_refused(
        sched, WrongRole, sched.resume_session, W1, session_id, 0, 2.0
    )

    assert "RESUME_SESSION" in str(error)


def test_resume_of_an_unknown_session_is_unknown_session(sched: Scheduler) -> None:
    assert_refused(
        sched, UnknownSession, sched.resume_session, MASTER, "s-nope", 0, 1.0
    )


def test_resume_with_a_negative_after_is_invalid_field(sched: Scheduler) -> None:
    session_id = add_session(sched)
    sched.client_gone(MASTER, 1.0)

    assert_refused(
        sched, InvalidField, sched.resume_session, MASTER_2, session_id, -1, 2.0
    )


# Keeping ended sessions.


def _end_session(s: Scheduler, how: str, now: float) -> str:
    """A session of MASTER that ends at ``now``, ``how``."""
    add_worker(s, W1)
    session_id = add_session(s)
    (task_id,) = s.submit_tasks(MASTER, session_id, specs(1), 0.0)
    if how == "completed":
        s.complete_task(W1, task_id, "url", now)
    else:
        s.cancel_session(MASTER, session_id, now)
    s.messages_to_send()
    return session_id


@pytest.mark.parametrize("how", ["completed", "cancelled"])
def test_ended_session_can_be_resumed_until_its_retention_ends(how: str) -> None:
    s = patient(retention=100.0)
    session_id = _end_session(s, how, now=5.0)

    s.tick(104.9)

    assert types(resume(s, MASTER_2, session_id, 104.9))[0] == "SESSION_RESUMED"


@pytest.mark.parametrize("how", ["completed", "cancelled"])
def test_ended_session_is_forgotten_when_its_retention_ends(how: str) -> None:
    s = patient(retention=100.0)
    session_id = _end_session(s, how, now=5.0)

    s.tick(105.0)

    assert_refused(s, UnknownSession, s.resume_session, MASTER_2, session_id, 0, 106.0)
    assert repr(s) == "Scheduler(workers=1, sessions=0, pending=0, tasks=0)"


def test_next_deadline_covers_the_end_of_the_retention() -> None:
    s = patient(retention=100.0)

    _end_session(s, "completed", now=5.0)

    assert s.next_deadline() == 105.0


# Restarting from the store.


def test_restore_attaches_nobody_until_a_bridge_joins(stopped: Stopped) -> None:

    b = restart(stopped.store, 100.0)
    b.tick(100.0)

    assert b.messages_to_send() == []
    assert counts(b) == {
        "workerCount": 0,
        "idleWorkers": 0,
        "pendingTasks": 4,
        "activeTasks": 0,
        "activeSessions": 1,
    }
    assert_refused(
        b, UnknownSession, b.submit_tasks, MASTER, stopped.running, specs(1), 100.0
    )


def test_restore_keeps_the_workers_and_the_counts(stopped: Stopped) -> None:
    b = restart(stopped.store, 100.0)

    out = rejoin(b, stopped, 100.0)

    assert assigned(out) == []
    assert outcomes(out) == []
    assert b.statistics() == stopped.before.statistics()


def test_restore_sends_a_claimed_master_the_outcomes_it_did_not_receive(
    stopped: Stopped,
) -> None:
    """A result stored in the last instant before the core stopped, but not sent."""
    b = restart(stopped.store, 100.0)

    b.bridge_joined(BRIDGE, [ClientClaim(1, results={stopped.running: 0})], 100.0)

    out = b.messages_to_send()
    assert outcomes(out) == stopped.seen[MASTER]
    assert len(sent_to(out, MASTER)) == 1


def test_restore_keeps_assigned_tasks_with_the_same_workers(stopped: Stopped) -> None:
    b = restart(stopped.store, 100.0)
    rejoin(b, stopped, 100.0)
    tasks = stopped.tasks

    b.complete_task(W1, tasks[2], "url-2", 101.0)
    b.complete_task(W2, tasks[3], "url-3", 102.0)
    b.complete_task(FAR_WORKER, tasks[1], "url-1", 103.0)

    completed = sent(b.messages_to_send(), "TASK_COMPLETED", MASTER)
    assert [m["taskId"] for m in completed] == [tasks[2], tasks[3], tasks[1]]
    assert b.counters.reports_refused == 0


def test_restore_keeps_the_pending_tasks_in_order(stopped: Stopped) -> None:
    b = restart(stopped.store, 100.0)
    rejoin(b, stopped, 100.0)

    b.complete_task(W1, stopped.tasks[2], "url-2", 101.0)

    assert serve_one_by_one(b, W1, 4) == ["f4.jpg", "f5.jpg", "f6.jpg", "f7.jpg"]


def test_restore_keeps_the_results(stopped: Stopped) -> None:
    b = restart(stopped.store, 100.0)

    out = resume(b, client(5), stopped.done, 100.0)

    resumed = one(sent(out, "SESSION_RESUMED"))
    assert resumed["state"] == "completed"
    assert resumed["stats"] == {"completed": 1, "failed": 0, "total": 1}
    assert sent_to(out, client(5))[1:] == stopped.seen[MASTER_2]
    assert [m["type"] for m in stopped.seen[MASTER_2]] == [
        "TASK_COMPLETED",
        "SESSION_COMPLETED",
    ]


def test_ended_session_is_kept_for_its_retention_after_restore(
    stopped: Stopped,
) -> None:
    b = restart(stopped.store, 100.0, retention=50.0)

    b.tick(149.9)

    out = resume(b, client(5), stopped.done, 149.9)
    assert sent_to(out, client(5))[1:] == stopped.seen[MASTER_2]


def test_restore_remembers_the_master_that_resumed_a_session(
    store: SqliteStore,
) -> None:
    a = Scheduler("a")
    session_id = a.create_session(MASTER, 0.0)
    persist(a, store)
    a.submit_tasks(MASTER, session_id, specs(2), 0.0)
    persist(a, store)
    a.client_gone(MASTER, 1.0)
    persist(a, store)
    a.resume_session(MASTER_2, session_id, 0, 2.0)
    persist(a, store)
    b = restart(store, 100.0)

    b.bridge_joined(BRIDGE, [ClientClaim(MASTER_2[1])], 100.0)
    b.register_worker(W1, 100.0)

    assert len(assigned(b.messages_to_send(), W1)) == 1
    b.submit_tasks(MASTER_2, session_id, specs(1, "g"), 101.0)
    assert one(sent(b.messages_to_send(), "TASKS_SUBMITTED", MASTER_2))


def test_restore_keeps_the_attempts_used(stopped: Stopped) -> None:
    """f1 had failed once before the restart: two more failures end it."""
    b = restart(stopped.store, 100.0)
    rejoin(b, stopped, 100.0)
    f1 = stopped.tasks[1]

    b.fail_task(FAR_WORKER, f1, "HTTP 500", 101.0)
    assert assigned(b.messages_to_send(), FAR_WORKER) == [f1]

    b.fail_task(FAR_WORKER, f1, "HTTP 502", 102.0)
    message = one(sent(b.messages_to_send(), "TASK_FAILED", MASTER))
    assert message["error"] == "gave up after 3 attempts: HTTP 502"


def test_results_reach_the_master_its_bridge_claims_after_restore(
    stopped: Stopped,
) -> None:
    b = restart(stopped.store, 100.0)
    rejoin(b, stopped, 100.0)

    b.complete_task(W2, stopped.tasks[3], "url-3", 101.0)

    message = one(sent(b.messages_to_send(), "TASK_COMPLETED", MASTER))
    assert message["resultUrl"] == "url-3"
    assert message["progress"] == {"completed": 2, "failed": 0, "total": 8}


def test_restored_assignment_that_never_arrived_is_sent_again(stopped: Stopped) -> None:
    b = restart(stopped.store, 100.0)

    b.bridge_joined(BRIDGE, [ClientClaim(1), ClientClaim(11)], 100.0)

    send = one(sends(b.messages_to_send(), "TASK_ASSIGNED", W1))
    assert send.message["task"]["id"] == stopped.tasks[2]
    assert send.payload_key == "spool-f2.jpg"


def test_report_in_a_claim_is_applied_once_by_bridge_joined(stopped: Stopped) -> None:
    b = restart(stopped.store, 100.0)
    f3 = stopped.tasks[3]
    report = {"type": "TASK_COMPLETED", "taskId": f3, "resultUrl": "url-3"}

    b.bridge_joined(BRIDGE, [ClientClaim(1), ClientClaim(12, report=report)], 100.0)

    out = b.messages_to_send()
    completed = [m for m in sent(out, "TASK_COMPLETED", MASTER) if m["taskId"] == f3]
    assert [m["resultUrl"] for m in completed] == ["url-3"]
    assert f3 not in assigned(out, W2)
    assert_refused(b, TaskNotHeld, _replay("completed", b), W2, f3, 101.0)
    assert b.counters.reports_refused == 0


def test_task_of_a_worker_no_bridge_claims_is_requeued_after_worker_timeout(
    stopped: Stopped,
) -> None:
    b = restart(stopped.store, 100.0, worker_timeout=30.0)
    b.bridge_joined(
        BRIDGE,
        [
            ClientClaim(1),
            ClientClaim(11, holds=stopped.tasks[2]),
            ClientClaim(12, holds=stopped.tasks[3]),
        ],
        100.0,
    )
    b.heartbeat(W1, 120.0)
    b.heartbeat(W2, 120.0)

    b.tick(129.9)
    assert counts(b)["pendingTasks"] == 4

    b.tick(130.0)
    assert counts(b)["pendingTasks"] == 5
    b.messages_to_send()
    b.complete_task(W1, stopped.tasks[2], "url-2", 131.0)
    assert assigned(b.messages_to_send(), W1) == [stopped.tasks[1]]


def test_session_whose_master_no_claim_names_is_dropped_after_the_grace(
    stopped: Stopped,
) -> None:
    b = restart(stopped.store, 100.0, worker_timeout=LONG, resume_grace=60.0)
    b.bridge_joined(
        BRIDGE,
        [
            ClientClaim(11, holds=stopped.tasks[2]),
            ClientClaim(12, holds=stopped.tasks[3]),
        ],
        100.0,
    )
    b.bridge_joined(OTHER_BRIDGE, [ClientClaim(21, holds=stopped.tasks[1])], 100.0)

    b.tick(159.9)
    assert sent(b.messages_to_send(), "TASK_CANCELLED") == []

    b.tick(160.0)
    cancelled = sent(b.messages_to_send(), "TASK_CANCELLED")
    assert {m["reason"] for m in cancelled} == {"the master closed its session"}
    assert sorted(m["taskId"] for m in cancelled) == sorted(stopped.tasks[1:4])
    assert_refused(
        b, UnknownSession, b.resume_session, client(5), stopped.running, 0, 161.0
    )


def test_session_whose_master_no_claim_names_may_be_resumed(stopped: Stopped) -> None:
    b = restart(stopped.store, 100.0, worker_timeout=LONG, resume_grace=60.0)
    b.bridge_joined(BRIDGE, [ClientClaim(11, holds=stopped.tasks[2])], 100.0)

    out = resume(b, client(5), stopped.running, 150.0)

    resumed = one(sent(out, "SESSION_RESUMED", client(5)))
    assert resumed["stats"] == {"completed": 1, "failed": 0, "total": 8}
    assert sent_to(out, client(5))[1:] == stopped.seen[MASTER]


def test_restore_puts_retries_before_untried_tasks(store: SqliteStore) -> None:
    a = patient()
    for worker in (W1, W2, W3):
        a.register_worker(worker, 0.0)
        persist(a, store)
    session_id = a.create_session(MASTER, 0.0)
    persist(a, store)
    tasks = a.submit_tasks(MASTER, session_id, specs(5), 0.0)
    persist(a, store)
    a.client_gone(W1, 1.0)  # f0 back to the front
    persist(a, store)
    a.client_gone(W3, 2.0)  # f2 back in front of it
    persist(a, store)
    b = restart(store, 100.0, worker_timeout=LONG)
    b.bridge_joined(BRIDGE, [ClientClaim(1), ClientClaim(12, holds=tasks[1])], 100.0)

    b.complete_task(W2, tasks[1], "url", 101.0)

    # The store keeps no finer order: retries come first, in submission order.
    served = serve_one_by_one(b, W2, 4)
    assert served == ["f0.jpg", "f2.jpg", "f3.jpg", "f4.jpg"]


# Changes for the store.


def test_changes_after_submit_hold_the_session_and_its_tasks(
    sched: Scheduler,
) -> None:
    session_id = add_session(sched)
    sched.take_changes()

    task_ids = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)

    changes = sched.take_changes()
    session = changes.sessions[session_id]
    assert session is not None
    assert session.total == 2
    assert list(changes.tasks) == task_ids
    stored = [task for task in changes.tasks.values() if task is not None]
    assert [task.spec.payload_key for task in stored] == [
        "spool-f0.jpg",
        "spool-f1.jpg",
    ]
    assert [task.seq for task in stored] == [0, 1]
    assert all(task.state is TaskState.PENDING for task in stored)
    assert changes.freed_payloads == []
    assert changes.outcomes == []


def test_changes_after_an_assignment_hold_the_task_and_its_worker(
    sched: Scheduler,
) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    sched.take_changes()

    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)

    changes = sched.take_changes()
    task = changes.tasks[task_id]
    worker = changes.workers[W1]
    assert task is not None
    assert worker is not None
    assert task.state is TaskState.ASSIGNED
    assert task.worker_id == worker_id
    assert task.attempts == 1
    assert worker.task_id == task_id


def test_changes_after_completion_delete_the_task_and_keep_its_outcome(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, _ = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.take_changes()

    sched.complete_task(W1, first, "url", 1.0)

    changes = sched.take_changes()
    assert changes.tasks[first] is None
    assert changes.freed_payloads == ["spool-f0.jpg"]
    message = one(sent(sched.messages_to_send(), "TASK_COMPLETED", MASTER))
    assert changes.outcomes == [(session_id, 0, message)]


def test_changes_number_the_outcomes_of_a_session(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    first, second = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.complete_task(W1, first, "url", 1.0)
    sched.take_changes()

    sched.complete_task(W1, second, "url", 2.0)

    changes = sched.take_changes()
    assert [(s, i, m["type"]) for s, i, m in changes.outcomes] == [
        (session_id, 1, "TASK_COMPLETED"),
        (session_id, 2, "SESSION_COMPLETED"),
    ]


def test_changes_after_a_cancel_free_the_payload(sched: Scheduler) -> None:
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, [spec("a.jpg")], 0.0)
    sched.take_changes()

    sched.cancel_task(MASTER, task_id, 1.0)

    changes = sched.take_changes()
    assert changes.tasks == {task_id: None}
    assert changes.freed_payloads == ["spool-a.jpg"]


def test_take_changes_returns_each_change_once(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    assert sched.take_changes()

    assert not sched.take_changes()


# Statistics.


def test_get_stats_replies_to_the_asker_only(sched: Scheduler) -> None:
    add_worker(sched, W1)
    sched.request_stats(MASTER)
    out = sched.messages_to_send()
    reply = one(sent(out, "STATS_UPDATE", MASTER))
    assert reply["stats"] == sched.statistics()
    assert len(out) == 1


def test_statistics_follow_each_step(sched: Scheduler) -> None:
    w1 = add_worker(sched, W1, now=0.0)
    w2 = add_worker(sched, W2, now=0.0)
    assert counts(sched) == {
        "workerCount": 2,
        "idleWorkers": 2,
        "pendingTasks": 0,
        "activeTasks": 0,
        "activeSessions": 0,
    }

    session_id = add_session(sched)
    assert counts(sched)["activeSessions"] == 1

    ids = sched.submit_tasks(
        MASTER, session_id, [spec("a", 10), spec("b", 20), spec("c", 30)], 1.0
    )
    assert counts(sched) == {
        "workerCount": 2,
        "idleWorkers": 0,
        "pendingTasks": 1,
        "activeTasks": 2,
        "activeSessions": 1,
    }
    statuses = {w["id"]: w["status"] for w in sched.statistics()["workers"]}
    assert statuses == {w1: "busy", w2: "busy"}

    sched.complete_task(W1, ids[0], "url", 2.0)
    # W1 took the third task at once.
    assert counts(sched)["pendingTasks"] == 0
    assert counts(sched)["activeTasks"] == 2
    assert worker_row(sched, w1)["stats"] == {
        "completed": 1,
        "failed": 0,
        "totalBytes": 10,
    }

    sched.fail_task(W2, ids[1], "boom", 3.0)
    # The retry went back to W2.
    assert counts(sched)["activeTasks"] == 2
    assert worker_row(sched, w2)["stats"] == {
        "completed": 0,
        "failed": 1,
        "totalBytes": 0,
    }

    sched.complete_task(W1, ids[2], "url", 4.0)
    assert worker_row(sched, w1) == {
        "id": w1,
        "status": "idle",
        "stats": {"completed": 2, "failed": 0, "totalBytes": 40},
    }
    assert counts(sched)["idleWorkers"] == 1

    sched.complete_task(W2, ids[1], "url", 5.0)
    assert counts(sched) == {
        "workerCount": 2,
        "idleWorkers": 2,
        "pendingTasks": 0,
        "activeTasks": 0,
        "activeSessions": 0,
    }
    assert worker_row(sched, w2)["stats"] == {
        "completed": 1,
        "failed": 1,
        "totalBytes": 20,
    }

    sched.client_gone(W1, 6.0)
    assert counts(sched)["workerCount"] == 1
    assert [w["id"] for w in sched.statistics()["workers"]] == [w2]


def test_statistics_are_a_fresh_copy(sched: Scheduler) -> None:
    add_worker(sched, W1)
    stats = sched.statistics()
    stats["workerCount"] = 99
    stats["workers"].clear()
    assert counts(sched)["workerCount"] == 1
    assert len(sched.statistics()["workers"]) == 1


def test_messages_to_send_drains_the_queue(sched: Scheduler) -> None:
    sched.register_worker(W1, 0.0)
    assert sched.messages_to_send()
    assert sched.messages_to_send() == []


def test_repr_shows_counts(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    assert repr(sched) == "Scheduler(workers=1, sessions=1, pending=2, tasks=3)"


def test_a_burst_of_joins_makes_one_stats_push_with_fresh_stats(
    sched: Scheduler,
) -> None:
    """Pushes are coalesced to one per STATS_PUSH_INTERVAL, counted at push time."""
    add_worker(sched, W1, now=0.0)
    for number, now in ((2, 0.05), (3, 0.1), (4, 0.2)):
        sched.register_worker(client(number), now)
    sched.messages_to_send()
    assert sched.next_deadline() == STATS_PUSH_INTERVAL

    sched.tick(0.2)
    assert broadcasts(sched.messages_to_send()) == []
    sched.tick(STATS_PUSH_INTERVAL)
    update = one(broadcasts(sched.messages_to_send()))
    assert update["stats"]["workerCount"] == 4


def test_a_lone_change_is_pushed_at_once(sched: Scheduler) -> None:
    add_worker(sched, W1, now=0.0)
    sched.register_worker(W2, 10.0)
    assert sched.next_deadline() == 10.0
    sched.tick(10.0)
    assert one(broadcasts(sched.messages_to_send()))["stats"]["workerCount"] == 2
