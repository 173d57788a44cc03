"""
The bridge's WebSocket connection: websockets' own, with fewer copies.

A file goes through the bridge twice: into it in a master's batch and out of
it in a worker's ``TASK_ASSIGNED``. websockets copies each large message a
few times on the way, and with glibc's mmap threshold at 1 MiB
(linkup/memory.py) every large copy also lands in fresh pages that the
kernel must fault in and zero: on a 2-CPU test machine that doubled what a
copy of a 1 MiB file cost. :class:`BridgeConnection` removes the copies that
websockets does not need:

- Sending, :meth:`BridgeConnection.send_messages` writes each message as a
  frame header followed by its pieces (:class:`bridge.messages.Spliced`: the
  JSON around a file and the file itself, a view of the frame the core sent),
  where ``send()`` would have the bridge join the pieces and websockets copy
  them again behind the header (``Frame.serialize``). Small writes are
  joined (:func:`coalesce`), so that several small messages queued for one
  client leave in one system call instead of one each.
- Receiving, websockets (``websockets.streams.StreamReader``) appends each
  read from the socket to one growing buffer, which may move as it grows,
  and then slices a frame's payload out of it: copies of the whole frame.
  For a large frame, :class:`_Reader` keeps the reads and joins them once,
  into the buffer it hands over.

Everything else (the protocol's state, closing, pings, flow control) is
websockets' own. This leans on attributes of websockets' sans-I/O
``Protocol`` that are not documented API (``writes``, ``reader``,
``expect_continuation_frame``); tests/bridge/test_connection.py checks the
bytes on the wire against a real websockets client.
"""

from __future__ import annotations

import logging
import mmap
import struct
from collections.abc import Generator, Iterable, Sequence
from typing import Any, cast

from websockets.asyncio.server import Server
from websockets.exceptions import InvalidState, ProtocolError
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from bridge.keepalive import KeepaliveConnection
from bridge.memory import MMAP_THRESHOLD
from bridge.messages import Spliced

__all__ = ["COALESCE_BYTES", "BridgeConnection", "coalesce", "text_frame_header"]

logger = logging.getLogger("linkup.bridge.connection")

#: Writes smaller than this are joined with their neighbours into one write.
COALESCE_BYTES = 64 * 1024

#: A frame whose payload is at least this large is read by _Reader with
#: fewer copies than websockets' own reader makes.
_HAND_OVER_BYTES = 64 * 1024

# FIN and the text opcode; a server's frames are not masked.
_TEXT_FIN = 0x81


def text_frame_header(length: int) -> bytes:
    """
    The header of an unmasked, unfragmented text frame of ``length`` bytes.

    """
    if length < 126:
        return struct.pack("!BB", _TEXT_FIN, length)
    if length < 65536:
        return struct.pack("!BBH", _TEXT_FIN, 126, length)
    return struct.pack("!BBQ", _TEXT_FIN, 127, length)


def coalesce(writes: Sequence[Any]) -> list[Any]:
    """
    Join runs of small writes, keep large ones as they are.

    An empty write is websockets' end of stream (``SEND_EOF``) and stays on
    its own, in its place.

    """
    result: list[Any] = []
    run: list[Any] = []
    run_bytes = 0
    for data in writes:
        size = len(data)
        if size and size < COALESCE_BYTES and run_bytes + size <= COALESCE_BYTES:
            run.append(data)
            run_bytes += size
            continue
        if run:
            result.append(run[0] if len(run) == 1 else b"".join(run))
            run = []
            run_bytes = 0
        if size and size < COALESCE_BYTES:
            run.append(data)
            run_bytes = size
        else:
            result.append(data)
    if run:
        result.append(run[0] if len(run) == 1 else b"".join(run))
    return result


def _map_anonymous(size: int) -> mmap.mmap | None:
    # Private and anonymous: the kernel gives it zeroed pages as they are
    # first written, and counts them as the process's own (RssAnon). Where
    # the system refuses the address space (a very large announced frame, or
    # strict overcommit), None: the caller reads the frame as it did before.
    try:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    except OSError as exc:
        logger.warning(
            "cannot map %d bytes for a WebSocket frame (%s); reading it into "
            "the heap instead",
            size,
            exc,
        )
        return None


