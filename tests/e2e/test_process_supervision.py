"""
Supervision of the core-bridge link, with processes killed by SIGKILL.

A bridge that loses its core keeps its clients for --core-grace and reports
itself unready until a core answers again; a restarted core takes them back.
A core that loses a bridge forgets that bridge's clients and gives their tasks
to workers elsewhere. The launcher starts a killed child again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import psutil
import pytest

from tests.e2e.harness import (
    FAST_LINK,
    NOTICE_WITHIN,
    UNIT,
    Plugin,
    Process,
    create_session,
    eventually,
    http_get,
    read_stdout_until,
    register_worker,
    wait_for_close,
    wait_ready,
)

pytestmark = pytest.mark.usefixtures("close_plugins")


def _get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    status, _, body = http_get(f"http://127.0.0.1:{port}{path}", timeout=3 * UNIT)
    return status, json.loads(body)


async def _get_async(port: int, path: str) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(_get, port, path)


def _wait_for_any_log(
    process: Process, texts: tuple[str, ...], timeout: float = NOTICE_WITHIN
) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = process.log()
        for text in texts:
            if text in log:
                return text
        time.sleep(0.05)
    raise AssertionError(f"none of {texts!r} in {process.name} log:\n{process.log()}")


def _one_file(name: str, data: bytes) -> dict[str, Any]:
    return {
        "filename": name,
        "mimeType": "image/png",
        "dataBase64": base64.b64encode(data).decode(),
        "size": len(data),
    }


async def _round_trip(url: str, worker: Plugin, name: str, data: bytes) -> None:
    """
    A new master on ``url`` gets one file done by ``worker``.

    """
    master, session_id, _ = await create_session(url)
    await master.send(
        "SUBMIT_TASKS", sessionId=session_id, tasks=[_one_file(name, data)]
    )
    submitted = await master.expect("TASKS_SUBMITTED")
    assert submitted["taskCount"] == 1
    assigned = await worker.expect("TASK_ASSIGNED")
    assert assigned["task"]["filename"] == name
    assert base64.b64decode(assigned["task"]["dataBase64"]) == data
    await worker.send(
        "TASK_COMPLETED", taskId=assigned["task"]["id"], resultUrl=f"https://x/{name}"
    )
    completed = await master.expect("TASK_COMPLETED")
    assert completed["resultUrl"] == f"https://x/{name}"
    finished = await master.expect("SESSION_COMPLETED")
    assert finished["stats"] == {"completed": 1, "failed": 0, "total": 1}
    await master.close()


async def test_bridge_closes_its_clients_and_turns_unready_when_its_core_dies(
    deployment,
):
    """
    kill -9 of the core, not restarted: /readyz and /status 503 at once; the
    clients are kept for --core-grace, then closed.
    """
    core, endpoint = deployment.core(*FAST_LINK)
    grace = 2 * UNIT
    bridge, port = deployment.bridge(endpoint, *FAST_LINK, "--core-grace", str(grace))
    url = f"ws://127.0.0.1:{port}"
    worker, _ = await register_worker(url)
    master, _, _ = await create_session(url)

    core.kill9()
    killed_at = time.monotonic()
    closes = await asyncio.gather(wait_for_close(worker), wait_for_close(master))
    # Closed by the server with a close frame that tells the plugin the server
    # side failed (linkup sends 1011), not a broken TCP connection.
    assert set(closes) <= {1001, 1011, 1012, 1013}, closes
    assert grace <= time.monotonic() - killed_at < grace + NOTICE_WITHIN
    assert bridge.log().count("core away for") == 1
    await asyncio.to_thread(bridge.wait_for_log, "lost the core", 1 * UNIT)

    ready, _ = await _get_async(port, "/readyz")
    assert ready == 503
    status, body = await _get_async(port, "/status")
    assert status == 503
    assert "error" in body
    # It is the core that is missing: the bridge itself is alive and well.
    healthy, _ = await _get_async(port, "/healthz")
    assert healthy == 200
    assert bridge.alive()


async def test_bridge_turns_away_new_clients_while_its_core_is_down(deployment):
    """A client connecting while the core is down is closed with 1013."""
    core, endpoint = deployment.core(*FAST_LINK)
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    core.kill9()
    await asyncio.to_thread(bridge.wait_for_log, "lost the core", NOTICE_WITHIN)

    latecomer = await Plugin.connect(f"ws://127.0.0.1:{port}")
    code = await wait_for_close(latecomer, timeout=NOTICE_WITHIN)
    assert code == 1013


async def test_a_restarted_core_takes_back_the_bridges_clients(deployment):
    """
    kill -9 of the core, restarted on its data dir: the bridge rejoins, its
    worker carries on over the same connection with the same id and stats.
    """
    core, endpoint = deployment.core(*FAST_LINK)
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    worker, worker_id = await register_worker(url)
    await _round_trip(url, worker, "before.png", b"\x89PNG before")

    core.kill9()
    await asyncio.to_thread(bridge.wait_for_log, "lost the core", NOTICE_WITHIN)
    ready, _ = await _get_async(port, "/readyz")
    assert ready == 503

    deployment.core(*FAST_LINK, endpoint=endpoint)
    await asyncio.to_thread(wait_ready, port, bridge, NOTICE_WITHIN)
    status, stats = await _get_async(port, "/status")
    assert status == 200
    assert [w["id"] for w in stats["workers"]] == [worker_id]
    assert stats["workers"][0]["stats"]["completed"] == 1

    await _round_trip(url, worker, "after.png", b"\x89PNG after")
    status, stats = await _get_async(port, "/status")
    assert stats["workers"][0]["stats"]["completed"] == 2
    assert worker.websocket.close_code is None


async def test_a_core_restarted_without_its_state_makes_clients_start_over(
    deployment,
):
    """
    A --memory core restarted knows nothing: the bridge closes the clients it
    had (1011) so that plugins reconnect, and then works with new ones.
    """
    core, endpoint = deployment.core(*FAST_LINK, "--memory")
    bridge, port = deployment.bridge(endpoint, *FAST_LINK)
    url = f"ws://127.0.0.1:{port}"
    old_worker, _ = await register_worker(url)

    core.kill9()
    await asyncio.to_thread(bridge.wait_for_log, "lost the core", NOTICE_WITHIN)
    deployment.core(*FAST_LINK, "--memory", endpoint=endpoint)
    assert await wait_for_close(old_worker, timeout=2 * NOTICE_WITHIN) == 1011
    await asyncio.to_thread(wait_ready, port, bridge, NOTICE_WITHIN)

    status, stats = await _get_async(port, "/status")
    assert status == 200
    assert stats["workerCount"] == 0
    worker, _ = await register_worker(url)
    await _round_trip(url, worker, "after-restart.png", b"\x89PNG again")
    status, stats = await _get_async(port, "/status")
    assert stats["workerCount"] == 1
    assert stats["workers"][0]["stats"]["completed"] == 1


async def test_core_drops_a_killed_bridge_and_requeues_its_task_elsewhere(
    deployment,
):
    """kill -9 of one bridge: its worker vanishes, its task goes to the other."""
    core, endpoint = deployment.core(*FAST_LINK)
    bridge_a, port_a = deployment.bridge(endpoint, *FAST_LINK)
    _, port_b = deployment.bridge(endpoint, *FAST_LINK)
    url_a, url_b = f"ws://127.0.0.1:{port_a}", f"ws://127.0.0.1:{port_b}"

    worker_a, id_a = await register_worker(url_a)
    master, session_id, stats = await create_session(url_b)
    assert stats["workerCount"] == 1
    data = b"held by the worker on bridge A \x00\x01\xfe\xff"
    await master.send(
        "SUBMIT_TASKS", sessionId=session_id, tasks=[_one_file("held.png", data)]
    )
    await master.expect("TASKS_SUBMITTED")
    first = await worker_a.expect("TASK_ASSIGNED")
    assert first["task"]["filename"] == "held.png"

    # A worker on B joins while A's worker holds the only task.
    worker_b, id_b = await register_worker(url_b)
    status, stats = await _get_async(port_b, "/status")
    assert status == 200
    assert stats["workerCount"] == 2
    assert stats["activeTasks"] == 1

    bridge_a.kill9()
    # The core notices at once (the link breaks) or after --link-timeout.
    await asyncio.to_thread(
        _wait_for_any_log, core, ("bridge lost", "bridge unreachable")
    )

    async def only_worker_b_left() -> dict[str, Any] | None:
        status, stats = await _get_async(port_b, "/status")
        assert status == 200, stats
        return stats if stats["workerCount"] == 1 else None

    stats = await eventually(only_worker_b_left, "workerCount 1 on bridge B")
    assert [worker["id"] for worker in stats["workers"]] == [id_b]

    # The task A's worker held is handed to B's worker, intact.
    second = await worker_b.expect("TASK_ASSIGNED", timeout=NOTICE_WITHIN)
    assert second["task"]["filename"] == "held.png"
    assert base64.b64decode(second["task"]["dataBase64"]) == data
    await worker_b.send(
        "TASK_COMPLETED", taskId=second["task"]["id"], resultUrl="https://b/held.png"
    )
    completed = await master.expect("TASK_COMPLETED")
    assert completed["filename"] == "held.png"
    assert completed["resultUrl"] == "https://b/held.png"
    assert completed["progress"] == {"completed": 1, "failed": 0, "total": 1}
    await master.expect("SESSION_COMPLETED")

    # B's clients were told that A's worker went away.
    update = await master.expect("STATS_UPDATE")
    while update["stats"]["workerCount"] != 1 or id_a in json.dumps(update):
        update = await master.expect("STATS_UPDATE")

    # And bridge B goes on serving, old clients and new.
    await _round_trip(url_b, worker_b, "later.png", b"still working")
    assert (await _get_async(port_b, "/readyz"))[0] == 200


async def test_linkup_starts_a_killed_core_again_and_keeps_its_clients(deployment):
    """
    kill -9 of the core under `linkup`: the launcher starts it again on the
    same data dir, and a worker and a master carry on over their connections.
    """
    linkup, port = deployment.linkup(*FAST_LINK)
    # Supervision starts once the launcher has printed where to connect.
    await asyncio.to_thread(read_stdout_until, linkup, "Ctrl-C")
    url = f"ws://127.0.0.1:{port}"
    worker, worker_id = await register_worker(url)
    master, session_id, _ = await create_session(url)
    await master.send(
        "SUBMIT_TASKS",
        sessionId=session_id,
        tasks=[_one_file(f"f{i}.png", bytes([i]) * 50) for i in range(2)],
    )
    await master.expect("TASKS_SUBMITTED")
    first = await worker.expect("TASK_ASSIGNED")

    (core,) = [
        child
        for child in psutil.Process(linkup.pid).children()
        if "core" in child.cmdline()
    ]
    core.kill()
    await asyncio.to_thread(linkup.wait_for_log, "starting it again", NOTICE_WITHIN)
    await asyncio.to_thread(wait_ready, port, linkup, NOTICE_WITHIN)

    await worker.send(
        "TASK_COMPLETED", taskId=first["task"]["id"], resultUrl="https://x/0"
    )
    second = await worker.expect("TASK_ASSIGNED")
    await worker.send(
        "TASK_COMPLETED", taskId=second["task"]["id"], resultUrl="https://x/1"
    )
    results = [await master.expect("TASK_COMPLETED") for _ in range(2)]
    assert sorted(r["filename"] for r in results) == ["f0.png", "f1.png"]
    finished = await master.expect("SESSION_COMPLETED")
    assert finished["stats"] == {"completed": 2, "failed": 0, "total": 2}
    status, stats = await _get_async(port, "/status")
    assert status == 200
    assert [w["id"] for w in stats["workers"]] == [worker_id]
    assert linkup.alive()
