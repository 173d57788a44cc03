"""
Plugin JSON messages to link messages and back. Pure: no sockets.

Inbound, :func:`parse_client_message` checks a plugin message against the
schema of its ``type`` (msgspec names the offending field in its error) and
splits it into a small JSON header for the core and one payload per file: the
text of ``dataBase64`` as UTF-8 bytes, which no one decodes or re-encodes
until the worker's plugin does. Large batches take a shortcut that never
parses the payloads at all (:mod:`bridge.payloads`, :func:`parse_cut_message`).

Outbound, :func:`encode_for_client` turns a message from the core into the
JSON text the plugin reads, splicing a ``TASK_ASSIGNED`` payload into the
message's bytes rather than building a string around it; the bridge sends
the pieces one after the other without joining them (:class:`Spliced`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import orjson

from bridge.payloads import CutMessage
from core.errors import InvalidField, InvalidJson, LinkupError, UnknownType
from core.wire import Payload

__all__ = [
    "Inbound",
    "Spliced",
    "encode_error",
    "encode_for_client",
    "parse_client_message",
    "parse_cut_message",
    "splice_for_client",
]

# The plugin is JavaScript, whose integers are exact up to 2**53 - 1; the
# bound also keeps every count the core stores within SQLite's 64 bits.
MAX_SAFE_INTEGER = 2**53 - 1
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_SAFE_INTEGER)]


class _PluginTask(msgspec.Struct):
    filename: str
    mimeType: str
    dataBase64: str
    size: Count


class _SubmitTasks(msgspec.Struct):
    sessionId: str
    tasks: list[_PluginTask]


class _TaskCompleted(msgspec.Struct):
    taskId: str
    resultUrl: str


class _TaskFailed(msgspec.Struct):
    taskId: str
    # JavaScript drops `error: undefined` from its JSON; refusing the report
    # would leave the task with the worker for good.
    error: str = "upload failed (the worker gave no reason)"


class _TaskWaiting(msgspec.Struct):
    taskId: str
    # Kept as sent (int or float): they go back out to the master unchanged.
    waitTime: int | float
    waitStart: int | float
    # The core uses its own copy of the filename; the plugin's is optional.
    filename: str = ""


class _NoFields(msgspec.Struct):
    pass


# Additions of linkup's own; the plugin never sends them.


class _SessionRef(msgspec.Struct):
    sessionId: str


class _TaskRef(msgspec.Struct):
    taskId: str


class _ResumeSession(msgspec.Struct):
    sessionId: str
    #: How many of the session's results the client already has.
    after: Count = 0


# Every type a client may send, with the schema its fields must match.
# Unknown extra fields are ignored, so newer plugins stay welcome.
_SCHEMAS: dict[str, type[msgspec.Struct]] = {
    "WORKER_REGISTER": _NoFields,
    "WORKER_HEARTBEAT": _NoFields,
    "CREATE_SESSION": _NoFields,
    "GET_STATS": _NoFields,
    "SUBMIT_TASKS": _SubmitTasks,
    "TASK_COMPLETED": _TaskCompleted,
    "TASK_FAILED": _TaskFailed,
    "TASK_WAITING": _TaskWaiting,
    "CANCEL_SESSION": _SessionRef,
    "CANCEL_TASK": _TaskRef,
    "RESUME_SESSION": _ResumeSession,
}

KNOWN_TYPES = frozenset(_SCHEMAS)

#: What the core sends clients (docs/protocol.md); for metrics' labels.
OUTBOUND_TYPES = frozenset(
    {
        "WORKER_REGISTERED",
        "SESSION_CREATED",
        "TASKS_SUBMITTED",
        "TASK_ASSIGNED",
        "TASK_COMPLETED",
        "TASK_FAILED",
        "TASK_WAITING",
        "SESSION_COMPLETED",
        "STATS_UPDATE",
        "ERROR",
        "TASK_CANCELLED",
        "SESSION_CANCELLED",
        "SESSION_RESUMED",
    }
)

# Bytes that a JSON string cannot hold as they are. Base64 never has them, so
# payloads can be spliced into JSON output verbatim; anything else is escaped
# once, on the way in.
_JSON_UNSAFE = b'"\\' + bytes(range(0x20))


@dataclass(slots=True)
class Inbound:
    """
    A validated plugin message, ready for the link.

    """

    type: str
    header: dict[str, Any]
    #: File data as bytes, or as views of the received message.
    payloads: list[Payload] = field(default_factory=list)
    #: Size of the message as received, in bytes.
    size: int = 0

    def __repr__(self) -> str:
        payload_bytes = sum(len(payload) for payload in self.payloads)
        return (
            f"Inbound({self.type}, size={self.size}, "
            f"payloads={len(self.payloads)}, payload_bytes={payload_bytes})"
        )


def parse_client_message(raw: bytes) -> Inbound:
    """
    Validate one message from a plugin and split off its payloads.

    Raises:
        InvalidJson: The message is not a JSON object.
        UnknownType: ``type`` is not a message clients may send.
        InvalidField: A field is missing or has the wrong type.

    """
    size = len(raw)
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"message is not valid JSON: {exc}") from None

    message_type, message = _validate(document)
    del document
    if isinstance(message, _SubmitTasks):
        return _split_submit_tasks(message, size)
    header = msgspec.structs.asdict(message)
    header["type"] = message_type
    return Inbound(message_type, header, size=size)


def parse_cut_message(cut: CutMessage, size: int) -> Inbound | None:
    """
    Validate a ``SUBMIT_TASKS`` whose payloads :func:`cut_payloads` cut out.

    Returns None, and the caller must use :func:`parse_client_message`, if
    the skeleton is not valid JSON or the placeholders are not exactly the
    tasks' ``dataBase64`` values in order: then only a full parse can say
    what the message means.

    Raises:
        UnknownType, InvalidField: As :func:`parse_client_message`.

    """
    try:
        document = orjson.loads(cut.skeleton)
    except orjson.JSONDecodeError:
        return None
    _, message = _validate(document)
    if not isinstance(message, _SubmitTasks):
        return None
    if [task.dataBase64 for task in message.tasks] != cut.placeholders:
        return None

    return _submit_tasks_inbound(message, list(cut.payloads), size)


def _validate(document: Any) -> tuple[str, msgspec.Struct]:
    if not isinstance(document, dict):
        raise InvalidJson("message is not a JSON object")
    message_type = document.get("type")
    if not isinstance(message_type, str):
        raise InvalidField("message has no string field `type`")
    schema = _SCHEMAS.get(message_type)
    if schema is None:
        raise UnknownType(message_type)
    try:
        return message_type, msgspec.convert(document, schema)
    except msgspec.ValidationError as exc:
        raise InvalidField(f"{message_type}: {exc}") from None


def _split_submit_tasks(message: _SubmitTasks, size: int) -> Inbound:
    payloads: list[Payload] = []
    for task in message.tasks:
        payloads.append(_json_string_body(task.dataBase64))
        # Let go of the text as soon as its bytes exist: one copy at a time.
        task.dataBase64 = ""
    return _submit_tasks_inbound(message, payloads, size)


def _submit_tasks_inbound(
    message: _SubmitTasks, payloads: list[Payload], size: int
) -> Inbound:
    # The header the core reads: each task without its data, which travels
    # as the payload of the same index.
    tasks = [
        {"filename": task.filename, "mimeType": task.mimeType, "size": task.size}
        for task in message.tasks
    ]
    header = {"type": "SUBMIT_TASKS", "sessionId": message.sessionId, "tasks": tasks}
    return Inbound("SUBMIT_TASKS", header, payloads, size)


def _json_string_body(text: str) -> bytes:
    # The bytes that go between the quotes of a JSON string holding `text`.
    # orjson has already refused lone surrogates, so encoding cannot fail.
    body = text.encode()
    if body.translate(None, _JSON_UNSAFE) is body:
        return body
    return orjson.dumps(text)[1:-1]


@dataclass(frozen=True, slots=True)
class Spliced:
    """
    A message for a plugin as pieces whose concatenation is its JSON text:
    the JSON before a payload, the payload, and the JSON after it. The
    bridge writes them back to back as one WebSocket message
    (``BridgeConnection.send_messages``) and never joins them, so a file is
    not copied on its way out.

    """

    #: Bytes-like objects: bytes, or a memoryview of the core's frame.
    pieces: tuple[Any, ...]
    #: Their total length in bytes.
    size: int

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)


def splice_for_client(message: dict[str, Any], payload: Any) -> Spliced:
    """
    The JSON text of a message from the core with its payload spliced into
    ``message["task"]["dataBase64"]``, as pieces.

    ``payload`` is the JSON string body made by :func:`parse_client_message`
    or cut by ``bridge.payloads``, as any bytes-like object (a ``zmq.Frame``
    from the link): the last piece but one is a view of it, not a copy.

    """
    others = {key: value for key, value in message.items() if key != "task"}
    task = orjson.dumps(message["task"])
    # One piece before the payload: the message without its task, then the
    # task without its closing brace, then the start of dataBase64.
    head = b"".join(
        (
            orjson.dumps(others)[:-1],
            b',"task":' if others else b'"task":',
            task[:-1],
            b',"dataBase64":"' if len(task) > 2 else b'"dataBase64":"',
        )
    )
    body = memoryview(payload)
    return Spliced((head, body, b'"}}'), len(head) + body.nbytes + 3)


def encode_for_client(message: dict[str, Any], payload: Any = None) -> bytes:
    """
    The JSON text of a message from the core, with its payload spliced in.

    A payload belongs in ``message["task"]["dataBase64"]``; it is the JSON
    string body made by :func:`parse_client_message`. The bridge itself
    sends a message with a payload as :func:`splice_for_client` makes it;
    this is the same text in one piece.

    """
    if payload is None:
        return orjson.dumps(message)
    return bytes(splice_for_client(message, payload))


def encode_error(error: LinkupError) -> bytes:
    """
    The ``ERROR`` message for a refused request.

    """
    return orjson.dumps({"type": "ERROR", "code": error.code, "message": str(error)})
