"""
linkup's additions to the plugin protocol, through a real ``linkup``:
CANCEL_TASK and CANCEL_SESSION, RESUME_SESSION after a master went away,
rate-limited workers resting, and the per-attempt time limit.

Task ids are not in TASKS_SUBMITTED, so a test learns them where linkup shows
them: in the workers' TASK_ASSIGNED.
"""

from __future__ import annotations

import base64
import json
import random
import time
from typing import Any

from tests.e2e.harness import UNIT, Plugin
from tests.e2e.protocol_helpers import (
    RESULTS,
    Upload,
    expect_assignment,
    expect_error,
    expect_silence,
    expect_stats,
    get_stats,
    heartbeat,
    in_background,
    make_task,
    result_url_for,
    submit,
    types_in_backlog,
    upload_forever,
    watching,
)
from tests.e2e.raw_clients import wait_for_log

# Everything the core keeps for RESUME_SESSION and replays, in order.
OUTCOMES = (*RESULTS, "TASK_CANCELLED", "SESSION_COMPLETED", "SESSION_CANCELLED")


def files_named(prefix: str, count: int) -> dict[str, bytes]:
    return {
        f"{prefix}{index}.png": f"{prefix} file {index}".encode() * (index + 1)
        for index in range(count)
    }


async def complete(worker: Plugin, task: dict[str, Any]) -> str:
    """
    Report ``task`` done with the URL its content gives; return the URL.

    """
    url = result_url_for(base64.b64decode(task["dataBase64"]))
    await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl=url)
    return url


async def outcomes_until(plugin: Plugin, last: str) -> list[dict[str, Any]]:
    """
    The outcome messages ``plugin`` receives, in order, up to ``last``.

    """
    received = []
    while True:
        message = await plugin.expect(*OUTCOMES)
        received.append(message)
        if message["type"] == last:
            return received


async def assert_quiet(plugin: Plugin, *message_types: str) -> dict[str, Any]:
    """
    Synchronise with the core through GET_STATS, then check that nothing of
    ``message_types`` (nor an ERROR) came before its answer; return the stats.

    The core answers in the order it handles messages, so whatever an earlier
    message of this connection caused is in the backlog by then.

    """
    stats = await get_stats(plugin)
    unexpected = [m for m in plugin.backlog if m["type"] in (*message_types, "ERROR")]
    assert not unexpected, unexpected
    return stats


# CANCEL_TASK


async def test_cancel_task_of_a_queued_task_takes_it_out_of_the_queue(start):
    """A cancelled queued task never reaches a worker; the rest of the session runs."""
    clients = await start()
    leaving, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    files = files_named("q", 3)
    await submit(master, session_id, [make_task(n, d) for n, d in files.items()])

    # The first task goes back to the queue when its worker leaves.
    queued = (await leaving.expect("TASK_ASSIGNED"))["task"]
    await leaving.close()
    await expect_stats(master, workerCount=0)

    await master.send("CANCEL_TASK", taskId=queued["id"])
    cancelled = await master.expect("TASK_CANCELLED")
    assert cancelled == {
        "type": "TASK_CANCELLED",
        "taskId": queued["id"],
        "filename": queued["filename"],
        "reason": "cancelled by its master",
        "progress": {"completed": 0, "failed": 0, "cancelled": 1, "total": 3},
    }

    worker, _ = await clients.worker()
    done = set()
    for _ in range(2):
        task = (await worker.expect("TASK_ASSIGNED"))["task"]
        assert task["id"] != queued["id"], task
        done.add(task["filename"])
        await complete(worker, task)
    assert done == set(files) - {queued["filename"]}

    outcomes = await outcomes_until(master, "SESSION_COMPLETED")
    assert [m["type"] for m in outcomes] == [
        "TASK_COMPLETED",
        "TASK_COMPLETED",
        "SESSION_COMPLETED",
    ]
    assert {m["filename"] for m in outcomes[:2]} == done
    final = {"completed": 2, "failed": 0, "cancelled": 1, "total": 3}
    assert outcomes[1]["progress"] == final
    assert outcomes[2] == {
        "type": "SESSION_COMPLETED",
        "sessionId": session_id,
        "stats": final,
    }
    await assert_quiet(worker, "TASK_ASSIGNED")
    await assert_quiet(master, *OUTCOMES)


