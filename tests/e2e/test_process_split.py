"""
A split deployment: one linkup-core and two linkup-bridges sharing it.

Clients of both bridges draw on one queue and one pool of workers, and see
the same statistics whichever bridge they ask.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from typing import Any

import pytest

from tests.e2e.harness import (
    TIMEOUT,
    Plugin,
    create_session,
    http_get,
    register_worker,
)

pytestmark = pytest.mark.usefixtures("close_plugins")


def _status(port: int) -> tuple[int, dict[str, Any]]:
    status, _, body = http_get(f"http://127.0.0.1:{port}/status", timeout=2)
    return status, json.loads(body)


async def _status_of(port: int) -> dict[str, Any]:
    status, stats = await asyncio.to_thread(_status, port)
    assert status == 200, stats
    return stats


async def _work(worker: Plugin, name: str, received: list[dict[str, Any]]) -> None:
    # Answer every assignment at once, recording what arrived, until cancelled.
    while True:
        assigned = await worker.expect("TASK_ASSIGNED", timeout=3 * TIMEOUT)
        task = assigned["task"]
        received.append(task)
        await worker.send(
            "TASK_COMPLETED",
            taskId=task["id"],
            resultUrl=f"https://{name}/{task['filename']}",
        )


async def test_tasks_from_one_bridge_reach_workers_on_both_bridges(deployment):
    """A master on bridge A gets every file done by workers of bridges A and B."""
    _, endpoint = deployment.core()
    _, port_a = deployment.bridge(endpoint)
    _, port_b = deployment.bridge(endpoint)
    url_a, url_b = f"ws://127.0.0.1:{port_a}", f"ws://127.0.0.1:{port_b}"

    workers = {
        "a1": (await register_worker(url_a))[0],
        "a2": (await register_worker(url_a))[0],
        "b1": (await register_worker(url_b))[0],
        "b2": (await register_worker(url_b))[0],
    }
    master, session_id, stats = await create_session(url_a)
    assert stats["workerCount"] == 4

    files = {f"f{index:02}.jpg": os.urandom(1000 + index) for index in range(12)}
    received: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    working = [
        asyncio.create_task(_work(worker, name, received[name]))
        for name, worker in workers.items()
    ]
    try:
        await master.send(
            "SUBMIT_TASKS",
            sessionId=session_id,
            tasks=[
                {
                    "filename": filename,
                    "mimeType": "image/jpeg",
                    "dataBase64": base64.b64encode(data).decode(),
                    "size": len(data),
                }
                for filename, data in files.items()
            ],
        )
        submitted = await master.expect("TASKS_SUBMITTED")
        assert submitted["taskCount"] == len(files)

        results = {}
        for _ in files:
            completed = await master.expect("TASK_COMPLETED", "TASK_FAILED")
            assert completed["type"] == "TASK_COMPLETED", completed
            results[completed["filename"]] = completed["resultUrl"]
        finished = await master.expect("SESSION_COMPLETED")
    finally:
        for task in working:
            task.cancel()
        outcomes = await asyncio.gather(*working, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, asyncio.CancelledError), outcome

    assert finished["stats"] == {"completed": 12, "failed": 0, "total": 12}
    handled_by = {}
    for name, tasks in received.items():
        for task in tasks:
            data = files[task["filename"]]
            assert base64.b64decode(task["dataBase64"]) == data
            assert task["size"] == len(data)
            assert task["mimeType"] == "image/jpeg"
            handled_by[task["filename"]] = name
    assert sorted(handled_by) == sorted(files), "every file went to exactly one"
    assert sum(len(tasks) for tasks in received.values()) == len(files)
    assert results == {
        filename: f"https://{name}/{filename}" for filename, name in handled_by.items()
    }
    # Four idle workers and twelve files: every worker, on both bridges, works.
    assert all(received.values()), {k: len(v) for k, v in received.items()}

    for plugin in [master, *workers.values()]:
        await plugin.close()


async def test_status_on_either_bridge_shows_one_shared_pool_and_queue(deployment):
    """GET /status and serverStats on both bridges count all workers and tasks."""
    _, endpoint = deployment.core()
    _, port_a = deployment.bridge(endpoint)
    _, port_b = deployment.bridge(endpoint)
    url_a, url_b = f"ws://127.0.0.1:{port_a}", f"ws://127.0.0.1:{port_b}"

    worker_a, id_a = await register_worker(url_a)
    worker_b1, id_b1 = await register_worker(url_b)
    worker_b2, id_b2 = await register_worker(url_b)

    for port in (port_a, port_b):
        stats = await _status_of(port)
        assert stats["workerCount"] == 3
        assert stats["idleWorkers"] == 3
        assert {worker["id"] for worker in stats["workers"]} == {id_a, id_b1, id_b2}

    # serverStats, as the master's split reads it, on both bridges.
    master_b, _, stats_b = await create_session(url_b)
    assert stats_b["workerCount"] == 3
    master_a, session_a, stats_a = await create_session(url_a)
    assert stats_a["workerCount"] == 3
    assert stats_a["activeSessions"] == 2

    # Five files for three workers: three out, two queued, seen alike from B.
    await master_a.send(
        "SUBMIT_TASKS",
        sessionId=session_a,
        tasks=[
            {
                "filename": f"{index}.png",
                "mimeType": "image/png",
                "dataBase64": base64.b64encode(b"x%d" % index).decode(),
                "size": 2,
            }
            for index in range(5)
        ],
    )
    submitted = await master_a.expect("TASKS_SUBMITTED")
    assert submitted["taskCount"] == 5
    for worker in (worker_a, worker_b1, worker_b2):
        await worker.expect("TASK_ASSIGNED")
    for port in (port_a, port_b):
        stats = await _status_of(port)
        assert stats["workerCount"] == 3
        assert stats["idleWorkers"] == 0
        assert stats["activeTasks"] == 3
        assert stats["pendingTasks"] == 2
        assert {worker["status"] for worker in stats["workers"]} == {"busy"}

    await master_b.send("GET_STATS")
    update = await master_b.expect("STATS_UPDATE")
    assert update["stats"]["pendingTasks"] == 2
    assert update["stats"]["activeTasks"] == 3

    for plugin in (master_a, master_b, worker_a, worker_b1, worker_b2):
        await plugin.close()


async def test_stats_update_reaches_the_other_bridge_when_a_worker_comes_and_goes(
    deployment,
):
    """A worker joining or leaving on bridge A pushes STATS_UPDATE to B's clients."""
    _, endpoint = deployment.core()
    _, port_a = deployment.bridge(endpoint)
    _, port_b = deployment.bridge(endpoint)
    url_a, url_b = f"ws://127.0.0.1:{port_a}", f"ws://127.0.0.1:{port_b}"

    master_b, _, stats = await create_session(url_b)
    assert stats["workerCount"] == 0
    watcher_b, watcher_id = await register_worker(url_b)
    joined_self = await master_b.expect("STATS_UPDATE")
    assert joined_self["stats"]["workerCount"] == 1

    worker_a, worker_id = await register_worker(url_a)
    for client in (master_b, watcher_b):
        update = await client.expect("STATS_UPDATE")
        while update["stats"]["workerCount"] != 2:
            update = await client.expect("STATS_UPDATE")
        ids = {worker["id"] for worker in update["stats"]["workers"]}
        assert ids == {watcher_id, worker_id}

    await worker_a.close()
    for client in (master_b, watcher_b):
        update = await client.expect("STATS_UPDATE")
        assert update["stats"]["workerCount"] == 1
        assert [w["id"] for w in update["stats"]["workers"]] == [watcher_id]

    await master_b.close()
    await watcher_b.close()
