"""
BridgeConnection: what a real websockets client reads from send_messages, and
that large frames read without a copy arrive whole and in order.
"""

from __future__ import annotations

import asyncio
import base64
import mmap
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from hypothesis import given, strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.streams import StreamReader

from bridge import connection as bridge_connection
from bridge.connection import (
    COALESCE_BYTES,
    BridgeConnection,
    _Reader,
    coalesce,
    text_frame_header,
)
from bridge.messages import Spliced, encode_for_client, splice_for_client

Handler = Callable[[BridgeConnection], Awaitable[None]]


@asynccontextmanager
async def pair(handler: Handler) -> AsyncIterator[ClientConnection]:
    """A server running ``handler`` on its BridgeConnection, and a client."""

    async def serve_one(connection: ServerConnection) -> None:
        assert isinstance(connection, BridgeConnection)
        await handler(connection)

    async with serve(
        serve_one,
        "127.0.0.1",
        0,
        create_connection=BridgeConnection,
        ping_interval=None,
        compression=None,
        max_size=None,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(
            f"ws://127.0.0.1:{port}",
            ping_interval=None,
            compression=None,
            max_size=None,
        ) as client:
            yield client


# Frame headers: the three length encodings of RFC 6455.


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (2**32, b"\x81\x7f\x00\x00\x00\x01\x00\x00\x00\x00"),
    ],
)
def test_text_frame_header(length: int, header: bytes) -> None:
    assert text_frame_header(length) == header


# coalesce.


def test_small_writes_are_joined_and_large_ones_kept_as_they_are() -> None:
    large = memoryview(b"L" * COALESCE_BYTES)
    out = coalesce([b"a", b"b", large, b"c", memoryview(b"d")])
    assert out == [b"ab", large, b"cd"]
    assert out[1] is large


def test_the_end_of_stream_stays_on_its_own_and_in_place() -> None:
    assert coalesce([b"a", b"", b"b", b"c"]) == [b"a", b"", b"bc"]