async def test_cancel_task_of_a_held_task_tells_the_worker_and_drops_its_report(
    start,
):
    """
    The worker holding a cancelled task is told; its later report is accepted
    quietly and never reaches the master; the session completes once the rest
    has ended.
    """
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(
        master, session_id, [make_task(n, d) for n, d in files_named("h", 2).items()]
    )
    held = (await worker.expect("TASK_ASSIGNED"))["task"]

    await master.send("CANCEL_TASK", taskId=held["id"])
    cancelled = await master.expect("TASK_CANCELLED")
    assert cancelled["taskId"] == held["id"]
    assert cancelled["filename"] == held["filename"]
    assert cancelled["progress"] == {
        "completed": 0,
        "failed": 0,
        "cancelled": 1,
        "total": 2,
    }
    told = await worker.expect("TASK_CANCELLED")
    assert told == {
        "type": "TASK_CANCELLED",
        "taskId": held["id"],
        "reason": "cancelled by its master",
    }
    # Still busy with it until it reports: no second file meanwhile.
    await assert_quiet(worker, "TASK_ASSIGNED")

    # The plugin does not know TASK_CANCELLED: it finishes and reports.
    await worker.send("TASK_COMPLETED", taskId=held["id"], resultUrl="https://late/h")
    rest = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert "ERROR" not in types_in_backlog(worker), worker.backlog
    assert rest["id"] != held["id"]
    url = await complete(worker, rest)

    outcomes = await outcomes_until(master, "SESSION_COMPLETED")
    final = {"completed": 1, "failed": 0, "cancelled": 1, "total": 2}
    assert outcomes == [
        {
            "type": "TASK_COMPLETED",
            "taskId": rest["id"],
            "filename": rest["filename"],
            "resultUrl": url,
            "progress": final,
        },
        {"type": "SESSION_COMPLETED", "sessionId": session_id, "stats": final},
    ]
    await assert_quiet(worker, "TASK_ASSIGNED")
    await assert_quiet(master, *OUTCOMES)
    assert "https://late/h" not in json.dumps(master.backlog)


async def test_cancel_task_of_an_unknown_or_ended_task_is_refused(start):
    """CANCEL_TASK of an id that is not queued or running: unknown_task."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task("one.png", b"one")])

    await master.send("CANCEL_TASK", taskId="t-nothing-1")
    await expect_error(master, "unknown_task")

    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    await complete(worker, task)
    await master.expect("SESSION_COMPLETED")
    await master.send("CANCEL_TASK", taskId=task["id"])
    await expect_error(master, "unknown_task")
    await assert_quiet(worker, "TASK_CANCELLED")


async def test_cancel_task_by_a_connection_that_is_not_its_master_is_refused(start):
    """Another master, or the worker itself, cannot cancel a task: unknown_task."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    other, _, _ = await clients.master()
    await submit(master, session_id, [make_task("mine.png", b"mine")])
    task = (await worker.expect("TASK_ASSIGNED"))["task"]

    await other.send("CANCEL_TASK", taskId=task["id"])
    await expect_error(other, "unknown_task")
    await worker.send("CANCEL_TASK", taskId=task["id"])
    await expect_error(worker, "unknown_task")

    # Nothing happened to the task: it completes as usual.
    await assert_quiet(worker, "TASK_CANCELLED")
    url = await complete(worker, task)
    completed = await master.expect("TASK_COMPLETED")
    assert completed["resultUrl"] == url
    assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}
    await master.expect("SESSION_COMPLETED")
    await assert_quiet(other, *OUTCOMES)


