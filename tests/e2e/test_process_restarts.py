"""
Durability with real processes: a core killed and restarted on its data dir,
linkup restarted on its data dir, a bridge killed, and storage that cannot be
used or fills up.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    FAST_LINK,
    NOTICE_WITHIN,
    TIMEOUT,
    UNIT,
    Plugin,
    Process,
    create_session,
    free_port,
    http_get,
    register_worker,
    wait_for_close,
    wait_ready,
)
from tests.e2e.protocol_helpers import (
    RESULTS,
    Upload,
    collect_results,
    expect_error,
    get_stats,
    heartbeat,
    in_background,
    make_task,
    result_url_for,
    upload_forever,
    watching,
)
from tests.e2e.raw_clients import wait_for_log

pytestmark = pytest.mark.usefixtures("close_plugins")


def _status(port: int) -> dict[str, Any]:
    status, _, body = http_get(f"http://127.0.0.1:{port}/status", timeout=3 * UNIT)
    assert status == 200, body
    return json.loads(body)


async def _status_async(port: int) -> dict[str, Any]:
    return await asyncio.to_thread(_status, port)


def _files(prefix: str, count: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {
        f"{prefix}-{index:02d}.png": rng.randbytes(rng.randint(1, 4000))
        for index in range(count)
    }


async def _submit(master: Plugin, session_id: str, files: dict[str, bytes]) -> None:
    await master.send(
        "SUBMIT_TASKS",
        sessionId=session_id,
        tasks=[make_task(name, data) for name, data in files.items()],
    )
    submitted = await master.expect("TASKS_SUBMITTED")
    assert submitted["taskCount"] == len(files), submitted


async def _complete(worker: Plugin, task: dict[str, Any]) -> str:
    """
    Report ``task`` done with the URL its content gives; return the URL.

    """
    url = result_url_for(base64.b64decode(task["dataBase64"]))
    await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl=url)
    return url


async def _assert_quiet(plugin: Plugin, *message_types: str) -> dict[str, Any]:
    """
    GET_STATS round trip, then check that none of ``message_types`` nor an
    ERROR arrived before its answer; return the stats.

    """
    stats = await get_stats(plugin)
    unexpected = [m for m in plugin.backlog if m["type"] in (*message_types, "ERROR")]
    assert not unexpected, unexpected
    return stats


def _check_every_file_once(
    results: list[dict[str, Any]], files: dict[str, bytes]
) -> None:
    assert sorted(m["filename"] for m in results) == sorted(files)
    assert len({m["taskId"] for m in results}) == len(files)
    for message in results:
        assert message["type"] == "TASK_COMPLETED", message
        assert message["resultUrl"] == result_url_for(files[message["filename"]])


# The core killed and restarted under its bridge.


async def test_a_core_killed_mid_session_loses_nothing_and_closes_nobody(
    deployment,
):
    """
    kill -9 of the core while a master's 20 files are in progress, restarted
    on its data dir: the master (never reconnecting) gets every result exactly
    once, a report made while the core was down included; the workers keep
    their ids; no connection is closed.
    """
    core, endpoint = deployment.core(*FAST_LINK)
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    first, first_id = await register_worker(url)
    second, second_id = await register_worker(url)
    workers = (first, second)
    master, session_id, _ = await create_session(url)
    files = _files("kill", 20, seed=9)
    await _submit(master, session_id, files)

    assigned: list[str] = []
    held = {}
    for worker in workers:
        held[worker] = (await worker.expect("TASK_ASSIGNED"))["task"]
        assigned.append(held[worker]["id"])
    for _ in range(3):
        for worker in workers:
            await _complete(worker, held[worker])
            held[worker] = (await worker.expect("TASK_ASSIGNED"))["task"]
            assigned.append(held[worker]["id"])
    results = [await master.expect(*RESULTS) for _ in range(6)]

    # One more report, and the core dies right after the next assignment
    # reaches the worker.
    await _complete(second, held[second])
    held[second] = (await second.expect("TASK_ASSIGNED"))["task"]
    assigned.append(held[second]["id"])
    core.kill9()
    await asyncio.to_thread(bridge.wait_for_log, "lost the core", NOTICE_WITHIN)

    # While the core is down, the first worker finishes its task: the bridge
    # keeps the report for the next core.
    reported_while_down = held[first]
    down_url = await _complete(first, reported_while_down)
    await wait_for_log(bridge, r"core away, report kept client=\d+ type=TASK_COMPLETED")
    # A request that needs the core is refused meanwhile, not half-accepted.
    await master.send(
        "SUBMIT_TASKS", sessionId=session_id, tasks=[make_task("extra.png", b"x")]
    )
    await expect_error(master, "unavailable")

    deployment.core(*FAST_LINK, endpoint=endpoint)
    await asyncio.to_thread(wait_ready, port, bridge, NOTICE_WITHIN)
    stats = await _status_async(port)
    assert sorted(w["id"] for w in stats["workers"]) == sorted([first_id, second_id])

    # The second worker still holds the task assigned just before the kill.
    await _complete(second, held[second])
    uploads: list[Upload] = []
    async with in_background(
        *(
            upload_forever(worker, uploads, random.Random(i), upload_time=0.02 * UNIT)
            for i, worker in enumerate(workers)
        )
    ) as background:
        rest, finished = await watching(background, collect_results(master))
    results += rest

    _check_every_file_once(results, files)
    assigned += [upload.task_id for upload in uploads]
    assert sorted(assigned) == sorted(m["taskId"] for m in results)
    down = [m for m in results if m["taskId"] == reported_while_down["id"]]
    assert [m["resultUrl"] for m in down] == [down_url]
    assert finished["stats"] == {"completed": 20, "failed": 0, "total": 20}
    await _assert_quiet(master, *RESULTS, "SESSION_COMPLETED")
    for plugin in (master, *workers):
        assert plugin.websocket.close_code is None
    stats = await _status_async(port)
    assert sorted(w["id"] for w in stats["workers"]) == sorted([first_id, second_id])
    assert sum(w["stats"]["completed"] for w in stats["workers"]) == 20


async def test_a_report_sent_as_the_core_dies_is_applied_once(deployment):
    """
    A worker reports the instant the core is killed, before its bridge can
    know: whether the report was lost on the wire or held back, the restarted
    core applies it once and the worker gets the next file.
    """
    core, endpoint = deployment.core(*FAST_LINK)
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    worker, _ = await register_worker(url)
    master, session_id, _ = await create_session(url)
    files = _files("instant", 2, seed=2)
    await _submit(master, session_id, files)
    task = (await worker.expect("TASK_ASSIGNED"))["task"]

    # SIGKILL and the report race each other.
    core.signal(signal.SIGKILL)
    await _complete(worker, task)
    await asyncio.to_thread(core.popen.wait, TIMEOUT)
    await asyncio.to_thread(bridge.wait_for_log, "lost the core", NOTICE_WITHIN)
    deployment.core(*FAST_LINK, endpoint=endpoint)
    await asyncio.to_thread(wait_ready, port, bridge, NOTICE_WITHIN)

    following = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert following["id"] != task["id"]
    await _complete(worker, following)
    results, finished = await collect_results(master)
    _check_every_file_once(results, files)
    assert finished["stats"] == {"completed": 2, "failed": 0, "total": 2}
    await _assert_quiet(worker, "TASK_ASSIGNED")
    await _assert_quiet(master, *RESULTS, "SESSION_COMPLETED")


async def test_a_cancelled_task_held_across_a_core_restart_stays_cancelled(
    deployment,
):
    """
    A worker still busy with a task its master cancelled when the core is
    killed: after the restart its report is still discarded quietly, never
    reaches the master, and frees the worker.
    """
    core, endpoint = deployment.core(*FAST_LINK)
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    worker, _ = await register_worker(url)
    master, session_id, _ = await create_session(url)
    files = _files("gone", 2, seed=4)
    await _submit(master, session_id, files)
    held = (await worker.expect("TASK_ASSIGNED"))["task"]
    await master.send("CANCEL_TASK", taskId=held["id"])
    await master.expect("TASK_CANCELLED")
    await worker.expect("TASK_CANCELLED")

    core.kill9()
    await asyncio.to_thread(bridge.wait_for_log, "lost the core", NOTICE_WITHIN)
    deployment.core(*FAST_LINK, endpoint=endpoint)
    await asyncio.to_thread(wait_ready, port, bridge, NOTICE_WITHIN)
    await _assert_quiet(worker, "TASK_ASSIGNED")

    await worker.send("TASK_COMPLETED", taskId=held["id"], resultUrl="https://late/x")
    rest = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert "ERROR" not in [m["type"] for m in worker.backlog], worker.backlog
    assert rest["id"] != held["id"]
    url = await _complete(worker, rest)
    results, finished = await collect_results(master)
    assert [m["resultUrl"] for m in results] == [url]
    assert finished["stats"] == {
        "completed": 1,
        "failed": 0,
        "cancelled": 1,
        "total": 2,
    }
    await _assert_quiet(master, *RESULTS, "SESSION_COMPLETED")


# linkup restarted on its data dir.


async def test_linkup_restarted_on_its_data_dir_keeps_the_queue_and_results(
    deployment, tmp_path
):
    """
    linkup stopped with SIGTERM while tasks are queued and no worker is
    connected, started again on the same --data-dir: the queue and the
    results are all there. A master that comes back with RESUME_SESSION gets
    the results from before and the session runs on; a worker that joins
    gets the queued files, each once.
    """
    data_dir = tmp_path / "linkup-data"
    linkup, port = deployment.linkup("--data-dir", str(data_dir))
    url = f"ws://127.0.0.1:{port}"
    worker, worker_id = await register_worker(url)
    master, session_id, _ = await create_session(url)
    files = _files("keep", 5, seed=5)
    await _submit(master, session_id, files)
    for _ in range(2):
        await _complete(worker, (await worker.expect("TASK_ASSIGNED"))["task"])
    before = [await master.expect(*RESULTS) for _ in range(2)]
    await worker.expect("TASK_ASSIGNED")  # the third file, given back below
    await worker.close()
    await wait_for_log(linkup, f"worker left worker={worker_id} ")
    stats = await get_stats(master)
    assert stats["pendingTasks"] == 3
    assert stats["workerCount"] == 0

    # Off the event loop, so that the clients answer linkup's closing
    # handshakes while it stops.
    assert await asyncio.to_thread(linkup.stop) == 0
    again, port = await asyncio.to_thread(
        deployment.linkup, "--data-dir", str(data_dir)
    )
    url = f"ws://127.0.0.1:{port}"
    await wait_for_log(again, r"restored sessions=1 tasks=3 ")

    # The queue is there, paused until its master resumes the session.
    newcomer, _ = await register_worker(url)
    stats = await _assert_quiet(newcomer, "TASK_ASSIGNED")
    assert stats["pendingTasks"] == 3
    assert stats["activeSessions"] == 1

    back = await Plugin.connect(url)
    await back.send("RESUME_SESSION", sessionId=session_id)
    resumed = await back.expect("SESSION_RESUMED")
    assert resumed == {
        "type": "SESSION_RESUMED",
        "sessionId": session_id,
        "state": "open",
        "results": 2,
        "stats": {"completed": 2, "failed": 0, "total": 5},
    }
    assert [await back.expect(*RESULTS) for _ in range(2)] == before

    uploads: list[Upload] = []
    async with in_background(
        upload_forever(newcomer, uploads, random.Random(1), upload_time=0.02 * UNIT)
    ) as background:
        rest, finished = await watching(background, collect_results(back))
    _check_every_file_once(before + rest, files)
    assert sorted(u.filename for u in uploads) == sorted(m["filename"] for m in rest)
    assert finished["stats"] == {"completed": 5, "failed": 0, "total": 5}
    await _assert_quiet(back, *RESULTS, "SESSION_COMPLETED")


async def test_a_restored_session_waits_worker_timeout_then_resume_grace(
    deployment,
):
    """
    Core and bridge both killed; the core restarted with a new bridge. Once
    --worker-timeout has passed (the old worker is forgotten), the session
    still waits --resume-grace for its master, who resumes it and gets it run.
    """
    options = ("--worker-timeout", f"{UNIT:g}", "--resume-grace", f"{4 * UNIT:g}")
    core, endpoint = deployment.core(*FAST_LINK, *options)
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    old_worker, old_id = await register_worker(url)
    async with in_background(heartbeat(old_worker)):
        master, session_id, _ = await create_session(url)
        files = _files("grace", 3, seed=3)
        await _submit(master, session_id, files)
        await old_worker.expect("TASK_ASSIGNED")
        core.kill9()
        bridge.kill9()

    core = deployment.core(*FAST_LINK, *options, endpoint=endpoint)[0]
    _, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    await wait_for_log(
        core, f"worker left worker={old_id} reason=worker not back after a restart"
    )
    back = await Plugin.connect(url)
    await back.send("RESUME_SESSION", sessionId=session_id)
    resumed = await back.expect("SESSION_RESUMED", "ERROR")
    assert resumed == {
        "type": "SESSION_RESUMED",
        "sessionId": session_id,
        "state": "open",
        "results": 0,
        "stats": {"completed": 0, "failed": 0, "total": 3},
    }
    worker, _ = await register_worker(url)
    async with in_background(heartbeat(worker)):
        for _ in files:
            await _complete(worker, (await worker.expect("TASK_ASSIGNED"))["task"])
        results, finished = await collect_results(back)
    _check_every_file_once(results, files)
    assert finished["stats"] == {"completed": 3, "failed": 0, "total": 3}


# A bridge killed.


async def test_a_killed_bridges_task_goes_elsewhere_at_once(deployment):
    """
    kill -9 of a bridge: the core notices the dropped connection, not the
    silence, so its worker's task reaches a worker on the other bridge
    within about a second, long before --link-timeout.
    """
    link_timeout = 10 * UNIT
    link = ("--heartbeat-interval", "0.2", "--link-timeout", f"{link_timeout:g}")
    core, endpoint = deployment.core(*link)
    doomed, port_a = deployment.bridge(endpoint, *link)
    _, port_b = deployment.bridge(endpoint, *link)
    url_a, url_b = f"ws://127.0.0.1:{port_a}", f"ws://127.0.0.1:{port_b}"

    lost_worker, _ = await register_worker(url_a)
    master, session_id, _ = await create_session(url_b)
    files = _files("moved", 1, seed=1)
    await _submit(master, session_id, files)
    first = await lost_worker.expect("TASK_ASSIGNED")
    spare, _ = await register_worker(url_b)
    await _assert_quiet(spare, "TASK_ASSIGNED")

    killed_at = time.monotonic()
    doomed.kill9()
    second = await spare.expect("TASK_ASSIGNED", timeout=link_timeout)
    moved_after = time.monotonic() - killed_at
    assert moved_after < 2 * UNIT, f"task moved {moved_after:.2f}s after the kill"
    assert second["task"] == first["task"]
    assert "bridge lost after" not in core.log()

    result_url = await _complete(spare, second["task"])
    completed = await master.expect(*RESULTS)
    assert completed["resultUrl"] == result_url
    assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}
    await master.expect("SESSION_COMPLETED")


# Storage.


def _core_exit(process: Process, timeout: float = TIMEOUT) -> tuple[int, str]:
    """
    Wait for a core that should refuse to start; its status and log.

    """
    try:
        status = process.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{process.name} still running:\n{process.log()}"
        ) from None
    log = process.log()
    assert "Traceback" not in log, log
    return status, log


def test_a_second_core_on_the_same_data_dir_refuses_to_start(deployment, tmp_path):
    """Two cores on one queue would hand out tasks twice: the second exits."""
    data_dir = tmp_path / "one-queue"
    first, _ = deployment.core("--data-dir", str(data_dir))
    first.wait_for_log("core listening")
    second, _ = deployment.core("--data-dir", str(data_dir))
    status, log = _core_exit(second)
    assert status == 1
    assert str(data_dir) in log
    assert "in use" in log
    assert str(first.pid) in log
    assert first.alive()


def test_a_data_dir_under_a_regular_file_is_refused_clearly(deployment, tmp_path):
    """--data-dir whose parent is a file: a message naming the path, status 1."""
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("not a directory\n")
    data_dir = not_a_dir / "data"
    core, _ = deployment.core("--data-dir", str(data_dir))
    status, log = _core_exit(core)
    assert status == 1
    assert f"cannot create data dir {data_dir}" in log
    assert "Not a directory" in log


def test_a_core_without_the_free_space_it_needs_refuses_to_start(deployment, tmp_path):
    """--min-free-space more than the disk has: status 1, naming free space."""
    data_dir = tmp_path / "small"
    core, _ = deployment.core(
        "--data-dir", str(data_dir), "--min-free-space", "1000000GiB"
    )
    status, log = _core_exit(core)
    assert status == 1
    assert "free" in log
    assert "--min-free-space" in log
    assert str(data_dir) in log


async def test_linkup_memory_works_and_writes_no_data_dir(deployment):
    """linkup --memory serves as usual and creates no data dir."""
    _, port = deployment.linkup("--memory")
    url = f"ws://127.0.0.1:{port}"
    worker, _ = await register_worker(url)
    master, session_id, _ = await create_session(url)
    files = _files("mem", 3, seed=7)
    await _submit(master, session_id, files)
    for _ in files:
        await _complete(worker, (await worker.expect("TASK_ASSIGNED"))["task"])
    results, finished = await collect_results(master)
    _check_every_file_once(results, files)
    assert finished["stats"] == {"completed": 3, "failed": 0, "total": 3}
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    assert not (Path(base) / "linkup" / f"port-{port}").exists()


async def test_a_core_that_cannot_store_a_file_refuses_it_and_carries_on(
    deployment, tmp_path
):
    """
    A core whose files may not exceed 8 MiB (RLIMIT_FSIZE) is sent a 10 MiB
    file: ERROR storage_error, nothing of it kept; the core keeps running and
    takes a small file afterwards.
    """
    data_dir = tmp_path / "limited"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    limit = 8 * 2**20
    argv = [
        "linkup-core",
        "--bind",
        endpoint,
        "--data-dir",
        str(data_dir),
        "--log-level",
        "DEBUG",
        *FAST_LINK,
    ]
    core = deployment.start(
        "core-fsize",
        "-c",
        "import resource, runpy, sys\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        f"sys.argv = {argv!r}\n"
        "runpy.run_module('core', run_name='__main__', alter_sys=True)\n",
    )
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    worker, _ = await register_worker(url)
    master, session_id, _ = await create_session(url)

    big = random.Random(10).randbytes(10 * 2**20)
    await master.send(
        "SUBMIT_TASKS", sessionId=session_id, tasks=[make_task("big.bin", big)]
    )
    error = await expect_error(master, "storage_error")
    assert "store" in error["message"], error
    assert core.alive()
    stats = await _assert_quiet(worker, "TASK_ASSIGNED")
    assert stats["pendingTasks"] == 0
    spool = data_dir / "spool"
    assert sorted(p.name for p in spool.iterdir()) == []

    small = {"small.png": b"\x89PNG small enough"}
    await _submit(master, session_id, small)
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    assert task["filename"] == "small.png"
    await _complete(worker, task)
    results, finished = await collect_results(master)
    _check_every_file_once(results, small)
    assert finished["stats"] == {"completed": 1, "failed": 0, "total": 1}
    assert sorted(p.name for p in spool.iterdir()) == []
    assert core.alive()
    assert bridge.alive()


async def test_a_report_of_a_worker_that_left_while_the_core_was_away_counts(
    deployment,
):
    """
    A worker reports while the core is down, then disconnects before it is
    back: its report still reaches the restarted core, once, so the file is
    neither lost nor uploaded again.
    """
    core, endpoint = deployment.core(*FAST_LINK, "--max-attempts", "1")
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    worker, _ = await register_worker(url)
    master, session_id, _ = await create_session(url)
    files = _files("departed", 1, seed=5)
    await _submit(master, session_id, files)
    task = (await worker.expect("TASK_ASSIGNED"))["task"]

    core.kill9()
    await asyncio.to_thread(bridge.wait_for_log, "lost the core", NOTICE_WITHIN)
    await _complete(worker, task)
    await asyncio.to_thread(bridge.wait_for_log, "report kept", NOTICE_WITHIN)
    await worker.close()
    await asyncio.to_thread(bridge.wait_for_log, "client disconnected", NOTICE_WITHIN)
    deployment.core(*FAST_LINK, "--max-attempts", "1", endpoint=endpoint)

    results, finished = await collect_results(master)
    _check_every_file_once(results, files)
    assert finished["stats"] == {"completed": 1, "failed": 0, "total": 1}


async def test_a_plugin_that_registers_while_the_core_is_away_is_sent_to_retry(
    deployment,
):
    """
    WORKER_REGISTER or CREATE_SESSION that cannot reach the core closes the
    connection with 1013: a plugin ignores ERROR and would wait for ever, but
    reconnects after a close.
    """
    core, endpoint = deployment.core(*FAST_LINK)
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    worker = await Plugin.connect(url)
    master = await Plugin.connect(url)
    await get_stats(worker)

    core.kill9()
    await asyncio.to_thread(bridge.wait_for_log, "lost the core", NOTICE_WITHIN)
    await worker.send("WORKER_REGISTER")
    await master.send("CREATE_SESSION")

    for plugin in (worker, master):
        code = await wait_for_close(plugin)
        assert code == 1013


async def test_a_batch_that_would_fill_the_disk_is_refused_and_the_core_runs_on(
    deployment, tmp_path
):
    """
    The core keeps --min-free-space free at all times, not only at start-up:
    a batch that would eat into it is refused with storage_error, and the core
    carries on with files that fit (and could restart on that disk).
    """
    data_dir = tmp_path / "nearly-full"
    data_dir.mkdir()
    stats = os.statvfs(data_dir)
    free = stats.f_bavail * stats.f_frsize
    # Leave 64 MiB of room above the reserve: other processes on the machine
    # may write a little meanwhile.
    reserve = free - 64 * 2**20
    core, endpoint = deployment.core(
        *FAST_LINK, "--data-dir", str(data_dir), "--min-free-space", str(reserve)
    )
    _, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    master, session_id, _ = await create_session(url)

    big = {"big.png": os.urandom(96 * 2**20)}
    await master.send(
        "SUBMIT_TASKS",
        sessionId=session_id,
        tasks=[make_task(name, data) for name, data in big.items()],
    )
    error = await expect_error(master, "storage_error")
    assert "--min-free-space" in error["message"]
    assert list((data_dir / "spool").iterdir()) == []

    small = _files("fits", 1, seed=6)
    await _submit(master, session_id, small)
    worker, _ = await register_worker(url)
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    await _complete(worker, task)
    results, _ = await collect_results(master)
    _check_every_file_once(results, small)
    assert core.alive()
