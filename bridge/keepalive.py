"""
WebSocket keepalive that never drops a connection busy moving data.

websockets' own keepalive (``websockets/asyncio/connection.py``,
``Connection.keepalive``) pings every ``ping_interval`` and fails the
connection with 1011 when the pong is not back within ``ping_timeout``. Only
the pong counts: data frames arriving meanwhile do not. A pong travels behind
whatever was queued before it, so a healthy plugin gets closed when

- it is sending a large message (a batch of files) that takes longer than
  ``ping_timeout``: its pong waits behind the rest of its frame; and
- it is receiving a large message (a file to upload) slowly: websockets
  starts the timeout once its own write buffer has drained, while the
  kernel's send buffer and the peer's receive buffer (several MB) still
  hold data ahead of the ping.

:class:`KeepaliveConnection` keeps websockets' pings, which keep idle
connections open through proxies, and replaces the timeout with a watchdog:
the connection is closed with 1011 ``keepalive timeout`` only when a ping
has been waiting for its pong for ``ping_timeout`` *and* for that long no
byte has arrived and no byte has left (see :class:`Liveness`).

Its :meth:`~KeepaliveConnection.close` ends within ``close_timeout`` even
when the peer does not read. websockets' own first waits, without a time
limit, for its write buffer to drain, and only then applies
``close_timeout``; the server's shutdown calls it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import sys
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.frames import CloseCode
from websockets.protocol import State
from websockets.server import ServerProtocol

__all__ = ["CLOSE_KEEPALIVE", "KeepaliveConnection", "Liveness"]

logger = logging.getLogger("linkup.bridge.keepalive")

CLOSE_KEEPALIVE = CloseCode.INTERNAL_ERROR  # 1011, as websockets' own keepalive

# Linux tells how many bytes a TCP socket has not yet had acknowledged
# (SIOCOUTQ, which has the value of TIOCOUTQ). Elsewhere only the transport's
# own buffer is seen, and data still in the kernel's buffers is not.
if sys.platform == "linux":
    import fcntl
    import termios

    _SIOCOUTQ: int | None = termios.TIOCOUTQ
else:  # pragma: no cover
    _SIOCOUTQ = None


_NO_LINGER = struct.pack("ii", 1, 0)


class Liveness:
    """
    When a connection last showed that bytes move, and how long it has not.

    Pure bookkeeping; :class:`KeepaliveConnection` feeds it.

    """

    def __init__(self, now: float) -> None:
        #: Last time bytes arrived, or left towards the peer.
        self.last_progress = now
        self._backlog = 0

    def received(self, now: float) -> None:
        """
        Bytes arrived (any: data, a pong, part of a frame).

        """
        self.last_progress = now

    def outbound(self, now: float, backlog: int) -> None:
        """
        Sample the bytes written but not yet taken by the peer.

        Less than at the last sample means the peer took some. More means
        only that we wrote more, which says nothing about the peer.

        """
        if backlog < self._backlog:
            self.last_progress = now
        self._backlog = backlog

    def silence(self, now: float, oldest_ping: float | None) -> float:
        """
        How long the peer has been unresponsive: no pong to a ping sent at
        ``oldest_ping``, and no progress either way since then; 0 if no ping
        is waiting.

        """
        if oldest_ping is None:
            return 0.0
        return now - max(oldest_ping, self.last_progress)


class KeepaliveConnection(ServerConnection):
    """
    A server connection whose keepalive tolerates a late pong while data
    flows, and whose close never waits longer than ``close_timeout``.

    Pass it to ``serve(create_connection=...)``. ``ping_interval`` keeps its
    websockets meaning. ``ping_timeout`` is reinterpreted: the time a ping may
    wait for its pong while no byte moves in either direction. websockets'
    own timeout is turned off.

    Bytes move when they arrive, or when the peer's TCP stack acknowledges
    bytes sent to it. Data that the peer's kernel holds but its application
    has not read does not count: a peer that stops reading for
    ``ping_timeout`` looks dead, whatever it still has to read.

    """

    def __init__(
        self,
        protocol: ServerProtocol,
        server: Server,
        *,
        ping_timeout: float | None = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(protocol, server, ping_timeout=None, **kwargs)
        self.silence_timeout = ping_timeout
        self.liveness = Liveness(self.loop.time())
        self._watchdog: asyncio.Task[None] | None = None

    def data_received(self, data: bytes) -> None:
        self.liveness.received(self.loop.time())
        super().data_received(data)

    def start_keepalive(self) -> None:
        # Called by websockets once the opening handshake has succeeded.
        super().start_keepalive()
        if self.keepalive_task is not None and self.silence_timeout is not None:
            self._watchdog = self.loop.create_task(self._watch(self.silence_timeout))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def close(
        self, code: CloseCode | int = CloseCode.NORMAL_CLOSURE, reason: str = ""
    ) -> None:
        """
        As websockets' ``close()``, but reset the TCP connection if the
        closing handshake is not over within ``close_timeout``, even when the
        peer does not read; the close frame may then never be delivered.

        """
        try:
            async with asyncio.timeout(self.close_timeout):
                await super().close(code, reason)
        except TimeoutError:
            _reset(self)

    async def _watch(self, timeout: float) -> None:
        # Outbound progress is sampled, so check a few times per timeout.
        while True:
            await asyncio.sleep(timeout / 4)
            if self.state is not State.OPEN:
                return  # closing already, within close_timeout
            now = self.loop.time()
            self.liveness.outbound(now, _outbound_backlog(self))
            if not self.transport.is_reading():
                # websockets stopped reading because the bridge has not yet
                # taken the messages already received: a pong may be waiting
                # on our side, so this silence is not the peer's.
                self.liveness.received(now)
            # pending_pings: websockets' unanswered pings, oldest first, each
            # with the time it was written (before waiting for the buffer to
            # drain, so a ping stuck behind a peer that does not read counts).
            oldest = next(iter(self.pending_pings.values()), None)
            silence = self.liveness.silence(now, None if oldest is None else oldest[1])
            if silence >= timeout:
                logger.warning(
                    "keepalive timeout: no pong and no data either way for "
                    "%.1fs, closing remote=%s",
                    silence,
                    _remote(self),
                )
                await self.close(CLOSE_KEEPALIVE, "keepalive timeout")
                return


def _reset(connection: ServerConnection) -> None:
    # A plain close() of a socket with unsent data leaves the kernel trying
    # to deliver it (up to the send buffer, a few MB) to a peer that does not
    # read; a zero linger makes it send RST and drop the data at once.
    sock = connection.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    connection.transport.abort()


def _outbound_backlog(connection: ServerConnection) -> int:
    # Bytes written that the peer has not acknowledged: the transport's
    # buffer, plus the kernel's on Linux.
    transport = connection.transport
    backlog = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if _SIOCOUTQ is not None and sock is not None:
        with contextlib.suppress(OSError, ValueError):
            unacked = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
            backlog += struct.unpack("i", unacked)[0]
    return backlog


def _remote(connection: ServerConnection) -> str:
    address = connection.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"