# CANCEL_SESSION


async def test_cancel_session_ends_it_and_its_queue_never_reaches_workers(start):
    """
    SESSION_CANCELLED with the stats; the held task's worker is told; queued
    tasks reach nobody; the session takes no more tasks.
    """
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(
        master, session_id, [make_task(n, d) for n, d in files_named("c", 4).items()]
    )
    held = (await worker.expect("TASK_ASSIGNED"))["task"]

    await master.send("CANCEL_SESSION", sessionId=session_id)
    cancelled = await master.expect("SESSION_CANCELLED")
    assert cancelled == {
        "type": "SESSION_CANCELLED",
        "sessionId": session_id,
        "stats": {"completed": 0, "failed": 0, "cancelled": 4, "total": 4},
    }
    told = await worker.expect("TASK_CANCELLED")
    assert told == {
        "type": "TASK_CANCELLED",
        "taskId": held["id"],
        "reason": "cancelled by its master",
    }

    # The worker finishes anyway; a newcomer joins: neither gets the queue.
    await worker.send("TASK_COMPLETED", taskId=held["id"], resultUrl="https://late/c")
    newcomer, _ = await clients.worker()
    await assert_quiet(worker, "TASK_ASSIGNED")
    stats = await assert_quiet(newcomer, "TASK_ASSIGNED")
    assert stats["pendingTasks"] == 0
    assert stats["activeSessions"] == 0
    assert stats["idleWorkers"] == 2

    await master.send(
        "SUBMIT_TASKS", sessionId=session_id, tasks=[make_task("more.png", b"more")]
    )
    await expect_error(master, "session_closed")
    await master.send("CANCEL_SESSION", sessionId=session_id)
    await expect_error(master, "session_closed")
    await assert_quiet(master, *OUTCOMES)
    await assert_quiet(newcomer, "TASK_ASSIGNED")


# RESUME_SESSION


async def test_a_master_that_comes_back_resumes_with_every_result_once(
    start, deployment
):
    """
    A master leaves after its first result; the queue pauses while the held
    task finishes; RESUME_SESSION {after: 1} gets SESSION_RESUMED, the missed
    result, then the rest of the session: every outcome exactly once.
    """
    clients = await start("--resume-grace", f"{5 * UNIT:g}")
    linkup = deployment.processes[-1]
    first_worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    files = files_named("r", 5)
    await submit(master, session_id, [make_task(n, d) for n, d in files.items()])

    first = (await first_worker.expect("TASK_ASSIGNED"))["task"]
    await complete(first_worker, first)
    seen = [await master.expect(*OUTCOMES)]
    held = (await first_worker.expect("TASK_ASSIGNED"))["task"]
    await master.close()
    await wait_for_log(linkup, f"session paused, master away session={session_id}")

    # While the master is away: the held task finishes, nothing new goes out,
    # not even to an idle worker that joins.
    held_url = await complete(first_worker, held)
    second_worker, _ = await clients.worker()
    await assert_quiet(first_worker, "TASK_ASSIGNED")
    stats = await assert_quiet(second_worker, "TASK_ASSIGNED")
    assert stats["pendingTasks"] == 3
    assert stats["idleWorkers"] == 2
    assert stats["activeSessions"] == 1

    uploads: list[Upload] = []
    back = await clients.connect()
    async with in_background(
        *(
            upload_forever(worker, uploads, random.Random(i), upload_time=0.05 * UNIT)
            for i, worker in enumerate((first_worker, second_worker))
        )
    ) as background:
        await back.send("RESUME_SESSION", sessionId=session_id, after=1)
        resumed = await back.expect("SESSION_RESUMED")
        rest = await watching(background, outcomes_until(back, "SESSION_COMPLETED"))
    assert resumed == {
        "type": "SESSION_RESUMED",
        "sessionId": session_id,
        "state": "open",
        "results": 2,
        "stats": {"completed": 2, "failed": 0, "total": 5},
    }
    # The missed result first, as the master would have had it.
    assert rest[0] == {
        "type": "TASK_COMPLETED",
        "taskId": held["id"],
        "filename": held["filename"],
        "resultUrl": held_url,
        "progress": {"completed": 2, "failed": 0, "total": 5},
    }
    assert [m["type"] for m in rest[1:]] == [
        *["TASK_COMPLETED"] * 3,
        "SESSION_COMPLETED",
    ]
    assert rest[-1]["stats"] == {"completed": 5, "failed": 0, "total": 5}

    # Every file's outcome exactly once, over both connections, and every
    # file handed out once.
    results = seen + rest[:-1]
    assert sorted(m["filename"] for m in results) == sorted(files)
    assert len({m["taskId"] for m in results}) == 5
    for message in results:
        assert message["resultUrl"] == result_url_for(files[message["filename"]])
    assigned = [first["id"], held["id"], *(u.task_id for u in uploads)]
    assert sorted(assigned) == sorted(m["taskId"] for m in results)
    await assert_quiet(back, *OUTCOMES)


