"""
Bad input: every refused request gets an ERROR, and nobody is disturbed by it.
"""

from __future__ import annotations

import json

import pytest
from websockets.exceptions import ConnectionClosed

from tests.e2e.harness import UNIT
from tests.e2e.protocol_helpers import (
    assert_still_served,
    expect_assignment,
    expect_error,
    expect_silence,
    get_stats,
    make_task,
    submit,
    types_in_backlog,
)

# Messages that are not understood at all.


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        pytest.param('{"type": "GET_STATS"', "invalid_json", id="malformed-json"),
        pytest.param("", "invalid_json", id="empty"),
        pytest.param('[{"type": "GET_STATS"}]', "invalid_json", id="json-array"),
        pytest.param('"GET_STATS"', "invalid_json", id="json-string"),
        pytest.param("null", "invalid_json", id="json-null"),
        pytest.param(b"\xff\xfe{}", "invalid_json", id="binary-not-utf8"),
        pytest.param('{"type": "FLY_TO_THE_MOON"}', "unknown_type", id="unknown-type"),
        pytest.param('{"type": "TASK_ASSIGNED"}', "unknown_type", id="server-type"),
        pytest.param('{"taskId": "t-1"}', "invalid_field", id="missing-type"),
        pytest.param('{"type": 7}', "invalid_field", id="type-not-string"),
        pytest.param('{"type": "TASK_COMPLETED"}', "invalid_field", id="no-fields"),
        pytest.param(
            '{"type": "TASK_FAILED", "taskId": "t-1", "error": 404}',
            "invalid_field",
            id="error-not-string",
        ),
        pytest.param(
            '{"type": "TASK_WAITING", "taskId": "t", "waitTime": "30", "waitStart": 1}',
            "invalid_field",
            id="wait-time-string",
        ),
    ],
)
async def test_a_message_that_is_not_understood_gets_an_error(start, raw, code):
    """Unparseable or ill-typed messages get ERROR with a code; the connection lives."""
    clients = await start()
    bystander, _ = await clients.worker()
    sender = await clients.connect()
    await sender.send_raw(raw)
    await expect_error(sender, code)
    await assert_still_served(sender, bystander)


async def test_a_binary_frame_with_json_is_accepted_like_text(start):
    """Binary frames holding JSON work exactly like text frames."""
    clients = await start()
    worker = await clients.connect()
    await worker.send_raw(json.dumps({"type": "WORKER_REGISTER"}).encode())
    await worker.expect("WORKER_REGISTERED")
    master = await clients.connect()
    await master.send_raw(b'{"type": "CREATE_SESSION"}')
    session_id = (await master.expect("SESSION_CREATED"))["sessionId"]
    message = {
        "type": "SUBMIT_TASKS",
        "sessionId": session_id,
        "tasks": [make_task("二进制.png", b"\x00binary\xff")],
    }
    await master.send_raw(json.dumps(message, ensure_ascii=False).encode())
    await master.expect("TASKS_SUBMITTED")
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert task["filename"] == "二进制.png"
    await worker.send_raw(
        json.dumps(
            {"type": "TASK_COMPLETED", "taskId": task["id"], "resultUrl": "https://x/b"}
        ).encode()
    )
    assert (await master.expect("TASK_COMPLETED"))["resultUrl"] == "https://x/b"
    await master.send_raw(b'{"type": "GET_STATS"}')
    await master.expect("STATS_UPDATE")


async def test_unknown_extra_fields_are_ignored(start):
    """Fields a newer plugin might add do not make a message invalid."""
    clients = await start()
    worker = await clients.connect()
    await worker.send("WORKER_REGISTER", version="9.9", account="someone")
    await worker.expect("WORKER_REGISTERED")
    master = await clients.connect()
    await master.send("CREATE_SESSION", note="extra")
    session_id = (await master.expect("SESSION_CREATED"))["sessionId"]
    task = {**make_task("e.png", b"e"), "lastModified": 1700000000000}
    await master.send("SUBMIT_TASKS", sessionId=session_id, tasks=[task], batch=1)
    await master.expect("TASKS_SUBMITTED")
    assert "ERROR" not in types_in_backlog(master)


# SUBMIT_TASKS with bad fields.


