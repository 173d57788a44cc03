"""
Tests of :mod:`core.wire`: the frames between linkup-core and its bridges.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from core.errors import LinkupError, ProtocolError
from core.wire import (
    PROTOCOL,
    Command,
    Envelope,
    decode,
    deliveries,
    delivery_batch,
    encode,
)

HEADER = {"client": 7, "message": {"type": "TASK_COMPLETED", "taskId": "t-1"}}


def frames_of(command: Command, header: Any = None) -> list[bytes]:
    """Frames of a message whose header is ``header`` as raw JSON."""
    return [PROTOCOL, bytes([command]), orjson.dumps(header)]


# Encoding.


def test_encode_lays_out_protocol_command_header_payloads() -> None:
    frames = encode(Command.DELIVER, {"client": 3}, [b"one", b"two"])
    assert frames == [
        PROTOCOL,
        bytes([Command.DELIVER]),
        b'{"client":3}',
        b"one",
        b"two",
    ]


def test_encode_without_header_sends_an_empty_object() -> None:
    assert encode(Command.HEARTBEAT) == [PROTOCOL, bytes([Command.HEARTBEAT]), b"{}"]


def test_encode_keeps_payload_objects_as_they_are() -> None:
    """Payloads are passed through untouched, so ZeroMQ can send them without a copy."""
    first, second = bytearray(b"aGVsbG8="), memoryview(b"d29ybGQ=")
    frames = encode(Command.CLIENT_MESSAGE, HEADER, [first, second])
    assert frames[3] is first
    assert frames[4] is second


def test_encode_never_puts_payloads_in_the_header() -> None:
    frames = encode(Command.CLIENT_MESSAGE, HEADER, [b"SECRET-BASE64"])
    assert b"SECRET-BASE64" not in frames[2]


# Round trips.


@pytest.mark.parametrize("command", list(Command))
def test_every_command_round_trips(command: Command) -> None:
    envelope = decode(encode(command, HEADER))
    assert envelope.command is command
    assert envelope.header == HEADER
    assert list(envelope.payloads) == []


def test_round_trip_keeps_payloads_separate_and_in_order() -> None:
    payloads = [b"first", b"", b"third" * 1000, b"\x00\xff"]
    envelope = decode(encode(Command.CLIENT_MESSAGE, HEADER, payloads))
    assert envelope.command is Command.CLIENT_MESSAGE
    assert envelope.header == HEADER
    assert list(envelope.payloads) == payloads


def test_decode_hands_back_the_payload_frames_themselves() -> None:
    payload = bytearray(b"aGVsbG8=")
    envelope = decode(encode(Command.CLIENT_MESSAGE, HEADER, [payload]))
    assert envelope.payloads[0] is payload


def test_round_trip_keeps_unicode_and_nesting() -> None:
    header = {"message": {"type": "TASK_FAILED", "error": "上传超时", "n": [1, 2.5]}}
    assert decode(encode(Command.DELIVER, header)).header == header


def test_decode_accepts_buffer_frames() -> None:
    """zmq.Frame is not bytes: any buffer must do."""
    frames = [memoryview(f) for f in encode(Command.STATS_REQUEST, {"request": 4})]
    envelope = decode(frames)
    assert envelope.command is Command.STATS_REQUEST
    assert envelope.header == {"request": 4}


def test_decode_empty_header_object() -> None:
    envelope = decode(encode(Command.BYE))
    assert envelope.command is Command.BYE
    assert envelope.header == {}


def test_command_numbers_are_stable() -> None:
    """The bytes on the link are a contract between core and bridge."""
    assert {c.name: c.value for c in Command} == {
        "HELLO": 1,
        "WELCOME": 2,
        "HEARTBEAT": 3,
        "CLIENT_MESSAGE": 4,
        "CLIENT_GONE": 5,
        "DELIVER": 6,
        "BROADCAST": 7,
        "CLOSE_CLIENT": 8,
        "STATS_REQUEST": 9,
        "STATS_REPLY": 10,
        "RESET": 11,
        "BYE": 12,
        "WATCH": 13,
        "VIEW": 14,
        "DELIVER_MANY": 15,
    }
    assert PROTOCOL == b"LINKUP1"


# Several deliveries in one message.


def test_a_batch_of_deliveries_comes_apart_as_the_deliveries_in_order() -> None:
    items = [
        ({"client": 1, "message": {"type": "TASK_ASSIGNED"}}, [b"first"]),
        ({"client": 2, "message": {"type": "TASK_COMPLETED"}, "result": ["s", 0]}, []),
        ({"client": 1, "message": {"type": "TASK_ASSIGNED"}}, [b"second"]),
    ]
    header, payloads = delivery_batch(items)

    unpacked = deliveries(decode(encode(Command.DELIVER_MANY, header, payloads)))

    assert [envelope.command for envelope in unpacked] == [Command.DELIVER] * 3
    assert [envelope.header["client"] for envelope in unpacked] == [1, 2, 1]
    assert unpacked[1].header["result"] == ["s", 0]
    assert [list(map(bytes, envelope.payloads)) for envelope in unpacked] == [
        [b"first"],
        [],
        [b"second"],
    ]


def test_a_single_deliver_is_its_own_delivery() -> None:
    envelope = decode(encode(Command.DELIVER, HEADER, [b"data"]))
    assert deliveries(envelope) == [envelope]


def test_a_delivery_carries_at_most_one_payload() -> None:
    with pytest.raises(ValueError, match="at most one payload"):
        delivery_batch([(HEADER, [b"one", b"two"])])


@pytest.mark.parametrize(
    ("header", "payloads", "complaint"),
    [
        ({}, [], "list of deliveries"),
        ({"deliveries": [1, 2]}, [], "list of deliveries"),
        ({"deliveries": [{"payload": True}]}, [], "names 1 payloads and carries 0"),
        ({"deliveries": [{}]}, [b"stray"], "names 0 payloads and carries 1"),
    ],
)
def test_a_batch_whose_entries_and_payloads_disagree_is_refused(
    header: dict[str, Any], payloads: list[bytes], complaint: str
) -> None:
    envelope = decode(encode(Command.DELIVER_MANY, header, payloads))
    with pytest.raises(ProtocolError, match=complaint):
        deliveries(envelope)


def test_only_deliveries_come_apart() -> None:
    with pytest.raises(ProtocolError, match="HEARTBEAT is not a delivery"):
        deliveries(decode(encode(Command.HEARTBEAT)))


# Repr.


def test_repr_shows_payload_count_and_size_never_payload_bytes() -> None:
    secret = b"U0VDUkVULURBVEE="
    envelope = decode(encode(Command.CLIENT_MESSAGE, {"client": 1}, [secret, b"xy"]))
    text = repr(envelope)
    assert "SECRET" not in text
    assert secret.decode() not in text
    assert "CLIENT_MESSAGE" in text
    assert "payloads=2, payload_bytes=18" in text


def test_repr_of_an_envelope_without_payloads() -> None:
    envelope = Envelope(Command.HEARTBEAT)
    assert repr(envelope) == "Envelope(HEARTBEAT, {}, payloads=0, payload_bytes=0)"


# Refusals.


def test_decode_errors_are_linkup_errors() -> None:
    with pytest.raises(LinkupError) as info:
        decode([])
    assert info.value.code == "protocol_error"


@pytest.mark.parametrize("count", [0, 1, 2])
def test_too_few_frames_are_refused(count: int) -> None:
    frames = encode(Command.HEARTBEAT)[:count]
    with pytest.raises(ProtocolError, match=f"{count} frames"):
        decode(frames)


@pytest.mark.parametrize("tag", [b"LINKUP2", b"LINKUP", b"", b"linkup1", b"X" * 100])
def test_wrong_protocol_tag_is_refused(tag: bytes) -> None:
    frames = [tag, *encode(Command.HEARTBEAT)[1:]]
    with pytest.raises(ProtocolError, match="link protocol"):
        decode(frames)


@pytest.mark.parametrize(
    "command_frame",
    [b"\x00", b"\x10", b"\xff", b"", b"\x01\x01", b"HELLO"],
)
def test_unknown_command_is_refused(command_frame: bytes) -> None:
    frames = [PROTOCOL, command_frame, b"{}"]
    with pytest.raises(ProtocolError, match="unknown link command"):
        decode(frames)


@pytest.mark.parametrize("header", [b"", b"{", b"not json", b"\xff\xfe", b"{'a': 1}"])
def test_header_that_is_not_json_is_refused(header: bytes) -> None:
    frames = [PROTOCOL, bytes([Command.HELLO]), header]
    with pytest.raises(ProtocolError, match="not JSON"):
        decode(frames)


@pytest.mark.parametrize("header", [[], [1, 2], "text", 3, 1.5, None, True])
def test_header_that_is_not_an_object_is_refused(header: Any) -> None:
    with pytest.raises(ProtocolError, match="not a JSON object"):
        decode(frames_of(Command.HELLO, header))


def test_refusal_does_not_echo_a_long_protocol_tag() -> None:
    """The error names at most the first bytes of a bad tag."""
    frames = [b"A" * 10_000, bytes([Command.HELLO]), b"{}"]
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert len(str(info.value)) < 200
