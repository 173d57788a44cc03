"""
Clients that stop reading, through a real `linkup`: the bridge bounds what it
holds for them, closes them with 1008 when they fall too far behind, and
never makes the core link or other clients wait for them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
import signal
from collections.abc import AsyncIterator

import pytest

from bridge.outbox import CLOSE_TOO_SLOW
from bridge.server import CLOSE_TIMEOUT
from tests.e2e.harness import TIMEOUT, UNIT, Deployment, Process
from tests.e2e.protocol_helpers import (
    Clients,
    Upload,
    assert_still_served,
    collect_results,
    expect_stats,
    fetch,
    in_background,
    make_task,
    submit,
    upload_forever,
    watching,
)
from tests.e2e.raw_clients import RawClient, client_number, wait_for_log

MAX_OUTBOX = 256 * 2**10
# The kernel buffers a few MB for a client that does not read (the bridge's
# send buffer grows up to tcp_wmem's 4 MiB): a file well beyond that keeps
# the bridge's write to the client waiting.
STUCK_FILE_SIZE = 12 * 2**20


@contextlib.asynccontextmanager
async def linkup(
    deployment: Deployment, *options: str
) -> AsyncIterator[tuple[Process, Clients]]:
    process, port = await asyncio.to_thread(deployment.linkup, *options)
    clients = Clients(f"ws://127.0.0.1:{port}")
    try:
        yield process, clients
    finally:
        await clients.close()


async def slow_master(clients: Clients) -> RawClient:
    """
    A master that will stop reading: it reads until its session exists.

    """
    master = await RawClient.connect(clients.url, receive_buffer=16 * 2**10)
    await master.send("CREATE_SESSION")
    await master.expect("SESSION_CREATED")
    return master


async def fall_behind(process: Process, client: RawClient, number: int) -> int:
    """
    Make the bridge close ``client`` as too slow: ask for stats without
    reading the answers until it does. Return the bytes it had waiting.

    """
    frame = client.frame("GET_STATS")
    too_slow = (
        rf"WARNING +linkup\.bridge: closing client={number}: "
        r"too slow: (\d+) bytes waiting"
    )

    async def ask_for_stats() -> None:
        # A few thousand a second: enough to fall behind within a second or
        # two, not so many that the core falls behind. (A client flooding the
        # core delays everyone, whether it reads or not; not tested here.)
        while True:
            for _ in range(20):
                client.writer.write(frame)
            await client.writer.drain()
            await asyncio.sleep(0.005)

    async with in_background(ask_for_stats()):
        match = await wait_for_log(process, too_slow, timeout=3 * TIMEOUT)
    return int(match.group(1))


@pytest.mark.slow
async def test_a_master_that_never_reads_is_closed_while_others_carry_on(deployment):
    """
    The bridge holds at most --max-outbox for it, others never wait for it,
    and its connection is reset when it does not answer the close.

    """
    async with linkup(deployment, "--max-outbox", "256KiB") as (process, clients):
        slow = await slow_master(clients)
        number = await client_number(process, slow.local_port)
        workers = [(await clients.worker())[0] for _ in range(2)]
        master, session_id, _ = await clients.master()
        files = {f"f{index:02}.png": random.randbytes(20_000) for index in range(20)}
        uploads: list[Upload] = []
        rng = random.Random(7)

        async with in_background(
            *(upload_forever(worker, uploads, rng, 0.05 * UNIT) for worker in workers)
        ) as background:
            falling_behind = asyncio.ensure_future(fall_behind(process, slow, number))
            await submit(
                master, session_id, [make_task(n, d) for n, d in files.items()]
            )
            results, finished = await watching(background, collect_results(master))
            waiting = await falling_behind

        # The healthy master and workers were served in full.
        assert [r["type"] for r in results] == ["TASK_COMPLETED"] * len(files)
        assert finished["stats"]["completed"] == len(files), finished
        assert sorted(u.filename for u in uploads) == sorted(files)
        # What the bridge held for the slow one was bounded: the limit, and
        # the one STATS_UPDATE that went over it.
        assert MAX_OUTBOX < waiting <= MAX_OUTBOX + 4096, waiting

        # It never completes the closing handshake: the bridge gives up after
        # its close timeout, resets the connection, and tells the core.
        await wait_for_log(
            process,
            rf"client disconnected client={number}\n",
            timeout=CLOSE_TIMEOUT + TIMEOUT,
        )
        await slow.read_until_closed()
        assert slow.reset
        assert slow.close_frame is None
        await slow.close()

        # The link and the rest of the bridge never waited for it.
        status, _, _ = await fetch(clients.url, "/readyz")
        assert status == 200
        await assert_still_served(master, *workers)


async def test_a_slow_reader_that_catches_up_is_told_why_it_was_closed(deployment):
    async with linkup(deployment, "--max-outbox", "256KiB") as (process, clients):
        slow = await slow_master(clients)
        number = await client_number(process, slow.local_port)

        waiting = await fall_behind(process, slow, number)
        # Reading again: the replies sent before it fell behind, then the
        # close frame. (The bridge may reset the connection before it reads
        # the answer, behind the requests still on their way.)
        await slow.read_until_closed()
        assert slow.close_frame is not None
        assert slow.close_frame.code == CLOSE_TOO_SLOW
        assert slow.close_frame.reason == f"too slow: {waiting} bytes waiting"
        assert {m["type"] for m in slow.messages} <= {"STATS_UPDATE"}
        await wait_for_log(process, rf"client disconnected client={number}\n")
        await slow.close()


async def test_stats_updates_for_a_client_that_does_not_read_are_coalesced(
    deployment,
):
    joins = 8
    async with linkup(deployment) as (_, clients):
        master, session_id, _ = await clients.master()
        slow = await RawClient.connect(clients.url, receive_buffer=16 * 2**10)
        await slow.send("WORKER_REGISTER")
        await slow.expect("WORKER_REGISTERED")
        while (await slow.expect("STATS_UPDATE"))["stats"]["workerCount"] != 1:
            pass

        # From here the slow worker reads nothing. Its task is far larger
        # than the kernel's buffers, so the bridge's write of it waits.
        data = random.randbytes(STUCK_FILE_SIZE)
        submitted = await submit(master, session_id, [make_task("big.png", data)])
        assert submitted["totalPending"] == 0, submitted  # assigned to it

        # Workers join one at a time; the master sees a STATS_UPDATE for each.
        for count in range(2, joins + 2):
            await clients.worker()
            await expect_stats(master, workerCount=count)

        # A marker: the ERROR for it is queued after whatever waits.
        await slow.send("NO_SUCH_TYPE")
        await slow.expect("ERROR", timeout=3 * TIMEOUT)
        types = [message["type"] for message in slow.messages]
        assert types == ["TASK_ASSIGNED", "STATS_UPDATE"], types
        assigned, stats = slow.messages
        assert stats["stats"]["workerCount"] == joins + 1, stats
        task = assigned["task"]
        received = base64.b64decode(task["dataBase64"], validate=True)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()

        await slow.send("TASK_COMPLETED", taskId=task["id"], resultUrl="https://x/1")
        completed = await master.expect("TASK_COMPLETED")
        assert completed["taskId"] == task["id"], completed
        await slow.close()


@pytest.mark.slow
async def test_linkup_stops_in_time_while_a_client_does_not_read(deployment):
    """Closing a client that does not read ends within the close timeout."""
    async with linkup(deployment) as (process, clients):
        worker = await RawClient.connect(clients.url, receive_buffer=16 * 2**10)
        await worker.send("WORKER_REGISTER")
        await worker.expect("WORKER_REGISTERED")
        master, session_id, _ = await clients.master()
        data = random.randbytes(STUCK_FILE_SIZE)
        await submit(master, session_id, [make_task("big.png", data)])
        await wait_for_log(process, r"> TASK_ASSIGNED client=\d+ payload_bytes=")

        process.signal(signal.SIGTERM)
        # linkup gives the bridge 5 s before it kills it.
        status = await asyncio.to_thread(process.popen.wait, CLOSE_TIMEOUT + UNIT)
        assert status == 0
        assert "did not stop" not in process.log()
        assert "bridge stopped" in process.log()
        await worker.close()
