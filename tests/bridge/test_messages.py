"""
Tests of :mod:`bridge.messages`: plugin JSON in, link headers and payloads out,
and core messages back to plugin JSON. Pure, no sockets.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from bridge.messages import (
    KNOWN_TYPES,
    encode_error,
    encode_for_client,
    parse_client_message,
)
from core.errors import (
    InternalError,
    InvalidField,
    InvalidJson,
    LinkupError,
    TaskNotHeld,
    Unavailable,
    UnknownSession,
    UnknownType,
)


def raw_of(message: Any) -> bytes:
    return json.dumps(message, ensure_ascii=False).encode()


def plugin_task(**fields: Any) -> dict[str, Any]:
    return {
        "filename": "photo.jpg",
        "mimeType": "image/jpeg",
        "dataBase64": "QUJD",
        "size": 3,
        **fields,
    }


def submit(*tasks: dict[str, Any]) -> dict[str, Any]:
    return {"type": "SUBMIT_TASKS", "sessionId": "s-1", "tasks": list(tasks)}


# Every client message, as the plugin sends it, and the header the core reads
# (core/server.py, Server._dispatch).

CLIENT_MESSAGES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"type": "WORKER_REGISTER"}, {"type": "WORKER_REGISTER"}),
    ({"type": "WORKER_HEARTBEAT"}, {"type": "WORKER_HEARTBEAT"}),
    ({"type": "CREATE_SESSION"}, {"type": "CREATE_SESSION"}),
    ({"type": "GET_STATS"}, {"type": "GET_STATS"}),
    (
        {"type": "TASK_COMPLETED", "taskId": "t-1", "resultUrl": "https://img/x.jpg"},
        {"type": "TASK_COMPLETED", "taskId": "t-1", "resultUrl": "https://img/x.jpg"},
    ),
    (
        {"type": "TASK_FAILED", "taskId": "t-1", "error": "HTTP 500"},
        {"type": "TASK_FAILED", "taskId": "t-1", "error": "HTTP 500"},
    ),
    (
        {
            "type": "TASK_WAITING",
            "taskId": "t-1",
            "filename": "a.jpg",
            "waitTime": 30,
            "waitStart": 1_700_000_000_000,
        },
        {
            "type": "TASK_WAITING",
            "taskId": "t-1",
            "filename": "a.jpg",
            "waitTime": 30,
            "waitStart": 1_700_000_000_000,
        },
    ),
    (
        submit(plugin_task(), plugin_task(filename="b.png", mimeType="image/png")),
        {
            "type": "SUBMIT_TASKS",
            "sessionId": "s-1",
            "tasks": [
                {"filename": "photo.jpg", "mimeType": "image/jpeg", "size": 3},
                {"filename": "b.png", "mimeType": "image/png", "size": 3},
            ],
        },
    ),
    # linkup's own additions.
    (
        {"type": "CANCEL_SESSION", "sessionId": "s-1"},
        {"type": "CANCEL_SESSION", "sessionId": "s-1"},
    ),
    (
        {"type": "CANCEL_TASK", "taskId": "t-1"},
        {"type": "CANCEL_TASK", "taskId": "t-1"},
    ),
    (
        {"type": "RESUME_SESSION", "sessionId": "s-1"},
        {"type": "RESUME_SESSION", "sessionId": "s-1", "after": 0},
    ),
    (
        {"type": "RESUME_SESSION", "sessionId": "s-1", "after": 7},
        {"type": "RESUME_SESSION", "sessionId": "s-1", "after": 7},
    ),
]


def test_every_client_type_is_covered() -> None:
    assert {message["type"] for message, _ in CLIENT_MESSAGES} == KNOWN_TYPES


@pytest.mark.parametrize(
    ("message", "header"), CLIENT_MESSAGES, ids=[m["type"] for m, _ in CLIENT_MESSAGES]
)
def test_client_message_parses_to_the_header_the_core_reads(
    message: dict[str, Any], header: dict[str, Any]
) -> None:
    raw = raw_of(message)

    inbound = parse_client_message(raw)

    assert inbound.type == message["type"]
    assert inbound.header == header
    assert inbound.size == len(raw)
    if message["type"] == "SUBMIT_TASKS":
        assert [bytes(p) for p in inbound.payloads] == [b"QUJD", b"QUJD"]
    else:
        assert inbound.payloads == []


@pytest.mark.parametrize(
    ("message", "header"), CLIENT_MESSAGES, ids=[m["type"] for m, _ in CLIENT_MESSAGES]
)
def test_unknown_extra_fields_are_ignored(
    message: dict[str, Any], header: dict[str, Any]
) -> None:
    extended = {
        **message,
        "pluginVersion": "2.0",
        "extra": {"nested": [1, 2, {"dataBase64": "QQ=="}]},
        "workerId": None,
    }
    if "tasks" in extended:
        extended["tasks"] = [
            {**t, "lastModified": 17, "id": "x"} for t in message["tasks"]
        ]

    inbound = parse_client_message(raw_of(extended))

    assert inbound.header == header
    assert len(inbound.payloads) == len(message.get("tasks", []))


def test_header_is_json_serialisable_for_the_link() -> None:
    for message, header in CLIENT_MESSAGES:
        assert (
            orjson.loads(orjson.dumps(parse_client_message(raw_of(message)).header))
            == header
        )


@pytest.mark.parametrize(
    ("wait_time", "wait_start"),
    [(30, 1_700_000_000_000), (1.5, 1_700_000_000_000.25), (0, 0.0), (2.0, 7)],
)
def test_task_waiting_keeps_int_and_float_as_sent(
    wait_time: float, wait_start: float
) -> None:
    raw = raw_of(
        {
            "type": "TASK_WAITING",
            "taskId": "t",
            "waitTime": wait_time,
            "waitStart": wait_start,
        }
    )

    header = parse_client_message(raw).header

    assert header["waitTime"] == wait_time
    assert type(header["waitTime"]) is type(wait_time)
    assert header["waitStart"] == wait_start
    assert type(header["waitStart"]) is type(wait_start)
    # The filename is optional there; the core keeps its own copy.
    assert header["filename"] == ""
    assert orjson.dumps(header["waitTime"]) == orjson.dumps(wait_time)


# Errors.


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"nope", b'{"type": "GET_STATS",}', b"\xff\xfe", b'{"a":1} x'],
)
def test_invalid_json(raw: bytes) -> None:
    with pytest.raises(InvalidJson) as info:
        parse_client_message(raw)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize(
    "raw", [b"[]", b'[{"type":"GET_STATS"}]', b"1", b'"x"', b"null"]
)
def test_json_that_is_not_an_object(raw: bytes) -> None:
    with pytest.raises(InvalidJson, match="not a JSON object") as info:
        parse_client_message(raw)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize(
    "message",
    [{}, {"taskId": "t"}, {"type": None}, {"type": 5}, {"type": ["GET_STATS"]}],
)
def test_missing_or_non_string_type(message: dict[str, Any]) -> None:
    with pytest.raises(InvalidField, match="type") as info:
        parse_client_message(raw_of(message))
    assert info.value.code == "invalid_field"


@pytest.mark.parametrize(
    "message_type",
    ["", "get_stats", "TASK_ASSIGNED", "ERROR", "SESSION_CREATED", "HELLO"],
)
def test_unknown_type(message_type: str) -> None:
    with pytest.raises(UnknownType) as info:
        parse_client_message(raw_of({"type": message_type}))
    assert info.value.code == "unknown_type"
    assert info.value.message_type == message_type


@pytest.mark.parametrize(
    ("message", "path"),
    [
        ({"type": "SUBMIT_TASKS", "tasks": []}, "sessionId"),
        ({"type": "SUBMIT_TASKS", "sessionId": "s"}, "tasks"),
        ({"type": "SUBMIT_TASKS", "sessionId": 1, "tasks": []}, "sessionId"),
        ({"type": "SUBMIT_TASKS", "sessionId": "s", "tasks": {}}, "tasks"),
        ({"type": "SUBMIT_TASKS", "sessionId": "s", "tasks": [1]}, "tasks[0]"),
        (submit(plugin_task(size=-1)), "tasks[0].size"),
        # Beyond JavaScript's exact integers, and what SQLite can store.
        (submit(plugin_task(size=2**53)), "tasks[0].size"),
        (submit(plugin_task(size=2**63)), "tasks[0].size"),
        ({"type": "RESUME_SESSION", "sessionId": "s", "after": -1}, "after"),
        ({"type": "RESUME_SESSION", "sessionId": "s", "after": 2**53}, "after"),
        (submit(plugin_task(size=True)), "tasks[0].size"),
        (submit(plugin_task(size=False)), "tasks[0].size"),
        (submit(plugin_task(size=1.5)), "tasks[0].size"),
        (submit(plugin_task(size="3")), "tasks[0].size"),
        (submit(plugin_task(), plugin_task(filename=None)), "tasks[1].filename"),
        (submit(plugin_task(mimeType=7)), "tasks[0].mimeType"),
        (submit(plugin_task(dataBase64=None)), "tasks[0].dataBase64"),
        (submit(plugin_task(dataBase64=["QQ=="])), "tasks[0].dataBase64"),
        (
            submit(plugin_task(), {"mimeType": "m", "dataBase64": "", "size": 0}),
            "filename",
        ),
        ({"type": "TASK_COMPLETED", "taskId": "t"}, "resultUrl"),
        ({"type": "TASK_COMPLETED", "taskId": 1, "resultUrl": "u"}, "taskId"),
        ({"type": "TASK_FAILED", "taskId": "t", "error": {"m": 1}}, "error"),
        ({"type": "TASK_FAILED", "error": "e"}, "taskId"),
        (
            {"type": "TASK_WAITING", "taskId": "t", "waitTime": True, "waitStart": 1},
            "waitTime",
        ),
        (
            {"type": "TASK_WAITING", "taskId": "t", "waitTime": 1, "waitStart": "1"},
            "waitStart",
        ),
        ({"type": "TASK_WAITING", "taskId": "t", "waitTime": 1}, "waitStart"),
        (
            {
                "type": "TASK_WAITING",
                "taskId": "t",
                "waitTime": 1,
                "waitStart": 1,
                "filename": 3,
            },
            "filename",
        ),
    ],
)
def test_invalid_field_names_the_field(message: dict[str, Any], path: str) -> None:
    with pytest.raises(InvalidField) as info:
        parse_client_message(raw_of(message))
    assert info.value.code == "invalid_field"
    assert path in str(info.value)
    assert message["type"] in str(info.value)


def test_a_batch_with_no_tasks_is_accepted() -> None:
    inbound = parse_client_message(raw_of(submit()))
    assert inbound.header == {"type": "SUBMIT_TASKS", "sessionId": "s-1", "tasks": []}
    assert inbound.payloads == []


# Payloads.


@pytest.mark.parametrize(
    "data", ["", "QQ==", "QUI=", "QUJD", "+/+/AAAA", "A" * 10_000 + "=="]
)
def test_plain_base64_payload_is_its_utf8_bytes(data: str) -> None:
    inbound = parse_client_message(raw_of(submit(plugin_task(dataBase64=data))))

    assert [bytes(p) for p in inbound.payloads] == [data.encode()]
    assert "dataBase64" not in inbound.header["tasks"][0]


def test_payloads_keep_task_order() -> None:
    tasks = [plugin_task(filename=f"{i}.jpg", dataBase64=f"QUJ{i}") for i in range(5)]

    inbound = parse_client_message(raw_of(submit(*tasks)))

    assert [bytes(p) for p in inbound.payloads] == [
        f"QUJ{i}".encode() for i in range(5)
    ]
    assert [t["filename"] for t in inbound.header["tasks"]] == [
        f"{i}.jpg" for i in range(5)
    ]


def test_repr_does_not_hold_the_data() -> None:
    inbound = parse_client_message(raw_of(submit(plugin_task(dataBase64="SECRET"))))
    assert "SECRET" not in repr(inbound)
    assert "payloads=1" in repr(inbound)


ODD_DATA = [
    'quo"te',
    "back\\slash",
    "new\nline",
    "tab\tcr\r",
    "\x00\x01\x1f",
    '\\"\\\\',
    "/solidus/",
    "é ü 照片 🎉",
    "\u2028\u2029",
    "del\x7f",
    "</script>",
]


@pytest.mark.parametrize("data", ODD_DATA)
def test_odd_payload_is_the_json_string_body(data: str) -> None:
    raw = json.dumps(submit(plugin_task(dataBase64=data))).encode()

    (payload,) = parse_client_message(raw).payloads

    assert json.loads(b'"' + bytes(payload) + b'"') == data
    if any(c in data for c in '"\\') or any(ord(c) < 0x20 for c in data):
        assert bytes(payload) == orjson.dumps(data)[1:-1]
    else:
        assert bytes(payload) == data.encode()


@pytest.mark.parametrize("data", ODD_DATA)
def test_odd_payload_round_trips_through_encode_for_client(data: str) -> None:
    raw = json.dumps(submit(plugin_task(dataBase64=data))).encode()
    (payload,) = parse_client_message(raw).payloads
    task = {"id": "t-1", "filename": "photo.jpg", "mimeType": "image/jpeg", "size": 3}

    out = encode_for_client({"type": "TASK_ASSIGNED", "task": task}, payload)

    assert json.loads(out)["task"]["dataBase64"] == data
    assert orjson.loads(out)["task"]["dataBase64"] == data


@settings(max_examples=200, deadline=None)
@given(data=st.text(), ensure_ascii=st.booleans())
def test_any_text_round_trips_from_plugin_to_worker(
    data: str, ensure_ascii: bool
) -> None:
    raw = json.dumps(submit(plugin_task(dataBase64=data)), ensure_ascii=ensure_ascii)
    (payload,) = parse_client_message(raw.encode()).payloads

    out = encode_for_client({"type": "TASK_ASSIGNED", "task": {"id": "t"}}, payload)

    assert json.loads(out) == {
        "type": "TASK_ASSIGNED",
        "task": {"id": "t", "dataBase64": data},
    }


# encode_for_client.


@pytest.mark.parametrize(
    "message",
    [
        {
            "type": "WORKER_REGISTERED",
            "workerId": "w-1",
            "serverStats": {"workerCount": 1},
        },
        {
            "type": "TASKS_SUBMITTED",
            "sessionId": "s",
            "taskCount": 3,
            "totalPending": 3,
        },
        {"type": "TASK_WAITING", "taskId": "t", "waitTime": 1.5, "waitStart": 17},
        {"type": "TASK_COMPLETED", "filename": "照片🎉.jpg", "progress": {"total": 1}},
        {"type": "TASK_ASSIGNED", "task": {"id": "t", "dataBase64": "QQ=="}},
        {},
    ],
)
def test_encode_without_payload_is_orjson(message: dict[str, Any]) -> None:
    assert encode_for_client(message) == orjson.dumps(message)
    assert encode_for_client(message, None) == orjson.dumps(message)


ASSIGNED_TASK = {
    "id": "t-1",
    "filename": '照片-🎉-ünïcödé "quoted" \\ .jpg',
    "mimeType": "image/jpeg",
    "size": 3,
}


@pytest.mark.parametrize(
    "payload",
    [b"QUJD", memoryview(b"QUJD"), bytearray(b"QUJD"), memoryview(b'xx"QUJD"xx')[3:7]],
    ids=["bytes", "memoryview", "bytearray", "memoryview-slice"],
)
def test_encode_task_assigned_splices_the_payload(payload: Any) -> None:
    message = {"type": "TASK_ASSIGNED", "task": dict(ASSIGNED_TASK)}

    out = encode_for_client(message, payload)

    assert isinstance(out, bytes)
    assert json.loads(out) == {
        "type": "TASK_ASSIGNED",
        "task": {**ASSIGNED_TASK, "dataBase64": "QUJD"},
    }
    # The message is left as it was.
    assert message == {"type": "TASK_ASSIGNED", "task": ASSIGNED_TASK}


@pytest.mark.parametrize(
    "task",
    [{"id": "t-1"}, {"filename": "照片🎉.jpg"}, {}],
    ids=["id", "filename", "empty"],
)
def test_encode_task_assigned_with_a_small_task(task: dict[str, Any]) -> None:
    out = encode_for_client({"type": "TASK_ASSIGNED", "task": task}, b"QUJD")

    assert json.loads(out) == {
        "type": "TASK_ASSIGNED",
        "task": {**task, "dataBase64": "QUJD"},
    }


def test_encode_message_with_only_a_task() -> None:
    out = encode_for_client({"task": {"id": "t"}}, b"QQ==")

    assert json.loads(out) == {"task": {"id": "t", "dataBase64": "QQ=="}}


def test_encode_keeps_fields_after_the_task() -> None:
    message = {"task": {"id": "t", "size": 2}, "type": "TASK_ASSIGNED", "attempt": 2}

    out = encode_for_client(message, b"")

    assert json.loads(out) == {
        "type": "TASK_ASSIGNED",
        "attempt": 2,
        "task": {"id": "t", "size": 2, "dataBase64": ""},
    }


def test_encode_large_payload() -> None:
    payload = b"QUJD" * 250_000

    out = encode_for_client({"type": "TASK_ASSIGNED", "task": {"id": "t"}}, payload)

    assert orjson.loads(out)["task"]["dataBase64"] == payload.decode()


# encode_error.


@pytest.mark.parametrize(
    "error",
    [
        InvalidJson("message is not valid JSON: oops"),
        InvalidField('SUBMIT_TASKS: Expected `int` - at `$.tasks[0].size` "quoted"'),
        UnknownType("NOPE"),
        Unavailable("busy: 照片"),
        UnknownSession("s-9"),
        TaskNotHeld("t-1"),
        InternalError(),
    ],
)
def test_encode_error(error: LinkupError) -> None:
    out = encode_error(error)

    assert json.loads(out) == {
        "type": "ERROR",
        "code": error.code,
        "message": str(error),
    }
    assert list(json.loads(out)) == ["type", "code", "message"]


def test_encode_error_codes() -> None:
    assert json.loads(encode_error(UnknownType("X")))["code"] == "unknown_type"
    assert json.loads(encode_error(InvalidJson("x")))["code"] == "invalid_json"
    assert json.loads(encode_error(InvalidField("x")))["code"] == "invalid_field"
    assert json.loads(encode_error(InternalError())) == {
        "type": "ERROR",
        "code": "internal_error",
        "message": "internal error",
    }


def test_task_failed_without_error_is_accepted_with_a_default_reason() -> None:
    """JavaScript drops `error: undefined`; the report must still end the attempt."""
    inbound = parse_client_message(b'{"type": "TASK_FAILED", "taskId": "t-1"}')
    assert inbound.header == {
        "type": "TASK_FAILED",
        "taskId": "t-1",
        "error": "upload failed (the worker gave no reason)",
    }