class _Reader(StreamReader):
    # websockets' reader, but a large frame's payload is copied only once.
    # websockets appends every read from the socket to one bytearray, which
    # glibc may move (a copy) each time it grows, and then slices the payload
    # out of it (another copy). Here the reads that make up a large payload
    # are kept as they came and joined once, when the last one has arrived:
    # memory grows only with what arrives, and the joined buffer comes from
    # the heap that the last message freed (bridge.memory). A payload above
    # glibc's mmap threshold is written as it arrives into an anonymous
    # mapping of its size instead: the kernel gives it pages only as they are
    # written, so memory still grows only with what arrives, and none of it
    # passes through the heap, where the buffer's growth left tens of MB that
    # the heap kept after the frame had gone. Either way the bytes that
    # follow the payload (less than one read) start the read buffer again.

    # Set while read_exact collects a payload: the reads so far.
    _chunks: list[bytes | bytearray] | None = None
    _chunk_bytes = 0
    # Set while read_exact collects a payload above the mmap threshold: the
    # mapping it is written into, and how much of it is written.
    _mapping: mmap.mmap | None = None
    _mapped_bytes = 0

    def feed_data(self, data: bytes | bytearray) -> None:
        chunks, mapping = self._chunks, self._mapping
        if chunks is None and mapping is None:
            super().feed_data(data)
            return
        if self.eof:
            raise EOFError("stream ended")
        if mapping is not None:
            self._map_data(mapping, data)
        elif chunks is not None:
            # asyncio hands over a new bytes object for every read; anything
            # else might be reused by its owner.
            chunks.append(data if type(data) is bytes else bytes(data))
            self._chunk_bytes += len(data)

    def _map_data(self, mapping: mmap.mmap, data: bytes | bytearray) -> None:
        # Copies, so a buffer its owner reuses is safe here too.
        start = self._mapped_bytes
        taken = min(len(data), len(mapping) - start)
        with memoryview(data) as view:
            mapping[start : start + taken] = view[:taken]
            self.buffer += view[taken:]
        self._mapped_bytes = start + taken

    def read_exact(self, n: int) -> Generator[None, None, bytearray]:
        if n < _HAND_OVER_BYTES:
            return (yield from super().read_exact(n))
        if len(self.buffer) < n:
            if n <= MMAP_THRESHOLD:
                yield from self._collect_chunks(n)
            else:
                mapping = _map_anonymous(n)
                if mapping is not None:
                    return (yield from self._read_mapped(mapping, n))
                # No mapping to be had: the payload grows in the buffer.
                while len(self.buffer) < n:
                    self._wait_for(len(self.buffer), n)
                    yield
        data = self.buffer
        self.buffer = data[n:]
        del data[n:]
        return data

    def _collect_chunks(self, n: int) -> Generator[None, None, None]:
        # Leaves the reads joined in self.buffer, however the wait ends.
        self._chunks = [self.buffer]
        self._chunk_bytes = len(self.buffer)
        self.buffer = bytearray()
        try:
            while self._chunk_bytes < n:
                self._wait_for(self._chunk_bytes, n)
                yield
        finally:
            chunks, self._chunks = self._chunks, None
            self.buffer = bytearray().join(chunks)
            del chunks

    def _read_mapped(
        self, mapping: mmap.mmap, n: int
    ) -> Generator[None, None, bytearray]:
        # A view of the mapping stands in for a bytearray: websockets only
        # unmasks the payload (apply_mask takes bytes, bytearray or a
        # memoryview), which copies it into the bytes of the frame, and then
        # lets the view go, and with it the mapping.
        buffered, self.buffer = self.buffer, bytearray()
        self._mapping = mapping
        self._mapped_bytes = 0
        try:
            self._map_data(mapping, buffered)
            del buffered
            while self._mapped_bytes < n:
                self._wait_for(self._mapped_bytes, n)
                yield
        except BaseException:
            # A frame cut short: unmap it now. websockets keeps the error,
            # whose traceback holds this generator's locals, the mapping
            # among them, in a cycle that only a garbage collection breaks.
            mapping.close()
            raise
        finally:
            self._mapping = None
        return cast(bytearray, memoryview(mapping))

    def _wait_for(self, received: int, n: int) -> None:
        if self.eof:
            raise EOFError(f"stream ends after {received} bytes, expected {n} bytes")


class BridgeConnection(KeepaliveConnection):
    """
    :class:`KeepaliveConnection` with the copy-saving sends and reads above.

    Pass it to ``serve(create_connection=...)``.

    """

    def __init__(self, protocol: ServerProtocol, server: Server, **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        # The same object, so that the opening handshake, which the parser
        # is already waiting for in read_line, reads from it as before.
        protocol.reader.__class__ = _Reader

    async def send_messages(self, messages: Iterable[bytes | Spliced]) -> None:
        """
        Send each of ``messages`` as a text frame: UTF-8 that the caller
        vouches for, as ``send(message, text=True)`` would, but in one go
        and without joining a :class:`Spliced` message's pieces.

        Like ``send()``, waits only after everything is written to the
        transport, for its buffer to drain, so cancelling it loses nothing
        that was not already on its way.

        Raises:
            ConnectionClosed: When the connection is closed.

        """
        async with self.send_context():
            protocol = self.protocol
            # As websockets' Protocol.send_text checks; the bridge never
            # sends fragmented messages, so the first never fails.
            if protocol.expect_continuation_frame:
                raise ProtocolError("expected a continuation frame")
            if protocol.state is not State.OPEN:
                raise InvalidState(f"connection is {protocol.state.name.lower()}")
            writes: list[Any] = protocol.writes
            for message in messages:
                writes.append(text_frame_header(len(message)))
                # Never an empty write: websockets reads it as end of stream.
                if isinstance(message, Spliced):
                    writes.extend(piece for piece in message.pieces if len(piece))
                elif message:
                    writes.append(message)

    def send_data(self) -> None:
        # Called by websockets with the frames it queued, and by
        # send_messages' send_context: fewer, larger writes.
        if len(self.protocol.writes) > 1:
            self.protocol.writes = coalesce(self.protocol.writes)
        super().send_data()