def test_a_run_of_small_writes_stops_at_the_limit() -> None:
    half = b"x" * (COALESCE_BYTES // 2)
    out = coalesce([half, half, b"y", half])
    assert out == [half + half, b"y" + half]


@given(
    st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.integers(1, 3).map(lambda n: b"z" * (n * COALESCE_BYTES // 2)),
        ),
        max_size=20,
    )
)
def test_coalesce_keeps_every_byte_in_order(writes: list[bytes]) -> None:
    out = coalesce(writes)
    assert b"".join(bytes(w) for w in out) == b"".join(writes)
    # The end of stream (an empty write) is never swallowed or moved.
    assert [i for i, w in enumerate(out) if not w] == [
        i for i, w in enumerate(coalesce(writes)) if not w
    ]
    assert out.count(b"") == writes.count(b"")


# send_messages.


def assignment(task_id: str, size: int) -> tuple[dict[str, object], bytes]:
    payload = base64.b64encode(os.urandom(size))
    message = {
        "type": "TASK_ASSIGNED",
        "task": {"id": task_id, "filename": "é.png", "mimeType": "image/png"},
    }
    return message, payload


@pytest.mark.parametrize("size", [0, 1, 90, 40_000, 100_000, 3 * 2**20])
async def test_a_spliced_message_arrives_as_its_json(size: int) -> None:
    message, payload = assignment("t-1", size)
    spliced = splice_for_client(message, payload)

    async def handler(connection: BridgeConnection) -> None:
        await connection.send_messages([spliced])
        await connection.wait_closed()

    async with pair(handler) as client:
        received = await asyncio.wait_for(client.recv(decode=False), 10)

    assert received == encode_for_client(message, payload)
    task = orjson.loads(received)["task"]
    assert task["dataBase64"] == payload.decode()
    assert task["filename"] == "é.png"


async def test_several_messages_in_one_call_arrive_in_order() -> None:
    small = [orjson.dumps({"type": "TASK_COMPLETED", "n": n}) for n in range(50)]
    big_message, big_payload = assignment("t-2", 200_000)
    messages: list[bytes | Spliced] = [
        *small[:25],
        splice_for_client(big_message, memoryview(big_payload)),
        *small[25:],
    ]

    async def handler(connection: BridgeConnection) -> None:
        await connection.send_messages(messages)
        await connection.wait_closed()

    async with pair(handler) as client:
        received = [
            await asyncio.wait_for(client.recv(decode=False), 10)
            for _ in range(len(messages))
        ]

    assert received == [bytes(m) for m in messages]


async def test_empty_messages_arrive_empty() -> None:
    message, _ = assignment("t-3", 0)

    async def handler(connection: BridgeConnection) -> None:
        await connection.send_messages([b"", splice_for_client(message, b""), b""])
        await connection.wait_closed()

    async with pair(handler) as client:
        received = [
            await asyncio.wait_for(client.recv(decode=False), 10) for _ in range(3)
        ]

    assert received == [b"", encode_for_client(message, b""), b""]


async def test_send_messages_after_close_raises_connection_closed() -> None:
    from websockets.exceptions import ConnectionClosed

    outcome: list[BaseException] = []

    async def handler(connection: BridgeConnection) -> None:
        await connection.close()
        try:
            await connection.send_messages([b"{}"])
        except ConnectionClosed as exc:
            outcome.append(exc)

    async with pair(handler) as client:
        await asyncio.wait_for(client.wait_closed(), 10)
    await asyncio.sleep(0.05)
    assert len(outcome) == 1


# Receiving: large frames handed over rather than copied.


@pytest.mark.parametrize("threshold", [bridge_connection.MMAP_THRESHOLD, 100_000])
async def test_large_and_small_messages_arrive_whole_and_in_order(
    threshold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A threshold of 100 kB sends the larger frames through the mapping that
    # frames above glibc's mmap threshold are written into, and websockets'
    # own unmasking of it.
    monkeypatch.setattr(bridge_connection, "MMAP_THRESHOLD", threshold)
    sizes = [3, 70_000, 5, 2**20 + 7, 65_536, 65_535, 0, 4 * 2**20, 1]
    sent = [os.urandom(size // 2).hex().encode() + b"x" * (size % 2) for size in sizes]
    received: list[bytes] = []
    done = asyncio.Event()

    async def handler(connection: BridgeConnection) -> None:
        for _ in sent:
            received.append(await connection.recv(decode=False))
        done.set()
        await connection.wait_closed()

    async with pair(handler) as client:
        # Back to back, so that frames share the server's reads.
        for data in sent:
            await client.send(data, text=True)
        await asyncio.wait_for(done.wait(), 20)

    assert received == sent


# The reader on its own: reads fed in pieces, frames taken with read_exact.


def read_all(reader: Any, sizes: list[int], feed: list[bytes]) -> list[bytes]:
    """Drive read_exact for each size, feeding the pieces as it waits."""
    out = []
    pieces = iter(feed)
    for size in sizes:
        reading = reader.read_exact(size)
        while True:
            try:
                next(reading)
            except StopIteration as done:
                out.append(bytes(done.value))
                break
            reader.feed_data(next(pieces))
    return out


def new_reader() -> Any:
    reader = StreamReader()
    reader.__class__ = _Reader
    return reader


@pytest.mark.parametrize("threshold", [bridge_connection.MMAP_THRESHOLD, 100_000])
@pytest.mark.parametrize("piece", [1000, 65_536, 300_000])
def test_the_reader_returns_each_frame_and_keeps_what_follows(
    threshold: int, piece: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A threshold of 100 kB sends the 250 kB frame down the path for frames
    # above glibc's mmap threshold.
    monkeypatch.setattr(bridge_connection, "MMAP_THRESHOLD", threshold)
    frames = [os.urandom(size) for size in (2, 70_000, 10, 250_000, 65_536, 65_535)]
    stream = b"".join(frames)
    pieces = [stream[i : i + piece] for i in range(0, len(stream), piece)]
    reader = new_reader()
    assert read_all(reader, [len(f) for f in frames], pieces) == frames
    assert reader.buffer == b""


# A 250 kB frame: joined from its reads with the default threshold, written
# into a mapping with a threshold of 100 kB.
BOTH_PATHS = pytest.mark.parametrize(
    "threshold", [bridge_connection.MMAP_THRESHOLD, 100_000]
)


def start_large_read(threshold: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A reader waiting in read_exact for a 250 kB frame."""
    monkeypatch.setattr(bridge_connection, "MMAP_THRESHOLD", threshold)
    reader = new_reader()
    reading = reader.read_exact(250_000)
    next(reading)
    return reader, reading


@BOTH_PATHS
def test_the_reader_reports_a_stream_that_ends_inside_a_large_frame(
    threshold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, reading = start_large_read(threshold, monkeypatch)
    reader.feed_data(b"x" * 1000)
    next(reading)
    reader.feed_eof()
    with pytest.raises(EOFError, match="after 1000 bytes"):
        next(reading)


@BOTH_PATHS
def test_the_reader_does_not_keep_a_buffer_its_owner_may_reuse(
    threshold: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, reading = start_large_read(threshold, monkeypatch)
    data = bytearray(b"y" * 250_001)
    reader.feed_data(data)
    data[:] = b"z" * 250_001
    with pytest.raises(StopIteration) as done:
        next(reading)
    assert bytes(done.value.value) == b"y" * 250_000
    assert reader.buffer == b"y"


def track_mappings(monkeypatch: pytest.MonkeyPatch) -> list[mmap.mmap]:
    """Frames above 100 kB go into mappings; the list gets each one made."""
    monkeypatch.setattr(bridge_connection, "MMAP_THRESHOLD", 100_000)
    made: list[mmap.mmap] = []
    original = bridge_connection._map_anonymous

    def tracked(size: int) -> mmap.mmap | None:
        mapping = original(size)
        if mapping is not None:
            made.append(mapping)
        return mapping

    monkeypatch.setattr(bridge_connection, "_map_anonymous", tracked)
    return made


def test_a_frame_cut_short_is_unmapped_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Not when a garbage collection comes round: websockets keeps the error,
    # and its traceback the reader's frame, in a cycle.
    made = track_mappings(monkeypatch)
    ended, abandoned = new_reader(), new_reader()

    ending = ended.read_exact(250_000)
    next(ending)
    ended.feed_data(b"x" * 1000)
    ended.feed_eof()
    with pytest.raises(EOFError):
        next(ending)
    abandoning = abandoned.read_exact(250_000)
    next(abandoning)
    abandoning.close()

    assert len(made) == 2
    assert all(mapping.closed for mapping in made)


def test_a_frame_that_cannot_be_mapped_is_read_into_the_buffer(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> mmap.mmap:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(bridge_connection, "MMAP_THRESHOLD", 100_000)
    monkeypatch.setattr(mmap, "mmap", refuse)
    frame = os.urandom(250_000)

    received = read_all(new_reader(), [len(frame)], [frame[:1000], frame[1000:]])

    assert received == [frame]
    assert "cannot map 250000 bytes" in caplog.text
