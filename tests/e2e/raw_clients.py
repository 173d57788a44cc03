"""
Clients that misbehave on purpose, for the slow-client and keepalive tests.

Not a test module. :class:`RawClient` speaks WebSocket over a bare socket
with websockets' sans-I/O ``ClientProtocol``, so that a test decides when it
reads, how fast, and how fast it writes: a client that is busy sending a large
message cannot answer a ping until the message is out, like a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import re
import socket
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from tests.e2e.harness import TIMEOUT, Process


async def open_socket(url: str, receive_buffer: int | None = None) -> socket.socket:
    """
    A connected non-blocking TCP socket to ``url``'s host and port.

    A small ``receive_buffer`` keeps the kernel from absorbing megabytes
    that the client does not read (Linux grows it up to tcp_rmem otherwise).

    """
    uri = parse_uri(url)
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (uri.host, uri.port))
    return sock


class RawClient:
    """
    A WebSocket client whose reads and writes the test drives by hand.

    Pings are answered, and messages collected, only while the test reads.

    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        protocol: ClientProtocol,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol
        self.messages: list[dict[str, Any]] = []
        self.pings = 0
        #: The close frame received, if any.
        self.close_frame: Close | None = None
        #: True once the server's side of the TCP connection has ended.
        self.eof = False
        #: True if it ended with a reset rather than a close.
        self.reset = False

    @classmethod
    async def connect(cls, url: str, receive_buffer: int | None = None) -> RawClient:
        sock = await open_socket(url, receive_buffer)
        reader, writer = await asyncio.open_connection(sock=sock)
        protocol = ClientProtocol(parse_uri(url), max_size=None)
        protocol.send_request(protocol.connect())
        client = cls(reader, writer, protocol)
        client._flush()
        async with asyncio.timeout(TIMEOUT):
            while protocol.state is State.CONNECTING:
                await client.read()
        if protocol.handshake_exc is not None:
            raise protocol.handshake_exc
        return client

    @property
    def local_port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    def frame(self, message_type: str, **fields: Any) -> bytes:
        """
        The bytes of one text message, for the test to write as it likes.

        """
        data = json.dumps({"type": message_type, **fields}).encode()
        self.protocol.send_text(data)
        return b"".join(self.protocol.data_to_send())

    async def send(self, message_type: str, **fields: Any) -> None:
        self.writer.write(self.frame(message_type, **fields))
        await self.writer.drain()

    async def send_slowly(
        self, message_type: str, duration: float, steps: int = 100, **fields: Any
    ) -> None:
        """
        Send one message spread evenly over ``duration`` seconds, reading
        nothing meanwhile.

        """
        data = self.frame(message_type, **fields)
        step = -(-len(data) // steps)
        for start in range(0, len(data), step):
            self.writer.write(data[start : start + step])
            await self.writer.drain()
            await asyncio.sleep(duration / steps)

    async def read(self, size: int = 2**16) -> None:
        """
        Read up to ``size`` bytes and act on them: collect messages, answer
        pings and a close.

        """
        try:
            data = await self.reader.read(size)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if data:
            self.protocol.receive_data(data)
        else:
            self.eof = True
            self.protocol.receive_eof()
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                continue
            assert isinstance(event, Frame)
            if event.opcode is Opcode.TEXT:
                self.messages.append(json.loads(event.data))
            elif event.opcode is Opcode.PING:
                self.pings += 1
            elif event.opcode is Opcode.CLOSE:
                self.close_frame = Close.parse(event.data)
        self._flush()

    async def expect(
        self,
        message_type: str,
        timeout: float = TIMEOUT,
        chunk: int = 2**16,
        pause: float = 0.0,
    ) -> dict[str, Any]:
        """
        Read until a ``message_type`` arrives; return it, keeping the others.

        Reads ``chunk`` bytes at a time with ``pause`` seconds in between,
        to read slowly.

        """
        async with asyncio.timeout(timeout):
            while True:
                for index, message in enumerate(self.messages):
                    if message["type"] == message_type:
                        return self.messages.pop(index)
                if self.eof or self.close_frame is not None:
                    raise AssertionError(
                        f"closed ({self.close_frame}) before {message_type}"
                    )
                await self.read(chunk)
                if pause:
                    await asyncio.sleep(pause)

    async def read_until_closed(self, timeout: float = TIMEOUT) -> None:
        """
        Read everything until the server closes; answer its close frame.

        """
        async with asyncio.timeout(timeout):
            while not self.eof:
                await self.read()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.writer.write(data)
            elif self.writer.can_write_eof():
                try:
                    self.writer.write_eof()
                except OSError as exc:
                    # Linux may report the reset only here, after an EOF.
                    if exc.errno != errno.ENOTCONN:
                        raise
                    self.reset = True


async def wait_for_log(
    process: Process, pattern: str, timeout: float = TIMEOUT
) -> re.Match[str]:
    """
    Wait until a line of ``process``'s log matches ``pattern``; return it.

    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        match = re.search(pattern, process.log())
        if match is not None:
            return match
        if loop.time() > deadline:
            raise AssertionError(
                f"{pattern!r} not in {process.name} log within {timeout}s"
            )
        await asyncio.sleep(0.05)


async def client_number(process: Process, local_port: int) -> int:
    """
    The number the bridge gave the connection from ``local_port``.

    """
    match = await wait_for_log(
        process, rf"client connected client=(\d+) remote=127\.0\.0\.1:{local_port} "
    )
    return int(match.group(1))
