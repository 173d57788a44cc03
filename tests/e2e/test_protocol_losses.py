"""
Lost clients: workers that disconnect or fall silent, masters that go away.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.harness import TIMEOUT, UNIT
from tests.e2e.protocol_helpers import (
    expect_assignment,
    expect_silence,
    expect_stats,
    get_stats,
    heartbeat,
    in_background,
    make_task,
    submit,
    types_in_backlog,
)

# Worker loss.


async def test_a_disconnected_workers_task_goes_to_another_worker(start):
    """A worker that closes while holding a task gives it to another, unchanged."""
    clients = await start()
    a, _ = await clients.worker()
    b, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    data = bytes(range(256)) * 40
    await submit(master, session_id, [make_task("lost.jpg", data, "image/jpeg")])

    holder, first = await expect_assignment([a, b])
    other = b if holder is a else a
    await holder.close()

    second = await other.expect("TASK_ASSIGNED")
    assert second["task"] == first["task"]
    await other.send(
        "TASK_COMPLETED", taskId=second["task"]["id"], resultUrl="https://x/l"
    )
    completed = await master.expect("TASK_COMPLETED")
    assert completed["filename"] == "lost.jpg"
    assert completed["resultUrl"] == "https://x/l"
    assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}
    await master.expect("SESSION_COMPLETED")
    assert "TASK_FAILED" not in types_in_backlog(master)


async def test_a_disconnect_uses_up_an_attempt(start):
    """A file that every worker drops ends as TASK_FAILED, not circling forever."""
    clients = await start("--max-attempts", "2")
    workers = [(await clients.worker())[0] for _ in range(3)]
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task("poison.png", b"kills workers")])

    holder, _ = await expect_assignment(workers)
    await holder.close()
    remaining = [w for w in workers if w is not holder]
    holder, _ = await expect_assignment(remaining)
    await holder.close()

    failed = await master.expect("TASK_FAILED")
    assert failed["filename"] == "poison.png"
    assert failed["progress"] == {"completed": 0, "failed": 1, "total": 1}
    await master.expect("SESSION_COMPLETED")
    (survivor,) = [w for w in remaining if w is not holder]
    await expect_silence(survivor, "TASK_ASSIGNED", within=0.3 * UNIT)


async def test_a_silent_worker_is_closed_and_its_task_reassigned(start):
    """A worker silent for --worker-timeout is closed; its task goes to another."""
    clients = await start("--worker-timeout", f"{UNIT:g}")
    registered_at = time.monotonic()
    silent, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task("s.png", b"silence")])
    first = await silent.expect("TASK_ASSIGNED")

    alive, alive_id = await clients.worker()
    async with in_background(heartbeat(alive)):
        await asyncio.wait_for(silent.websocket.wait_closed(), TIMEOUT)
        assert time.monotonic() - registered_at >= 0.9 * UNIT
        pushed = await expect_stats(master, workerCount=1)
        assert [w["id"] for w in pushed["workers"]] == [alive_id]

        second = await alive.expect("TASK_ASSIGNED")
        assert second["task"] == first["task"]
        await alive.send(
            "TASK_COMPLETED", taskId=second["task"]["id"], resultUrl="https://x/s"
        )
        completed = await master.expect("TASK_COMPLETED")
        assert completed["resultUrl"] == "https://x/s"
        assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}


async def test_a_heartbeating_worker_keeps_its_task_past_the_timeout(start):
    """A worker that heartbeats may hold a task far longer than --worker-timeout."""
    clients = await start("--worker-timeout", f"{UNIT:g}")
    workers = [(await clients.worker())[0] for _ in range(2)]
    async with in_background(*(heartbeat(worker) for worker in workers)):
        master, session_id, _ = await clients.master()
        await submit(master, session_id, [make_task("big.png", b"slow upload")])
        holder, assigned = await expect_assignment(workers)
        (spare,) = [worker for worker in workers if worker is not holder]

        # Two and a half timeouts of uploading: the file stays where it is.
        await expect_silence(spare, "TASK_ASSIGNED", within=2.5 * UNIT)
        assert holder.websocket.close_code is None
        stats = await get_stats(master)
        assert stats["workerCount"] == 2
        assert stats["activeTasks"] == 1
        assert stats["pendingTasks"] == 0

        await holder.send(
            "TASK_COMPLETED", taskId=assigned["task"]["id"], resultUrl="https://x/b"
        )
        completed = await master.expect("TASK_COMPLETED")
        assert completed["resultUrl"] == "https://x/b"
        assert "TASK_CANCELLED" not in types_in_backlog(holder)
        assert "ERROR" not in types_in_backlog(holder)


async def test_a_worker_that_only_reports_counts_as_alive(start):
    """Any message from a worker renews its lease, not only WORKER_HEARTBEAT."""
    clients = await start("--worker-timeout", f"{UNIT:g}")
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task(f"{i}.png", b"i") for i in range(6)])
    # Six uploads spread over 1.5 timeouts, with no heartbeat at all.
    for _ in range(6):
        task = (await worker.expect("TASK_ASSIGNED"))["task"]
        await expect_silence(worker, "TASK_CANCELLED", within=0.25 * UNIT)
        await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl="u")
    finished = await master.expect("SESSION_COMPLETED")
    assert finished["stats"] == {"completed": 6, "failed": 0, "total": 6}


# Master loss.


@pytest.mark.parametrize(
    ("report", "fields"),
    [
        ("TASK_COMPLETED", {"resultUrl": "https://x/late"}),
        ("TASK_FAILED", {"error": "upload aborted"}),
    ],
)
async def test_a_lost_master_cancels_its_tasks_and_frees_the_worker(
    start, report, fields
):
    """
    With --resume-grace 0, as the first server did, a lost master at once
    cancels its held task and drops the rest; the worker is freed.
    """
    clients = await start("--resume-grace", "0")
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(
        master, session_id, [make_task(f"m{i}.png", bytes([i]) * 10) for i in range(5)]
    )
    held = (await worker.expect("TASK_ASSIGNED"))["task"]
    await master.close()

    cancelled = await worker.expect("TASK_CANCELLED")
    assert cancelled["taskId"] == held["id"]

    # The plugin does not know TASK_CANCELLED: it finishes and reports as usual.
    await worker.send(report, taskId=held["id"], **fields)
    stats = await get_stats(worker)
    assert "ERROR" not in types_in_backlog(worker), worker.backlog
    assert "TASK_ASSIGNED" not in types_in_backlog(worker), worker.backlog
    assert stats["pendingTasks"] == 0
    assert stats["activeTasks"] == 0
    assert stats["activeSessions"] == 0
    assert stats["idleWorkers"] == 1

    # The freed worker serves the next master.
    second, second_session, _ = await clients.master()
    await submit(second, second_session, [make_task("next.png", b"next")])
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert task["filename"] == "next.png"
    await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/n")
    completed = await second.expect("TASK_COMPLETED")
    assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}
    await second.expect("SESSION_COMPLETED")


async def test_a_lost_masters_queued_tasks_never_reach_idle_workers(start):
    """Tasks still queued when their master leaves are dropped, not handed out."""
    clients = await start("--resume-grace", "0")
    busy, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task(f"q{i}.png", b"q") for i in range(3)])
    held = (await busy.expect("TASK_ASSIGNED"))["task"]
    await master.close()
    await busy.expect("TASK_CANCELLED")

    # A worker that joins now, and the freed worker, get nothing of it.
    late, _ = await clients.worker()
    await expect_stats(busy, workerCount=2)  # the push for the newcomer
    await busy.send("TASK_COMPLETED", taskId=held["id"], resultUrl="https://x/q")
    stats = await get_stats(busy)
    assert stats["pendingTasks"] == 0
    for worker in (busy, late):
        await expect_silence(worker, "TASK_ASSIGNED", within=0.3 * UNIT)