def good_task() -> dict:
    return make_task("ok.png", b"fine")


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="missing-tasks"),
        pytest.param({"tasks": "all of them"}, id="tasks-not-a-list"),
        pytest.param({"tasks": [{**good_task(), "size": "4"}]}, id="size-as-string"),
        pytest.param({"tasks": [{**good_task(), "size": -1}]}, id="negative-size"),
        pytest.param({"tasks": [{**good_task(), "size": 1.5}]}, id="fractional-size"),
        pytest.param({"tasks": [{**good_task(), "filename": 12}]}, id="filename-int"),
        pytest.param(
            {"tasks": [{k: v for k, v in good_task().items() if k != "dataBase64"}]},
            id="missing-data",
        ),
        pytest.param({"tasks": [good_task(), "not a task"]}, id="task-not-object"),
        pytest.param(
            {"tasks": [good_task(), {**good_task(), "size": -5}]},
            id="second-task-bad",
        ),
    ],
)
async def test_submit_tasks_with_a_bad_field_is_refused_whole(start, fields):
    """A SUBMIT_TASKS with a bad field gets invalid_field and queues nothing."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await master.send("SUBMIT_TASKS", sessionId=session_id, **fields)
    await expect_error(master, "invalid_field")
    stats = await get_stats(master)
    assert stats["pendingTasks"] == 0
    assert stats["activeTasks"] == 0
    assert "TASK_ASSIGNED" not in types_in_backlog(worker)
    await assert_still_served(worker)

    # The session is still open and usable.
    await submit(master, session_id, [good_task()])
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert task["filename"] == "ok.png"


async def test_submit_tasks_without_session_id_is_invalid(start):
    """SUBMIT_TASKS with no sessionId gets invalid_field."""
    clients = await start()
    master, _, _ = await clients.master()
    await master.send("SUBMIT_TASKS", tasks=[good_task()])
    await expect_error(master, "invalid_field")
    await assert_still_served(master)


# Sessions.


async def test_submit_tasks_to_an_unknown_session_is_refused(start):
    """A sessionId that does not exist gets unknown_session."""
    clients = await start()
    worker, _ = await clients.worker()
    master, _, _ = await clients.master()
    await master.send("SUBMIT_TASKS", sessionId="s-does-not-exist", tasks=[good_task()])
    await expect_error(master, "unknown_session")
    await assert_still_served(master, worker)
    assert "TASK_ASSIGNED" not in types_in_backlog(worker)


async def test_submit_tasks_without_creating_a_session_is_refused(start):
    """A connection that never sent CREATE_SESSION cannot submit."""
    clients = await start()
    plain = await clients.connect()
    await plain.send("SUBMIT_TASKS", sessionId="s-1", tasks=[good_task()])
    await expect_error(plain, "unknown_session")
    await assert_still_served(plain)


async def test_submit_tasks_to_another_masters_session_is_refused(start):
    """A master cannot add files to a session it did not create."""
    clients = await start()
    worker, _ = await clients.worker()
    owner, session_id, _ = await clients.master()
    thief, _, _ = await clients.master()
    await thief.send("SUBMIT_TASKS", sessionId=session_id, tasks=[good_task()])
    await expect_error(thief, "unknown_session")
    await assert_still_served(thief, owner, worker)
    assert "TASK_ASSIGNED" not in types_in_backlog(worker)

    # The owner's session is untouched: its first file is its own.
    await submit(owner, session_id, [make_task("mine.png", b"mine")])
    assert (await worker.expect("TASK_ASSIGNED"))["task"]["filename"] == "mine.png"


async def test_submit_tasks_after_session_completed_is_refused(start):
    """A finished session accepts no more files: session_closed."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [good_task()])
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/1")
    await master.expect("SESSION_COMPLETED")

    await master.send("SUBMIT_TASKS", sessionId=session_id, tasks=[good_task()])
    await expect_error(master, "session_closed")
    await assert_still_served(master, worker)

    # A new session on the same connection works.
    await master.send("CREATE_SESSION")
    new_session = (await master.expect("SESSION_CREATED"))["sessionId"]
    assert new_session != session_id
    await submit(master, new_session, [good_task()])
    await worker.expect("TASK_ASSIGNED")


# Reports about tasks.


async def held_task(clients):
    """A master, the worker holding its one task, an idle worker, and the task."""
    workers = [(await clients.worker())[0] for _ in range(2)]
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task("held.png", b"held")])
    holder, assigned = await expect_assignment(workers)
    (idle,) = [worker for worker in workers if worker is not holder]
    return master, holder, idle, assigned["task"]


@pytest.mark.parametrize(
    ("report", "fields"),
    [
        ("TASK_COMPLETED", {"resultUrl": "https://evil/x"}),
        ("TASK_FAILED", {"error": "not mine"}),
        ("TASK_WAITING", {"filename": "held.png", "waitTime": 5, "waitStart": 1}),
    ],
)
async def test_a_report_from_a_worker_not_holding_the_task_is_refused(
    start, report, fields
):
    """Only the holder may report on a task; another worker gets task_not_held."""
    clients = await start()
    master, holder, other, task = await held_task(clients)
    await other.send(report, taskId=task["id"], **fields)
    await expect_error(other, "task_not_held")
    await assert_still_served(other, holder, master)
    assert not {"TASK_COMPLETED", "TASK_FAILED", "TASK_WAITING"} & set(
        types_in_backlog(master)
    )

    # The holder still holds it, and its result is the one that counts.
    await holder.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://ok/x")
    completed = await master.expect("TASK_COMPLETED")
    assert completed["resultUrl"] == "https://ok/x"
    assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}


