"""
The frame format of the link between linkup-core and its bridges.

Every ZeroMQ message on the link is a multipart message::

    PROTOCOL | COMMAND | HEADER | PAYLOAD ...

* ``PROTOCOL`` is the version tag ``b"LINKUP1"``. A peer that sees another tag
  refuses the message: the two ends must be upgraded together.
* ``COMMAND`` is one byte, one of :class:`Command`.
* ``HEADER`` is a JSON object (UTF-8, encoded with orjson).
* ``PAYLOAD`` frames carry file data, each in its own frame: the body of the
  plugin's ``dataBase64`` JSON string, between its quotes, escaped as JSON.
  For Base64, which needs no escapes, that is the plugin's text itself, cut
  from the message it sent; a string that needed escapes was parsed and is
  re-escaped (an escaped slash arrives as a plain one). Never inside the JSON
  header, never Base64-decoded. For ``SUBMIT_TASKS`` the i-th payload belongs
  to the i-th entry of ``tasks``; for ``TASK_ASSIGNED`` the single payload is
  the task's; for ``DELIVER_MANY``, the payloads of the deliveries that have
  one, in order.

The core's ROUTER socket sees one more frame in front, the bridge's routing
id; :mod:`core.server` strips it before calling :func:`decode`.

This module is pure: no sockets, no clock. The bridge imports it as well.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from core.errors import ProtocolError

__all__ = [
    "PROTOCOL",
    "Command",
    "Envelope",
    "Payload",
    "decode",
    "deliveries",
    "delivery_batch",
    "encode",
]

# Bumped whenever a command or header field changes meaning.
PROTOCOL = b"LINKUP1"

# Anything with the buffer protocol and a length that ZeroMQ can send without a
# copy: bytes in the bridge, zmq.Frame in the core. Typed loosely because
# zmq.Frame declares neither to the type checker.
Payload = Any


class Command(enum.IntEnum):
    """
    One-byte commands of the link. The direction is part of the contract.

    """

    #: bridge → core: ``{"bridge": id, "heartbeat": seconds, ...}``; (re)join.
    HELLO = 1
    #: core → bridge: ``{"core": id, "heartbeat": seconds}``; answer to HELLO.
    WELCOME = 2
    #: both ways: ``{}``; sent when the link has been quiet for an interval.
    HEARTBEAT = 3
    #: bridge → core: ``{"client": n, "message": {...}}`` + payloads.
    CLIENT_MESSAGE = 4
    #: bridge → core: ``{"client": n}``; the WebSocket closed.
    CLIENT_GONE = 5
    #: core → bridge: ``{"client": n, "message": {...}}`` + payloads.
    DELIVER = 6
    #: core → bridge: ``{"message": {...}}``; send to every client.
    BROADCAST = 7
    #: core → bridge: ``{"client": n, "code": int, "reason": str}``.
    CLOSE_CLIENT = 8
    #: bridge → core: ``{"request": n}``; ask for the statistics.
    STATS_REQUEST = 9
    #: core → bridge: ``{"request": n, "stats": {...}}``.
    STATS_REPLY = 10
    #: core → bridge: ``{"reason": str}``; the core does not know this bridge
    #: (it restarted, or declared the bridge dead). The bridge must close its
    #: clients, whose state the core no longer has, and send HELLO again.
    RESET = 11
    #: bridge → core: ``{}``; the bridge is shutting down.
    BYE = 12
    #: bridge → core: ``{"watching": bool}``; whether status pages are open
    #: on the bridge. Sent again after every (re)join while they are.
    WATCH = 13
    #: core → bridge: ``{"view": {...}}``; what the status page shows, sent to
    #: watching bridges when it changes (docs/metrics.md).
    VIEW = 14
    #: core → bridge: ``{"deliveries": [...]}``, each entry a DELIVER's header
    #: with ``"payload": true`` if it has one, + those payloads in order.
    #: Several DELIVERs in one message (see :func:`deliveries`), sent only to
    #: a bridge whose HELLO said ``"deliverMany": true``.
    DELIVER_MANY = 15


@dataclass(slots=True)
class Envelope:
    """
    One decoded link message.

    """

    command: Command
    header: dict[str, Any] = field(default_factory=dict)
    payloads: Sequence[Payload] = ()

    def __repr__(self) -> str:
        # Never show payload contents, only their sizes.
        payload_bytes = sum(len(payload) for payload in self.payloads)
        return (
            f"Envelope({self.command.name}, {self.header!r}, "
            f"payloads={len(self.payloads)}, payload_bytes={payload_bytes})"
        )


_COMMAND_FRAMES = {command: bytes([command]) for command in Command}
_COMMANDS = {frame: command for command, frame in _COMMAND_FRAMES.items()}


def encode(
    command: Command,
    header: dict[str, Any] | None = None,
    payloads: Sequence[Payload] = (),
) -> list[Payload]:
    """
    Build the frames of one link message, ready for ``send_multipart``.

    """
    return [
        PROTOCOL,
        _COMMAND_FRAMES[command],
        orjson.dumps(header or {}),
        *payloads,
    ]


def decode(frames: Sequence[Payload]) -> Envelope:
    """
    Parse the frames of one link message.

    Raises:
        ProtocolError: The frames are not a link message of this version.

    """
    if len(frames) < 3:
        raise ProtocolError(f"link message has {len(frames)} frames, expected 3+")

    protocol = bytes(frames[0])
    if protocol != PROTOCOL:
        raise ProtocolError(
            f"link protocol {protocol[:16]!r} is not {PROTOCOL!r}: "
            "core and bridge must run the same linkup version"
        )

    command_frame = bytes(frames[1])
    command = _COMMANDS.get(command_frame)
    if command is None:
        raise ProtocolError(f"unknown link command {command_frame[:8]!r}")

    try:
        header = orjson.loads(memoryview(frames[2]))
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"link header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError("link header is not a JSON object")

    return Envelope(command, header, frames[3:])


def delivery_batch(
    items: Sequence[tuple[dict[str, Any], Sequence[Payload]]],
) -> tuple[dict[str, Any], list[Payload]]:
    """
    The header and payloads of one DELIVER_MANY carrying ``items``, each a
    DELIVER's header and its payloads (none or one), in the order the bridge
    is to handle them.

    """
    headers = []
    payloads: list[Payload] = []
    for header, item_payloads in items:
        if len(item_payloads) > 1:
            raise ValueError("a delivery carries at most one payload")
        if item_payloads:
            header = {**header, "payload": True}
            payloads.append(item_payloads[0])
        headers.append(header)
    return {"deliveries": headers}, payloads


def deliveries(envelope: Envelope) -> list[Envelope]:
    """
    The DELIVERs in a DELIVER (itself) or a DELIVER_MANY (one per entry, each
    with its payload), in order.

    Raises:
        ProtocolError: A DELIVER_MANY whose entries and payloads disagree.

    """
    if envelope.command is Command.DELIVER:
        return [envelope]
    if envelope.command is not Command.DELIVER_MANY:
        raise ProtocolError(f"{envelope.command.name} is not a delivery")
    entries = envelope.header.get("deliveries")
    if not isinstance(entries, list) or not all(
        isinstance(entry, dict) for entry in entries
    ):
        raise ProtocolError("DELIVER_MANY without a list of deliveries")
    wanted = sum(1 for entry in entries if entry.get("payload") is True)
    if wanted != len(envelope.payloads):
        raise ProtocolError(
            f"DELIVER_MANY names {wanted} payloads and carries {len(envelope.payloads)}"
        )
    payloads = iter(envelope.payloads)
    return [
        Envelope(
            Command.DELIVER,
            entry,
            (next(payloads),) if entry.get("payload") is True else (),
        )
        for entry in entries
    ]
