"""
serverStats, STATS_UPDATE, GET_STATS and the HTTP pages on the WebSocket port.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.protocol_helpers import (
    expect_stats,
    fetch,
    get_stats,
    header,
    make_task,
    submit,
)

STATS_KEYS = {
    "workerCount",
    "idleWorkers",
    "pendingTasks",
    "activeTasks",
    "activeSessions",
    "workers",
}


def assert_stats_shape(stats: dict) -> None:
    assert set(stats) >= STATS_KEYS, stats
    for key in STATS_KEYS - {"workers"}:
        assert isinstance(stats[key], int), (key, stats)
    for worker in stats["workers"]:
        assert isinstance(worker["id"], str), worker
        assert worker["status"] in ("idle", "busy"), worker
        assert set(worker["stats"]) >= {"completed", "failed", "totalBytes"}, worker


@pytest.mark.parametrize("workers", [0, 1, 3])
async def test_session_created_reports_the_number_of_registered_workers(start, workers):
    """SESSION_CREATED.serverStats.workerCount is the number of registered workers."""
    clients = await start()
    ids = [(await clients.worker())[1] for _ in range(workers)]
    # A plain connection is not a worker and must not be counted.
    await clients.connect()

    _, _, server_stats = await clients.master()
    assert_stats_shape(server_stats)
    assert server_stats["workerCount"] == workers
    assert server_stats["idleWorkers"] == workers
    assert sorted(w["id"] for w in server_stats["workers"]) == sorted(ids)


async def test_worker_registered_carries_server_stats(start):
    """WORKER_REGISTERED holds the workerId and serverStats counting the new worker."""
    clients = await start()
    await clients.worker()
    worker = await clients.connect()
    await worker.send("WORKER_REGISTER")
    registered = await worker.expect("WORKER_REGISTERED")
    assert_stats_shape(registered["serverStats"])
    assert registered["serverStats"]["workerCount"] == 2
    assert registered["workerId"] in {
        w["id"] for w in registered["serverStats"]["workers"]
    }


async def test_stats_update_is_pushed_when_a_worker_joins_and_leaves(start):
    """Connected masters and workers get STATS_UPDATE as workers come and go."""
    clients = await start()
    master, _, server_stats = await clients.master()
    assert server_stats["workerCount"] == 0

    first, first_id = await clients.worker()
    pushed = await expect_stats(master, workerCount=1)
    assert_stats_shape(pushed)
    assert [w["id"] for w in pushed["workers"]] == [first_id]

    second, second_id = await clients.worker()
    for plugin in (master, first):
        pushed = await expect_stats(plugin, workerCount=2)
        assert {w["id"] for w in pushed["workers"]} == {first_id, second_id}
        assert pushed["idleWorkers"] == 2

    await second.close()
    for plugin in (master, first):
        pushed = await expect_stats(plugin, workerCount=1)
        assert [w["id"] for w in pushed["workers"]] == [first_id]
        assert pushed["idleWorkers"] == 1


async def test_get_stats_counts_pending_and_active_tasks(start):
    """GET_STATS answers exact counts while workers hold tasks and others wait."""
    clients = await start()
    (a, a_id), (b, b_id) = [await clients.worker() for _ in range(2)]
    master, session_id, _ = await clients.master()
    files = [make_task(f"f{i}.png", bytes(100 + i)) for i in range(5)]
    submitted = await submit(master, session_id, files)
    assert submitted["totalPending"] in (3, 5)  # before or after dispatch
    held_a = (await a.expect("TASK_ASSIGNED"))["task"]
    await b.expect("TASK_ASSIGNED")

    # Anyone may ask, even a connection with no role.
    observer = await clients.connect()
    for plugin in (observer, master, a):
        stats = await get_stats(plugin)
        assert_stats_shape(stats)
        assert stats["workerCount"] == 2
        assert stats["idleWorkers"] == 0
        assert stats["activeTasks"] == 2
        assert stats["pendingTasks"] == 3
        assert stats["activeSessions"] == 1
        assert {w["id"]: w["status"] for w in stats["workers"]} == {
            a_id: "busy",
            b_id: "busy",
        }

    await a.send("TASK_COMPLETED", taskId=held_a["id"], resultUrl="https://x/0")
    await a.expect("TASK_ASSIGNED")  # the next file, at once
    stats = await get_stats(observer)
    assert stats["pendingTasks"] == 2
    assert stats["activeTasks"] == 2
    by_id = {w["id"]: w["stats"] for w in stats["workers"]}
    assert by_id[a_id] == {"completed": 1, "failed": 0, "totalBytes": held_a["size"]}
    assert by_id[b_id] == {"completed": 0, "failed": 0, "totalBytes": 0}


async def test_status_page_serves_the_same_stats_as_get_stats(start):
    """GET /status returns the serverStats object as application/json."""
    clients = await start()
    worker, _ = await clients.worker()
    await clients.worker()
    master, session_id, _ = await clients.master()
    await submit(master, session_id, [make_task(f"{i}.png", b"x") for i in range(3)])
    await worker.expect("TASK_ASSIGNED")

    expected = await get_stats(master)
    for path in ("/status", "/status?t=123"):
        status, headers, body = await fetch(clients.url, path)
        assert status == 200
        assert header(headers, "Content-Type").startswith("application/json")
        stats = json.loads(body)
        assert_stats_shape(stats)
        assert stats == expected


async def test_root_serves_the_status_page_and_everything_it_loads(start):
    """GET / is an HTML page; each script and stylesheet it names is served."""
    clients = await start()
    status, headers, body = await fetch(clients.url, "/")
    assert status == 200
    assert header(headers, "Content-Type").startswith("text/html")
    assert b"<html" in body.lower()
    assert "script-src" not in header(headers, "Content-Security-Policy")
    assert "default-src 'self'" in header(headers, "Content-Security-Policy")

    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', body.decode())
    assert any(asset.endswith(".js") for asset in assets), assets
    for asset in assets:
        status, headers, body = await fetch(clients.url, asset)
        assert status == 200, asset
        assert body, asset
        expected = "text/css" if asset.endswith(".css") else "text/javascript"
        if asset.endswith((".css", ".js")):
            assert header(headers, "Content-Type").startswith(expected), asset


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_health_endpoints_answer_200(start, path):
    """/healthz and /readyz answer 200 while linkup runs."""
    clients = await start()
    status, _, _ = await fetch(clients.url, path)
    assert status == 200


async def test_unknown_path_is_404(start):
    """A plain GET of an unknown path is 404, not a WebSocket error."""
    clients = await start()
    status, _, _ = await fetch(clients.url, "/no/such/page")
    assert status == 404


async def test_metrics_are_served_as_prometheus_text(start):
    """GET /metrics returns Prometheus text with the bridge's own metrics."""
    clients = await start()
    worker, _ = await clients.worker()
    await get_stats(worker)
    status, headers, body = await fetch(clients.url, "/metrics")
    assert status == 200
    assert header(headers, "Content-Type").startswith("text/plain")
    text = body.decode()
    assert 'linkup_websocket_connections{role="worker"} 1.0' in text
    assert 'linkup_websocket_messages_received_total{type="GET_STATS"} 1.0' in text
    assert "linkup_core_link_up 1.0" in text


async def test_http_and_websockets_share_the_port(start):
    """HTTP requests between WebSocket messages do not disturb connected plugins."""
    clients = await start()
    worker, _ = await clients.worker()
    master, session_id, _ = await clients.master()
    await fetch(clients.url, "/status")
    await fetch(clients.url, "/")
    await submit(master, session_id, [make_task("a.png", b"a")])
    task = (await worker.expect("TASK_ASSIGNED"))["task"]
    await fetch(clients.url, "/metrics")
    await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/a")
    assert (await master.expect("TASK_COMPLETED"))["resultUrl"] == "https://x/a"
