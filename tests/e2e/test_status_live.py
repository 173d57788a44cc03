"""
The status page's live feed (``/status/live``), read by a plain WebSocket
client instead of a browser: what a view says, and when it comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.e2e.harness import (
    FAST_LINK,
    TIMEOUT,
    create_session,
    eventually,
    http_get,
    register_worker,
)
from tests.e2e.protocol_helpers import make_task, submit

pytestmark = pytest.mark.usefixtures("close_plugins")


async def next_view(
    feed: ClientConnection, matches: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The first view from ``feed`` that ``matches``; fail after TIMEOUT."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            view = orjson.loads(await feed.recv())
            assert view["type"] == "view", view
            if matches(view):
                return view


async def metric(port: int, line_start: str) -> str:
    """The one line of the bridge's /metrics that starts with ``line_start``."""
    _, _, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
    lines = [line for line in body.decode().splitlines() if line.startswith(line_start)]
    assert len(lines) == 1, lines
    return lines[0]


async def test_a_page_sees_a_batch_move_as_it_happens(deployment):
    """A view comes at once, then again after each change, with progress."""
    _, port = deployment.linkup()
    url = f"ws://127.0.0.1:{port}"

    async with connect(f"{url}/status/live") as feed:
        first = await next_view(feed, lambda view: True)
        assert first["links"]["thisBridge"]["coreLink"] is True
        assert first["sessions"] == []
        assert "linkup_status_viewers 1.0" in await metric(
            port, "linkup_status_viewers"
        )

        worker, worker_id = await register_worker(url)
        master, session_id, _ = await create_session(url)
        await submit(master, session_id, [make_task("a.png", b"a" * 10)] * 2)
        busy = await next_view(feed, lambda view: view["queue"]["active"] == 1)
        assert busy["workers"][0]["id"] == worker_id
        assert busy["workers"][0]["file"] == "a.png"
        assert busy["sessions"][0]["id"] == session_id
        assert busy["sessions"][0]["total"] == 2

        task = (await worker.expect("TASK_ASSIGNED"))["task"]
        await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x")
        done = await next_view(feed, lambda view: view["totals"]["completed"] == 1)
        assert done["sessions"][0]["completed"] == 1
        assert sum(done["throughput"]["completed"]) == 1
        assert sum(done["throughput"]["bytes"]) == 10


async def test_a_page_hears_when_its_bridge_loses_the_core(deployment):
    """The last view comes again, marked with the core link down."""
    # A bridge notices a dead core by its silence: keep that short here.
    core, endpoint = deployment.core(*FAST_LINK)
    _, port = deployment.bridge(endpoint, *FAST_LINK)

    async with connect(f"ws://127.0.0.1:{port}/status/live") as feed:
        await next_view(feed, lambda view: view["links"]["thisBridge"]["coreLink"])
        core.kill9()

        lost = await next_view(
            feed, lambda view: not view["links"]["thisBridge"]["coreLink"]
        )
        assert lost["queue"] == {"pending": 0, "active": 0}
        status, _, _ = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{port}/readyz"
        )
        assert status == 503


async def test_a_page_that_sends_junk_is_ignored(deployment):
    """Whatever a page sends is read and dropped; plugins go on unharmed."""
    _, port = deployment.linkup()
    url = f"ws://127.0.0.1:{port}"

    async with connect(f"{url}/status/live") as feed:
        await next_view(feed, lambda view: True)
        await feed.send('{"type": "WORKER_REGISTER"}')
        await feed.send(b"\x00" * 1000)

        _, worker_id = await register_worker(url)
        seen = await next_view(feed, lambda view: len(view["workers"]) == 1)
        assert seen["workers"][0]["id"] == worker_id


async def test_a_page_opened_later_is_not_shown_an_old_view(deployment):
    """What changed while no page was open is in the first view a new page gets."""
    _, port = deployment.linkup()
    url = f"ws://127.0.0.1:{port}"
    async with connect(f"{url}/status/live") as feed:
        await next_view(feed, lambda view: True)

    async def no_viewer() -> bool:
        return (
            await metric(port, "linkup_status_viewers") == "linkup_status_viewers 0.0"
        )

    await eventually(no_viewer, "the page's close noticed")

    _, worker_id = await register_worker(url)
    async with connect(f"{url}/status/live") as feed:
        first = orjson.loads(await asyncio.wait_for(feed.recv(), TIMEOUT))
        assert [worker["id"] for worker in first["workers"]] == [worker_id]
