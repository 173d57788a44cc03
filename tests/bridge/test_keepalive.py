"""
The keepalive watchdog's bookkeeping, and closing a peer that does not read.
"""

from __future__ import annotations

import asyncio
import socket
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.protocol import State

from bridge.keepalive import KeepaliveConnection, Liveness


def test_no_ping_waiting_means_no_silence():
    liveness = Liveness(now=0.0)
    assert liveness.silence(100.0, oldest_ping=None) == 0.0


def test_silence_counts_from_the_ping_when_nothing_moved_since():
    liveness = Liveness(now=0.0)
    assert liveness.silence(25.0, oldest_ping=20.0) == 5.0


def test_bytes_arriving_after_the_ping_reset_the_silence():
    # A pong stuck behind a large upload: the upload's bytes keep it alive.
    liveness = Liveness(now=0.0)
    liveness.received(now=70.0)
    assert liveness.silence(75.0, oldest_ping=20.0) == 5.0


def test_a_shrinking_backlog_is_progress_and_a_growing_one_is_not():
    liveness = Liveness(now=0.0)
    liveness.outbound(now=10.0, backlog=1_000_000)  # we wrote: not progress
    assert liveness.last_progress == 0.0
    liveness.outbound(now=20.0, backlog=900_000)  # the peer took some
    assert liveness.last_progress == 20.0
    liveness.outbound(now=30.0, backlog=900_000)  # stuck
    assert liveness.last_progress == 20.0
    liveness.outbound(now=40.0, backlog=0)
    assert liveness.last_progress == 40.0
    liveness.outbound(now=50.0, backlog=0)  # idle is not progress
    assert liveness.last_progress == 40.0
    assert liveness.silence(55.0, oldest_ping=45.0) == 10.0


async def test_close_ends_in_close_timeout_even_when_the_peer_does_not_read():
    """websockets' close() waits for its buffer to drain first; this does not."""
    closed = asyncio.Event()
    elapsed: list[float] = []

    async def handler(connection: ServerConnection) -> None:
        assert isinstance(connection, KeepaliveConnection)
        connection.close_timeout = 0.5
        await connection.recv()  # the client has stopped reading
        sender = asyncio.ensure_future(connection.send(b"x" * 50_000_000))
        await asyncio.sleep(0)
        start = time.monotonic()
        await connection.close(1008, "too slow")
        await asyncio.wait_for(connection.wait_closed(), 5)
        elapsed.append(time.monotonic() - start)
        assert connection.state is State.CLOSED
        await asyncio.gather(sender, return_exceptions=True)
        closed.set()

    async with serve(
        handler,
        "127.0.0.1",
        0,
        create_connection=KeepaliveConnection,
        ping_interval=None,
        compression=None,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        async with connect(
            f"ws://127.0.0.1:{port}",
            sock=sock,
            ping_interval=None,
            compression=None,
            max_size=None,
            close_timeout=0.1,
        ) as client:
            client.transport.pause_reading()
            await client.send("go")
            await asyncio.wait_for(closed.wait(), 10)
            client.transport.abort()

    assert 0.4 < elapsed[0] < 3.0, elapsed