async def test_a_report_from_a_master_is_refused(start):
    """A master reporting TASK_COMPLETED gets wrong_role."""
    clients = await start()
    master, holder, _, task = await held_task(clients)
    await master.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/m")
    await expect_error(master, "wrong_role")
    await assert_still_served(master, holder)
    assert "TASK_COMPLETED" not in types_in_backlog(master)


async def test_a_duplicate_report_after_completion_is_refused(start):
    """A second report on a finished task gets task_not_held and no new result."""
    clients = await start()
    master, holder, _, task = await held_task(clients)
    await holder.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/1")
    await master.expect("TASK_COMPLETED")
    await master.expect("SESSION_COMPLETED")

    await holder.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/2")
    await expect_error(holder, "task_not_held")
    await holder.send("TASK_FAILED", taskId=task["id"], error="late")
    await expect_error(holder, "task_not_held")
    await assert_still_served(holder)
    await expect_silence(
        master, "TASK_COMPLETED", "TASK_FAILED", "SESSION_COMPLETED", within=0.3 * UNIT
    )


async def test_a_report_on_an_unknown_task_is_refused(start):
    """An idle worker reporting a task id that never existed gets task_not_held."""
    clients = await start()
    worker, _ = await clients.worker()
    await worker.send("TASK_COMPLETED", taskId="t-nope", resultUrl="https://x")
    await expect_error(worker, "task_not_held")
    await assert_still_served(worker)


# Roles.


async def test_heartbeat_from_an_unregistered_connection_is_refused(start):
    """WORKER_HEARTBEAT before WORKER_REGISTER gets wrong_role."""
    clients = await start()
    plain = await clients.connect()
    await plain.send("WORKER_HEARTBEAT")
    await expect_error(plain, "wrong_role")
    await assert_still_served(plain)
    # Registering afterwards works.
    await plain.send("WORKER_REGISTER")
    await plain.expect("WORKER_REGISTERED")


async def test_heartbeat_from_a_master_is_refused(start):
    """A master's WORKER_HEARTBEAT gets wrong_role."""
    clients = await start()
    master, _, _ = await clients.master()
    await master.send("WORKER_HEARTBEAT")
    await expect_error(master, "wrong_role")
    await assert_still_served(master)


async def test_a_worker_cannot_create_a_session(start):
    """CREATE_SESSION on a worker connection gets wrong_role."""
    clients = await start()
    worker, _ = await clients.worker()
    await worker.send("CREATE_SESSION")
    await expect_error(worker, "wrong_role")
    await assert_still_served(worker)


async def test_a_master_cannot_register_as_worker(start):
    """WORKER_REGISTER on a master connection gets wrong_role."""
    clients = await start()
    master, _, _ = await clients.master()
    await master.send("WORKER_REGISTER")
    await expect_error(master, "wrong_role")
    await assert_still_served(master)
    stats = await get_stats(master)
    assert stats["workerCount"] == 0


async def test_registering_twice_keeps_the_worker_id(start):
    """A second WORKER_REGISTER on the same connection is harmless."""
    clients = await start()
    worker, worker_id = await clients.worker()
    await worker.send("WORKER_REGISTER")
    again = await worker.expect("WORKER_REGISTERED")
    assert again["workerId"] == worker_id
    assert again["serverStats"]["workerCount"] == 1


# Size limits.


async def test_a_message_over_the_size_limit_is_closed_with_1009_and_logged(
    start, deployment
):
    """A too-large batch closes its connection with 1009 and a WARNING in the log."""
    clients = await start("--max-message-size", "64KiB")
    bystander, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    # Under the limit: accepted.
    await submit(master, session_id, [make_task("small.png", b"s" * 30_000)])
    await bystander.expect("TASK_ASSIGNED")

    await master.send(
        "SUBMIT_TASKS",
        sessionId=session_id,
        tasks=[make_task("big.png", b"b" * 80_000)],
    )
    with pytest.raises(ConnectionClosed):
        await master.expect("ERROR")
    assert master.websocket.close_code == 1009, master.websocket.close_reason
    deployment.processes[0].wait_for_log("the limit is 65536 bytes")
    # Everyone else carries on.
    await assert_still_served(bystander)
    newcomer, _, _ = await clients.master()
    await assert_still_served(newcomer)
