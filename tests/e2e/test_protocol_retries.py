"""
Failed attempts: a file is tried again, and the master hears only the outcome.
"""

from __future__ import annotations

from tests.e2e.harness import UNIT
from tests.e2e.protocol_helpers import (
    expect_silence,
    make_task,
    submit,
    types_in_backlog,
)


async def test_two_failures_then_success_completes_without_task_failed(start):
    """Failed attempts are retried silently; the master only sees TASK_COMPLETED."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    task = make_task("flaky.png", b"\x89PNG flaky")
    await submit(master, session_id, [task])

    first = (await worker.expect("TASK_ASSIGNED"))["task"]
    for attempt in (1, 2):
        await worker.send(
            "TASK_FAILED", taskId=first["id"], error=f"HTTP 502 #{attempt}"
        )
        again = (await worker.expect("TASK_ASSIGNED"))["task"]
        assert again == first  # same id, same file

    await worker.send("TASK_COMPLETED", taskId=first["id"], resultUrl="https://x/ok")
    completed = await master.expect("TASK_COMPLETED")
    assert completed["taskId"] == first["id"]
    assert completed["filename"] == "flaky.png"
    assert completed["resultUrl"] == "https://x/ok"
    assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}
    finished = await master.expect("SESSION_COMPLETED")
    assert finished["stats"] == {"completed": 1, "failed": 0, "total": 1}
    # Results arrive in order: a TASK_FAILED would have come first.
    assert "TASK_FAILED" not in types_in_backlog(master)


async def test_three_failures_report_task_failed_with_the_last_error(start):
    """After a third failed attempt the master gets TASK_FAILED with the last error."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task("doomed.png", b"doomed")])

    task_id = None
    for attempt in (1, 2, 3):
        task = (await worker.expect("TASK_ASSIGNED"))["task"]
        task_id = task_id or task["id"]
        assert task["id"] == task_id
        await worker.send(
            "TASK_FAILED", taskId=task_id, error=f"图床返回 500 (attempt {attempt})"
        )

    failed = await master.expect("TASK_FAILED")
    assert failed["taskId"] == task_id
    assert failed["filename"] == "doomed.png"
    assert "图床返回 500 (attempt 3)" in failed["error"]
    assert failed["progress"] == {"completed": 0, "failed": 1, "total": 1}
    finished = await master.expect("SESSION_COMPLETED")
    assert finished["stats"] == {"completed": 0, "failed": 1, "total": 1}
    assert types_in_backlog(master).count("TASK_FAILED") == 0
    # Out of attempts: the file is not handed out a fourth time.
    await expect_silence(worker, "TASK_ASSIGNED", within=0.3 * UNIT)


async def test_a_retry_goes_to_the_front_of_the_queue(start):
    """A failed file is retried before files queued after it."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(
        master, session_id, [make_task(f"{n}.png", n.encode()) for n in ("a", "b")]
    )
    first = (await worker.expect("TASK_ASSIGNED"))["task"]
    await worker.send("TASK_FAILED", taskId=first["id"], error="timeout")
    retry = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert retry["id"] == first["id"]


async def test_max_attempts_option_sets_the_number_of_tries(start):
    """With --max-attempts 1 the first failure is reported to the master."""
    clients = await start("--max-attempts", "1")
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(
        master, session_id, [make_task("once.png", b"1"), make_task("ok.png", b"2")]
    )
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    await worker.send("TASK_FAILED", taskId=task["id"], error="quota exceeded")
    failed = await master.expect("TASK_FAILED")
    assert failed["taskId"] == task["id"]
    assert "quota exceeded" in failed["error"]
    assert failed["progress"] == {"completed": 0, "failed": 1, "total": 2}

    # The worker moves on to the next file; the session ends with both counted.
    following = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert following["id"] != task["id"]
    await worker.send("TASK_COMPLETED", taskId=following["id"], resultUrl="https://x/2")
    completed = await master.expect("TASK_COMPLETED")
    assert completed["progress"] == {"completed": 1, "failed": 1, "total": 2}
    finished = await master.expect("SESSION_COMPLETED")
    assert finished["stats"] == {"completed": 1, "failed": 1, "total": 2}


async def test_failures_are_counted_in_worker_stats(start):
    """A failed attempt shows in the worker's stats.failed."""
    clients = await start()
    worker, worker_id = await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task("x.png", b"x")])
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    await worker.send("TASK_FAILED", taskId=task["id"], error="boom")
    await worker.expect("TASK_ASSIGNED")
    await master.send("GET_STATS")

    # A STATS_UPDATE pushed before the failure may come first: skip such.
    while True:
        stats = (await master.expect("STATS_UPDATE"))["stats"]
        (entry,) = [w for w in stats["workers"] if w["id"] == worker_id]
        if entry["stats"]["failed"]:
            break
    assert entry["stats"]["failed"] == 1
    assert entry["status"] == "busy"
