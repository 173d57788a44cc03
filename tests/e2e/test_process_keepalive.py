"""
WebSocket keepalive through a real `linkup`, with short ping settings: idle
connections that answer pings stay, silent ones are closed, and a connection
busy moving a large message is never closed for a late pong.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator

import pytest

from bridge.keepalive import CLOSE_KEEPALIVE
from bridge.server import CLOSE_TIMEOUT
from tests.e2e.harness import TIMEOUT, UNIT, Deployment, Process
from tests.e2e.protocol_helpers import Clients, make_task, submit
from tests.e2e.raw_clients import RawClient, client_number, wait_for_log

PING_INTERVAL = 0.3 * UNIT
PING_TIMEOUT = 0.6 * UNIT
# The watchdog checks four times per timeout; logs are polled every 50 ms.
CLOSE_SLACK = PING_TIMEOUT / 4 + 0.5 * UNIT


@contextlib.asynccontextmanager
async def linkup(deployment: Deployment) -> AsyncIterator[tuple[Process, Clients]]:
    process, port = await asyncio.to_thread(
        deployment.linkup,
        "--ping-interval",
        str(PING_INTERVAL),
        "--ping-timeout",
        str(PING_TIMEOUT),
    )
    clients = Clients(f"ws://127.0.0.1:{port}")
    try:
        yield process, clients
    finally:
        await clients.close()


def keepalive_timeout(client: RawClient) -> str:
    return rf"keepalive timeout: .* remote=127\.0\.0\.1:{client.local_port}\n"


async def test_an_idle_client_that_answers_pings_stays_connected(deployment):
    async with linkup(deployment) as (process, clients):
        client = await RawClient.connect(clients.url)
        start = time.monotonic()
        async with asyncio.timeout(TIMEOUT):
            while client.pings < 10:
                await client.read()
        elapsed = time.monotonic() - start

        # Pings came every interval, for several times the timeout.
        assert elapsed > 9 * PING_INTERVAL > 4 * PING_TIMEOUT
        await client.send("GET_STATS")
        await client.expect("STATS_UPDATE")
        assert client.close_frame is None
        assert "keepalive timeout" not in process.log()
        await client.close()


async def test_a_client_that_stops_answering_pings_is_closed(deployment):
    async with linkup(deployment) as (process, clients):
        client = await RawClient.connect(clients.url)
        number = await client_number(process, client.local_port)
        await client.send("GET_STATS")
        await client.expect("STATS_UPDATE")

        # From here it neither reads nor sends: pings go unanswered.
        silent_since = time.monotonic()
        await wait_for_log(process, keepalive_timeout(client))
        elapsed = time.monotonic() - silent_since
        assert 0.8 * PING_TIMEOUT < elapsed < PING_INTERVAL + PING_TIMEOUT + CLOSE_SLACK

        # The bridge said why, and waits for the closing handshake.
        await client.read_until_closed()
        assert client.close_frame is not None
        assert client.close_frame.code == CLOSE_KEEPALIVE
        assert client.close_frame.reason == "keepalive timeout"
        await wait_for_log(process, rf"client disconnected client={number}\n")
        await client.close()


async def test_a_client_sending_a_large_message_slowly_is_not_closed(deployment):
    """Its pongs wait behind its message; the bytes arriving keep it alive."""
    async with linkup(deployment) as (process, clients):
        master = await RawClient.connect(clients.url)
        await master.send("CREATE_SESSION")
        session_id = (await master.expect("SESSION_CREATED"))["sessionId"]
        pings_before = master.pings
        tasks = [make_task(f"{i}.png", random.randbytes(2**19)) for i in range(4)]

        # About 2.8 MB over several ping timeouts, reading nothing meanwhile.
        await master.send_slowly(
            "SUBMIT_TASKS",
            duration=4 * PING_TIMEOUT + PING_INTERVAL,
            sessionId=session_id,
            tasks=tasks,
        )
        submitted = await master.expect("TASKS_SUBMITTED")

        assert submitted["taskCount"] == len(tasks), submitted
        assert master.close_frame is None
        # Pings were waiting for it while it sent, longer than the timeout.
        assert master.pings - pings_before >= 2
        assert "keepalive timeout" not in process.log()
        await master.close()


async def test_a_client_receiving_a_large_message_slowly_is_not_closed(deployment):
    """
    A worker reads its file slowly and says nothing meanwhile: the bytes it
    takes keep it alive, also once the bridge's own buffer is empty and the
    rest waits in the kernel's, ahead of the ping.

    """
    async with linkup(deployment) as (process, clients):
        # A small receive buffer, so that the kernel acknowledges bytes only
        # as fast as the test reads them: a slow network, in effect.
        worker = await RawClient.connect(clients.url, receive_buffer=2**16)
        await worker.send("WORKER_REGISTER")
        await worker.expect("WORKER_REGISTERED")
        master, session_id, _ = await clients.master()
        data = random.randbytes(9 * 2**19)  # 4.5 MiB, 6 MiB of Base64
        await submit(master, session_id, [make_task("big.png", data)])

        # 32 KiB per 10 ms: about 2 s, several ping timeouts.
        start = time.monotonic()
        assigned = await worker.expect(
            "TASK_ASSIGNED", timeout=TIMEOUT, chunk=2**15, pause=0.01 * UNIT
        )
        assert time.monotonic() - start > 2 * PING_TIMEOUT

        task = assigned["task"]
        received = base64.b64decode(task["dataBase64"], validate=True)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        await worker.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/1")
        completed = await master.expect("TASK_COMPLETED")
        assert completed["taskId"] == task["id"], completed
        assert worker.close_frame is None
        assert "keepalive timeout" not in process.log()
        await worker.close()


@pytest.mark.slow
async def test_a_worker_that_stops_reading_its_file_and_falls_silent_is_closed(
    deployment,
):
    """Outbound bytes that do not move are no sign of life."""
    async with linkup(deployment) as (process, clients):
        worker = await RawClient.connect(clients.url, receive_buffer=16 * 2**10)
        number = await client_number(process, worker.local_port)
        await worker.send("WORKER_REGISTER")
        await worker.expect("WORKER_REGISTERED")
        master, session_id, _ = await clients.master()

        # Far more than the kernel buffers: the bridge's write stays stuck.
        data = random.randbytes(12 * 2**20)
        await submit(master, session_id, [make_task("big.png", data)])
        assigned_at = time.monotonic()

        await wait_for_log(process, keepalive_timeout(worker))
        elapsed = time.monotonic() - assigned_at
        assert elapsed < PING_INTERVAL + PING_TIMEOUT + CLOSE_SLACK

        # Its buffers are full, so the close frame cannot reach it: the bridge
        # resets the connection after its close timeout and tells the core.
        await wait_for_log(
            process,
            rf"client disconnected client={number}\n",
            timeout=CLOSE_TIMEOUT + TIMEOUT,
        )
        await wait_for_log(process, "error=worker disconnected")
        await worker.read_until_closed()
        assert worker.reset
        await worker.close()
