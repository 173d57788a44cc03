"""
Tests of :mod:`core.scheduler`: pure, no I/O, time passed in explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest

from core.errors import (
    InvalidField,
    InvalidState,
    LinkupError,
    SessionClosed,
    TaskNotHeld,
    UnknownSession,
    WrongRole,
)
from core.model import Broadcast, ClientRef, Disconnect, Outgoing, Send, TaskSpec
from core.scheduler import STATS_PUSH_INTERVAL, Scheduler

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

IDLE_STATS = {"completed": 0, "failed": 0, "totalBytes": 0}


# Helpers: building input.


def spec(
    filename: str = "photo.jpg",
    size: int = 100,
    payload: Any = None,
    mime_type: str = "image/jpeg",
) -> TaskSpec:
    if payload is None:
        payload = f"base64-of-{filename}".encode()
    return TaskSpec(filename, mime_type, size, payload)


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
    names = []
    out = s.messages_to_send()
    for step in range(count):
        message = one(sent(out, "TASK_ASSIGNED", worker))
        names.append(message["task"]["filename"])
        s.complete_task(worker, message["task"]["id"], "url", 100.0 + step)
        out = s.messages_to_send()
    return names


@pytest.fixture
def sched() -> Scheduler:
    return Scheduler("t")


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


def test_submit_with_a_negative_size_is_refused_whole(sched: Scheduler) -> None:
    """One bad size refuses the batch: none of its tasks is queued."""
    add_worker(sched, W1)
    session_id = add_session(sched)
    batch = [spec("a.jpg", 1), spec("b.jpg", -1), spec("c.jpg", 3)]
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
    payload = bytearray(b"aGVsbG8=")
    task = spec("cat.png", size=5, payload=payload, mime_type="image/png")
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
    # The payload travels beside the message, as the very object submitted.
    assert send.payload is payload


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
    carrying = [i for i in out if isinstance(i, Send) and i.payload is not None]
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
    add_worker(sched, W1, now=0.0)
    add_worker(sched, W2, now=10.0)
    assert sched.next_deadline() == 30.0
    sched.heartbeat(W1, 20.0)
    assert sched.next_deadline() == 40.0
    sched.client_gone(W2, 21.0)
    sched.tick(21.0)
    assert sched.next_deadline() == 50.0
    sched.client_gone(W1, 22.0)
    sched.tick(22.0)
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


# Masters that go away.


def test_master_disconnect_drops_its_pending_tasks(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    other = add_session(sched, MASTER_2)
    sched.submit_tasks(MASTER, session_id, specs(3), 0.0)
    sched.submit_tasks(MASTER_2, other, specs(2, "o"), 0.0)
    assert counts(sched)["pendingTasks"] == 4
    sched.client_gone(MASTER, 1.0)
    assert counts(sched)["pendingTasks"] == 2
    assert counts(sched)["activeSessions"] == 1


def test_master_disconnect_cancels_held_tasks(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id, _) = sched.submit_tasks(MASTER, session_id, specs(2), 0.0)
    sched.messages_to_send()
    sched.client_gone(MASTER, 1.0)
    out = sched.messages_to_send()
    message = one(sent(out, "TASK_CANCELLED", W1))
    assert message["taskId"] == task_id
    assert message["reason"]
    assert len(out) == 1
    # The worker is still busy uploading until it reports.
    assert worker_row(sched, worker_id)["status"] == "busy"
    assert counts(sched) == {
        "workerCount": 1,
        "idleWorkers": 0,
        "pendingTasks": 0,
        "activeTasks": 1,
        "activeSessions": 0,
    }


def test_worker_with_a_cancelled_task_gets_no_new_work_before_it_reports(
    sched: Scheduler,
) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(MASTER, 1.0)
    other = add_session(sched, MASTER_2)
    sched.submit_tasks(MASTER_2, other, specs(1, "o"), 2.0)
    assert assigned(sched.messages_to_send()) == []
    assert counts(sched)["pendingTasks"] == 1


def test_report_on_a_cancelled_task_is_accepted_silently(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(MASTER, 1.0)
    sched.messages_to_send()
    sched.complete_task(W1, task_id, "url", 2.0)
    assert sched.messages_to_send() == []
    assert worker_row(sched, worker_id)["status"] == "idle"
    assert counts(sched)["activeTasks"] == 0


def test_worker_freed_from_a_cancelled_task_gets_new_work(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(MASTER, 1.0)
    other = add_session(sched, MASTER_2)
    (other_task,) = sched.submit_tasks(MASTER_2, other, specs(1, "o"), 2.0)
    sched.messages_to_send()
    sched.complete_task(W1, task_id, "url", 3.0)
    out = sched.messages_to_send()
    assert len(out) == 1
    assert assigned(out, W1) == [other_task]


def test_failure_of_a_cancelled_task_is_accepted_silently(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(MASTER, 1.0)
    sched.messages_to_send()
    sched.fail_task(W1, task_id, "boom", 2.0)
    assert sched.messages_to_send() == []
    assert worker_row(sched, worker_id)["status"] == "idle"
    # Not retried: the task is gone.
    assert counts(sched)["pendingTasks"] == 0


def test_waiting_on_a_cancelled_task_is_accepted_silently(sched: Scheduler) -> None:
    worker_id = add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(MASTER, 1.0)
    sched.messages_to_send()
    sched.report_waiting(W1, task_id, 60.0, 1_700_000_000_000, 2.0)
    assert sched.messages_to_send() == []
    assert worker_row(sched, worker_id)["status"] == "busy"


def test_second_report_on_a_cancelled_task_is_refused(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    (task_id,) = sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(MASTER, 1.0)
    sched.complete_task(W1, task_id, "url", 2.0)
    assert_refused(sched, TaskNotHeld, sched.complete_task, W1, task_id, "url", 3.0)
    assert_refused(sched, TaskNotHeld, sched.fail_task, W1, task_id, "boom", 3.0)


def test_worker_holding_a_cancelled_task_may_disconnect(sched: Scheduler) -> None:
    add_worker(sched, W1)
    session_id = add_session(sched)
    sched.submit_tasks(MASTER, session_id, specs(1), 0.0)
    sched.client_gone(MASTER, 1.0)
    sched.messages_to_send()
    sched.client_gone(W1, 2.0)
    sched.tick(2.0)
    out = sched.messages_to_send()
    assert [type(item) for item in out] == [Broadcast]
    assert counts(sched) == {
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


def test_master_that_left_is_forgotten(sched: Scheduler) -> None:
    """Its old sessions are gone, and the connection may now be a worker."""
    session_id = add_session(sched)
    sched.client_gone(MASTER, 1.0)
    assert_refused(
        sched, UnknownSession, sched.submit_tasks, MASTER, session_id, specs(1), 2.0
    )
    sched.register_worker(MASTER, 3.0)
    assert counts(sched)["workerCount"] == 1


# Bridges that go away.


def test_bridge_gone_forgets_only_the_clients_of_that_bridge(
    sched: Scheduler,
) -> None:
    lost_worker = client(1, OTHER_BRIDGE)
    lost_master = client(2, OTHER_BRIDGE)
    kept_id = add_worker(sched, W1)
    add_worker(sched, lost_worker)
    kept_session = add_session(sched, MASTER)
    lost_session = add_session(sched, lost_master)
    sched.submit_tasks(lost_master, lost_session, specs(3, "lost"), 0.0)
    sched.messages_to_send()

    sched.bridge_gone(OTHER_BRIDGE, 1.0)
    stats = sched.statistics()
    assert stats["workerCount"] == 1
    assert [w["id"] for w in stats["workers"]] == [kept_id]
    assert stats["activeSessions"] == 1
    assert stats["pendingTasks"] == 0
    # The clients of the other bridge still work.
    sched.heartbeat(W1, 2.0)
    sched.submit_tasks(MASTER, kept_session, specs(1), 2.0)
    # The lost ones do not.
    assert_refused(sched, WrongRole, sched.heartbeat, lost_worker, 3.0)


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


# Reports that are refused.


def _report(kind: str, s: Scheduler) -> Callable[..., None]:
    """A reporting method with the same (client, task_id, now) signature."""
    if kind == "completed":
        return lambda c, t, now: s.complete_task(c, t, "url", now)
    if kind == "failed":
        return lambda c, t, now: s.fail_task(c, t, "boom", now)
    return lambda c, t, now: s.report_waiting(c, t, 5.0, 0, now)


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