async def test_a_session_whose_master_does_not_come_back_ends_after_the_grace(
    start,
):
    """
    With --resume-grace 1 unit: the held task's worker is told TASK_CANCELLED
    once the grace is over, not before; a RESUME_SESSION after that is
    refused with unknown_session; the queue is gone.
    """
    grace = 1 * UNIT
    clients = await start("--resume-grace", f"{grace:g}")
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(
        master, session_id, [make_task(n, d) for n, d in files_named("g", 3).items()]
    )
    held = (await worker.expect("TASK_ASSIGNED"))["task"]

    left_at = time.monotonic()
    await master.close()
    cancelled = await worker.expect("TASK_CANCELLED")
    assert time.monotonic() - left_at >= 0.95 * grace
    assert cancelled == {
        "type": "TASK_CANCELLED",
        "taskId": held["id"],
        "reason": "the master closed its session",
    }

    back = await clients.connect()
    await back.send("RESUME_SESSION", sessionId=session_id, after=0)
    await expect_error(back, "unknown_session")

    # The worker's report is accepted quietly and it gets nothing more.
    await worker.send("TASK_COMPLETED", taskId=held["id"], resultUrl="https://late/g")
    stats = await assert_quiet(worker, "TASK_ASSIGNED")
    assert stats["pendingTasks"] == 0
    assert stats["activeSessions"] == 0
    assert stats["idleWorkers"] == 1
    await assert_quiet(back, *OUTCOMES, "SESSION_RESUMED")


async def test_resume_of_a_completed_session_replays_everything(start):
    """
    RESUME_SESSION of a session that completed: SESSION_RESUMED (completed),
    then every outcome as first sent, SESSION_COMPLETED included.
    """
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    files = files_named("d", 2)
    await submit(master, session_id, [make_task(n, d) for n, d in files.items()])
    for _ in files:
        await complete(worker, (await worker.expect("TASK_ASSIGNED"))["task"])
    original = await outcomes_until(master, "SESSION_COMPLETED")
    assert len(original) == 3
    await master.close()

    back = await clients.connect()
    await back.send("RESUME_SESSION", sessionId=session_id)
    resumed = await back.expect("SESSION_RESUMED")
    assert resumed == {
        "type": "SESSION_RESUMED",
        "sessionId": session_id,
        "state": "completed",
        "results": 3,
        "stats": {"completed": 2, "failed": 0, "total": 2},
    }
    assert await outcomes_until(back, "SESSION_COMPLETED") == original
    await assert_quiet(back, *OUTCOMES)

    # Asking again from the end replays nothing; the session takes no tasks.
    await back.send("RESUME_SESSION", sessionId=session_id, after=3)
    again = await back.expect("SESSION_RESUMED")
    assert again["results"] == 3
    await assert_quiet(back, *OUTCOMES)
    await back.send(
        "SUBMIT_TASKS", sessionId=session_id, tasks=[make_task("late.png", b"l")]
    )
    await expect_error(back, "session_closed")
    await assert_quiet(worker, "TASK_ASSIGNED")


async def test_a_plugin_master_that_starts_over_is_served_as_before(start, deployment):
    """
    A plugin master never resumes: it reconnects with a new session. Its new
    files are served at once by the worker, and it sees nothing of the old
    session, which stays paused behind it.
    """
    clients = await start()
    linkup = deployment.processes[-1]
    worker, _ = await clients.worker()
    master, old_session, _ = await clients.master()
    await submit(
        master, old_session, [make_task(n, d) for n, d in files_named("o", 3).items()]
    )
    old = (await worker.expect("TASK_ASSIGNED"))["task"]
    await master.close()
    await wait_for_log(linkup, f"session paused, master away session={old_session}")

    again, new_session, _ = await clients.master()
    files = files_named("n", 3)
    await submit(again, new_session, [make_task(n, d) for n, d in files.items()])
    await complete(worker, old)
    for _ in files:
        task = (await worker.expect("TASK_ASSIGNED"))["task"]
        assert task["filename"] in files, task
        await complete(worker, task)

    outcomes = await outcomes_until(again, "SESSION_COMPLETED")
    assert sorted(m["filename"] for m in outcomes[:-1]) == sorted(files)
    assert [m["progress"]["total"] for m in outcomes[:-1]] == [3, 3, 3]
    assert outcomes[-1] == {
        "type": "SESSION_COMPLETED",
        "sessionId": new_session,
        "stats": {"completed": 3, "failed": 0, "total": 3},
    }
    assert old_session not in json.dumps(again.backlog)
    stats = await assert_quiet(worker, "TASK_ASSIGNED")
    assert stats["pendingTasks"] == 2  # the old session's, paused


# Rate limits


async def test_a_rate_limited_worker_rests_while_others_carry_on(start):
    """
    A worker that announced TASK_WAITING {waitTime: W} and then reported gets
    no new task before W seconds; another worker keeps getting tasks.
    """
    clients = await start()
    resting, resting_id = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(
        master, session_id, [make_task(n, d) for n, d in files_named("w", 8).items()]
    )
    limited = (await resting.expect("TASK_ASSIGNED"))["task"]
    busy, _ = await clients.worker()
    task = (await busy.expect("TASK_ASSIGNED"))["task"]

    wait = 2 * UNIT
    announced_at = time.monotonic()
    await resting.send(
        "TASK_WAITING",
        taskId=limited["id"],
        waitTime=wait,
        waitStart=int(time.time() * 1000),
    )
    await complete(resting, limited)
    waiting = await master.expect("TASK_WAITING")
    assert waiting["taskId"] == limited["id"]
    assert waiting["waitTime"] == wait
    assert waiting["workerId"] == resting_id

    # The other worker goes on: three more tasks while the first rests.
    for _ in range(3):
        await complete(busy, task)
        task = (await busy.expect("TASK_ASSIGNED"))["task"]
    stats = await assert_quiet(resting, "TASK_ASSIGNED")
    assert time.monotonic() - announced_at < wait, "too slow to tell"
    assert stats["pendingTasks"] == 3

    # Once the wait is over, it gets the next one.
    await resting.expect("TASK_ASSIGNED")
    rested = time.monotonic() - announced_at
    assert wait <= rested < wait + 3 * UNIT


# Attempt time limit


async def test_an_attempt_past_the_task_timeout_goes_to_another_worker(start):
    """
    --task-timeout: a worker that heartbeats but never reports is told
    TASK_CANCELLED, the task goes to another worker, and the late report is
    refused with task_not_held and never reaches the master.
    """
    limit = 1 * UNIT
    clients = await start("--task-timeout", f"{limit:g}")
    workers = [(await clients.worker())[0] for _ in range(2)]
    async with in_background(*(heartbeat(worker) for worker in workers)):
        master, session_id, _ = await clients.master()
        await submit(master, session_id, [make_task("slow.png", b"never ends")])
        holder, first = await expect_assignment(workers)
        assigned_at = time.monotonic()
        (other,) = [worker for worker in workers if worker is not holder]

        cancelled = await holder.expect("TASK_CANCELLED")
        assert time.monotonic() - assigned_at >= 0.9 * limit
        assert cancelled == {
            "type": "TASK_CANCELLED",
            "taskId": first["task"]["id"],
            "reason": f"no result {limit:g}s after assignment",
        }
        second = await other.expect("TASK_ASSIGNED")
        assert second["task"] == first["task"]

        await holder.send(
            "TASK_COMPLETED", taskId=first["task"]["id"], resultUrl="https://late/s"
        )
        await expect_error(holder, "task_not_held")
        url = await complete(other, second["task"])

        completed = await master.expect(*RESULTS)
        assert completed["type"] == "TASK_COMPLETED"
        assert completed["resultUrl"] == url
        assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}
        await master.expect("SESSION_COMPLETED")
        await assert_quiet(master, *OUTCOMES)
        assert "https://late/s" not in json.dumps(master.backlog)


async def test_an_announced_wait_extends_the_attempts_time_limit(start):
    """
    --task-timeout counts the waitTime a worker announced: a worker that
    waits out a rate limit longer than the limit keeps its task.
    """
    limit = 1 * UNIT
    clients = await start("--task-timeout", f"{limit:g}")
    worker, _ = await clients.worker()
    spare, _ = await clients.worker()
    async with in_background(heartbeat(worker), heartbeat(spare)):
        master, session_id, _ = await clients.master()
        await submit(master, session_id, [make_task("patient.png", b"waits")])
        holder, assigned = await expect_assignment([worker, spare])
        (other,) = [w for w in (worker, spare) if w is not holder]
        await holder.send(
            "TASK_WAITING",
            taskId=assigned["task"]["id"],
            waitTime=limit,
            waitStart=int(time.time() * 1000),
        )
        await master.expect("TASK_WAITING")

        # Past the limit alone, within the limit plus the wait.
        await expect_silence(holder, "TASK_CANCELLED", within=1.5 * limit)
        url = await complete(holder, assigned["task"])
        completed = await master.expect(*RESULTS)
        assert completed["resultUrl"] == url
        await master.expect("SESSION_COMPLETED")
        await assert_quiet(holder, "TASK_CANCELLED")
        await assert_quiet(other, "TASK_ASSIGNED")


async def test_a_worker_cannot_resume_a_session(start):
    """RESUME_SESSION from a registered worker: wrong_role; the session is intact."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await worker.send("RESUME_SESSION", sessionId=session_id)
    await expect_error(worker, "wrong_role")
    await submit(master, session_id, [make_task("still.png", b"mine")])
    url = await complete(worker, (await worker.expect("TASK_ASSIGNED"))["task"])
    completed = await master.expect(*RESULTS)
    assert completed["resultUrl"] == url
    await master.expect("SESSION_COMPLETED")


async def test_an_ended_session_is_forgotten_after_the_retention(start, deployment):
    """After --retention, RESUME_SESSION of a completed session: unknown_session."""
    clients = await start("--retention", f"{UNIT:g}")
    linkup = deployment.processes[-1]
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task("kept.png", b"for a while")])
    await complete(worker, (await worker.expect("TASK_ASSIGNED"))["task"])
    await master.expect("SESSION_COMPLETED")

    await wait_for_log(linkup, f"ended session forgotten session={session_id}")
    back = await clients.connect()
    await back.send("RESUME_SESSION", sessionId=session_id)
    await expect_error(back, "unknown_session")
