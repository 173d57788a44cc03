"""
Tests of :mod:`bridge.payloads` and of :func:`bridge.messages.parse_cut_message`:
cutting the files out of a large ``SUBMIT_TASKS`` without parsing them. Pure.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bridge.messages import Inbound, parse_client_message, parse_cut_message
from bridge.payloads import CutMessage, cut_payloads, is_verbatim
from core.errors import InvalidField, LinkupError, UnknownType

# Distinct, long enough that one never shows up inside another or by chance.
# Padding "=", none and "==", and both "+" and "/".
DATA = [
    base64.b64encode(bytes([i]) * (60 + i) + b"\xfb\xef\xbe").decode() for i in range(3)
]


def task(index: int, **extra: Any) -> dict[str, Any]:
    return {
        "filename": f"photo-{index}.jpg",
        "mimeType": "image/jpeg",
        "dataBase64": DATA[index],
        "size": len(base64.b64decode(DATA[index])),
        **extra,
    }


def submit(*tasks: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "SUBMIT_TASKS", "sessionId": "s-1", "tasks": list(tasks), **extra}


MESSAGE = submit(task(0), task(1), task(2))


def header_of(inbound: Inbound) -> tuple[str, dict[str, Any], list[bytes], int]:
    """Everything an Inbound carries, with payloads as plain bytes."""
    payloads = [bytes(payload) for payload in inbound.payloads]
    return inbound.type, inbound.header, payloads, inbound.size


def parse_via_cut(raw: bytes) -> Inbound | None:
    """The bridge's shortcut: cut, check every payload, parse the skeleton."""
    cut = cut_payloads(raw)
    if cut is None or not all(is_verbatim(payload) for payload in cut.payloads):
        return None
    return parse_cut_message(cut, len(raw))


def assert_same_as_full_parse(raw: bytes) -> None:
    inbound = parse_via_cut(raw)
    assert inbound is not None
    assert header_of(inbound) == header_of(parse_client_message(raw))


# Raw forms of one and the same message.

WHITESPACE_RAW = (
    "{\n"
    '  "type" : "SUBMIT_TASKS",\n'
    '  "sessionId":"s-1" ,\n'
    '  "tasks" : [\n'
    + ",\n".join(
        f'\t{{ "filename" :\t"photo-{i}.jpg" , "mimeType":"image/jpeg",\r\n'
        f'\t  "dataBase64" \t:\r\n  "{t["dataBase64"]}" ,  "size" : {t["size"]} }}'
        for i, t in enumerate(MESSAGE["tasks"])
    )
    + "\n  ]\n}\n"
).encode()

REORDERED_RAW = json.dumps(
    {
        "tasks": [
            {
                "dataBase64": t["dataBase64"],
                "size": t["size"],
                "mimeType": t["mimeType"],
                "filename": t["filename"],
            }
            for t in MESSAGE["tasks"]
        ],
        "sessionId": "s-1",
        "type": "SUBMIT_TASKS",
    }
).encode()

RAW_FORMS = {
    "json.dumps": json.dumps(MESSAGE).encode(),
    "json.dumps-compact": json.dumps(MESSAGE, separators=(",", ":")).encode(),
    "json.dumps-indent": json.dumps(MESSAGE, indent=2).encode(),
    "orjson.dumps": orjson.dumps(MESSAGE),
    "whitespace": WHITESPACE_RAW,
    "reordered": REORDERED_RAW,
}


@pytest.mark.parametrize("raw", list(RAW_FORMS.values()), ids=list(RAW_FORMS))
def test_cut_takes_every_base64_as_a_view_in_task_order(raw: bytes) -> None:
    assert orjson.loads(raw) == MESSAGE

    cut = cut_payloads(raw)

    assert cut is not None
    assert all(isinstance(payload, memoryview) for payload in cut.payloads)
    assert [bytes(payload) for payload in cut.payloads] == [d.encode() for d in DATA]
    assert len(cut.placeholders) == len(DATA)
    assert len(set(cut.placeholders)) == len(DATA)
    for placeholder in cut.placeholders:
        assert placeholder.encode() in cut.skeleton
    for data in DATA:
        assert data.encode() not in cut.skeleton
    skeleton = orjson.loads(cut.skeleton)
    assert [t["dataBase64"] for t in skeleton["tasks"]] == cut.placeholders
    # Apart from the values, the skeleton is the message as sent.
    for t in skeleton["tasks"]:
        del t["dataBase64"]
    assert skeleton == {
        **MESSAGE,
        "tasks": [
            {k: v for k, v in t.items() if k != "dataBase64"} for t in MESSAGE["tasks"]
        ],
    }


@pytest.mark.parametrize("raw", list(RAW_FORMS.values()), ids=list(RAW_FORMS))
def test_payloads_are_views_of_the_received_bytes(raw: bytes) -> None:
    cut = cut_payloads(raw)

    assert cut is not None
    for payload in cut.payloads:
        assert payload.obj is raw
        assert payload.readonly


@pytest.mark.parametrize("raw", list(RAW_FORMS.values()), ids=list(RAW_FORMS))
def test_parse_cut_message_agrees_with_the_full_parse(raw: bytes) -> None:
    cut = cut_payloads(raw)
    assert cut is not None

    inbound = parse_cut_message(cut, len(raw))

    assert inbound is not None
    full = parse_client_message(raw)
    assert inbound.type == full.type == "SUBMIT_TASKS"
    assert inbound.header == full.header
    assert inbound.size == full.size == len(raw)
    assert [bytes(p) for p in inbound.payloads] == [bytes(p) for p in full.payloads]
    assert inbound.header["tasks"] == [
        {"filename": f"photo-{i}.jpg", "mimeType": "image/jpeg", "size": t["size"]}
        for i, t in enumerate(MESSAGE["tasks"])
    ]


def test_repr_of_a_cut_message_does_not_hold_the_data() -> None:
    cut = cut_payloads(orjson.dumps(MESSAGE))
    assert cut is not None
    assert DATA[0] not in repr(cut)
    assert "payloads=3" in repr(cut)


# Keys that only look like dataBase64.


def test_escaped_key_text_inside_a_filename_is_not_cut() -> None:
    tricky = 'x "dataBase64": "evil" y "dataBase64":"QUJD'
    message = submit(task(0, filename=tricky), task(1))
    raw = json.dumps(message).encode()
    assert b'\\"dataBase64\\"' in raw

    cut = cut_payloads(raw)

    assert cut is not None
    assert [bytes(p) for p in cut.payloads] == [DATA[0].encode(), DATA[1].encode()]
    assert_same_as_full_parse(raw)
    inbound = parse_via_cut(raw)
    assert inbound is not None
    assert inbound.header["tasks"][0]["filename"] == tricky


def test_key_whose_closing_quote_is_real_but_opening_quote_escaped_is_not_cut() -> None:
    # The key `x"dataBase64` is written `"x\"dataBase64"`: the raw bytes hold
    # `"dataBase64": "...` with only the first quote escaped.
    message = submit(task(0, **{'x"dataBase64': "not-a-file"}), task(1))
    raw = json.dumps(message).encode()
    assert b'\\"dataBase64": "not-a-file"' in raw

    cut = cut_payloads(raw)

    assert cut is not None
    assert [bytes(p) for p in cut.payloads] == [DATA[0].encode(), DATA[1].encode()]
    assert b"not-a-file" in cut.skeleton
    assert_same_as_full_parse(raw)


def test_key_after_an_escaped_backslash_is_cut() -> None:
    # `\\` is an escaped backslash; the quote after it is a real one.
    message = submit(task(0, filename="ends with backslash\\"), task(1))
    raw = json.dumps(message, separators=(",", ":")).encode()

    cut = cut_payloads(raw)

    assert cut is not None
    assert len(cut.payloads) == 2
    assert_same_as_full_parse(raw)


# Values that cannot be cut.


@pytest.mark.parametrize(
    "value",
    [
        b"QUJD\\/RA==",  # JSON `\/`
        b"\\u0041QUJD",  # JSON `\u0041`
        b"QUJD\\n",
        b'QUJD\\"',
    ],
)
def test_a_value_with_an_escape_is_not_cut(value: bytes) -> None:
    raw = (
        b'{"type":"SUBMIT_TASKS","sessionId":"s","tasks":['
        b'{"filename":"a","mimeType":"m","dataBase64":"QUJD","size":3},'
        b'{"filename":"b","mimeType":"m","dataBase64":"' + value + b'","size":3}]}'
    )
    orjson.loads(raw)  # valid JSON

    assert cut_payloads(raw) is None


@pytest.mark.parametrize(
    "message",
    [
        {"type": "TASK_COMPLETED", "taskId": "t", "resultUrl": "https://x/y"},
        {"type": "WORKER_REGISTER"},
        submit(),
        {"type": "SUBMIT_TASKS", "sessionId": "s", "tasks": [{"dataBase6": "QQ=="}]},
    ],
)
def test_no_database64_key_is_not_cut(message: dict[str, Any]) -> None:
    assert cut_payloads(orjson.dumps(message)) is None


@pytest.mark.parametrize("value", [12, None, 1.5, True, ["QQ=="], {"a": "QQ=="}])
def test_a_value_that_is_not_a_string_is_not_cut(value: Any) -> None:
    raw = orjson.dumps(submit(task(0, dataBase64=value)))

    assert cut_payloads(raw) is None
    with pytest.raises(InvalidField) as info:
        parse_client_message(raw)
    assert info.value.code == "invalid_field"
    assert "tasks[0].dataBase64" in str(info.value)


def test_a_non_string_value_next_to_a_string_one_is_refused_by_both_parsers() -> None:
    raw = orjson.dumps(submit(task(0), task(1, dataBase64=None), task(2)))

    cut = cut_payloads(raw)

    assert cut is not None
    assert [bytes(p) for p in cut.payloads] == [DATA[0].encode(), DATA[2].encode()]
    with pytest.raises(InvalidField, match=r"tasks\[1\]\.dataBase64"):
        parse_cut_message(cut, len(raw))
    with pytest.raises(InvalidField, match=r"tasks\[1\]\.dataBase64"):
        parse_client_message(raw)


def test_key_without_a_colon_is_skipped() -> None:
    # Not JSON at all; the cutter must not mistake the next string for a value.
    raw = b'{"dataBase64" "QUJD", "x": {"dataBase64": "REVG"}}'

    cut = cut_payloads(raw)

    assert cut is not None
    assert [bytes(p) for p in cut.payloads] == [b"REVG"]


def test_unterminated_value_is_not_cut() -> None:
    assert cut_payloads(b'{"tasks":[{"dataBase64":"QUJD') is None


# is_verbatim.


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"QUJD",
        b"QQ==",
        b"Qg=",
        b"+/+/",
        base64.b64encode(bytes(range(256))),
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
        # Every printable ASCII character but the quote and the backslash.
        bytes(c for c in range(0x20, 0x7F) if c not in b'"\\'),
    ],
)
def test_is_verbatim_accepts_base64_and_printable_ascii(payload: bytes) -> None:
    assert is_verbatim(memoryview(payload)) is True


@pytest.mark.parametrize(
    "payload",
    [
        b"QU\x01JD",
        b"QUJD\n",
        b"\tQUJD",
        b"\x00",
        b"\x1f",
        b'QU"JD',
        b"QU\\JD",
        "é".encode(),
        b"QUJD" + "é".encode(),
        b"\x80",
        b"\xff",
        # DEL (0x7f) may appear unescaped in a JSON string, but the pattern
        # stops at '~' (0x7e): DEL is refused, which only sends such a message
        # to the full parser. Conservative, not wrong; Base64 never has it.
        b"\x7f",
        b"QUJD\x7f",
    ],
)
def test_is_verbatim_refuses_what_a_json_string_would_not_hold_as_is(
    payload: bytes,
) -> None:
    assert is_verbatim(memoryview(payload)) is False


def test_is_verbatim_reads_views_into_a_larger_buffer() -> None:
    raw = b'"\nQUJD\x01'
    assert is_verbatim(memoryview(raw)[2:6]) is True
    assert is_verbatim(memoryview(raw)[1:6]) is False
    assert is_verbatim(memoryview(raw)[2:7]) is False


# parse_cut_message refuses what it cannot vouch for.


def test_database64_key_outside_the_tasks_makes_placeholders_not_line_up() -> None:
    raw = orjson.dumps(submit(task(0), task(1), meta={"dataBase64": "xx"}))
    cut = cut_payloads(raw)
    assert cut is not None
    assert len(cut.payloads) == 3

    assert parse_cut_message(cut, len(raw)) is None
    # The full parse ignores the extra object and keeps the real files.
    full = parse_client_message(raw)
    assert [bytes(p) for p in full.payloads] == [DATA[0].encode(), DATA[1].encode()]


def test_database64_key_nested_in_a_task_makes_placeholders_not_line_up() -> None:
    raw = orjson.dumps(submit(task(0, extra={"dataBase64": "xx"}), task(1)))
    cut = cut_payloads(raw)
    assert cut is not None

    assert parse_cut_message(cut, len(raw)) is None


def test_duplicate_database64_key_makes_placeholders_not_line_up() -> None:
    raw = (
        b'{"type":"SUBMIT_TASKS","sessionId":"s","tasks":[{"filename":"a",'
        b'"mimeType":"m","dataBase64":"QUJD","dataBase64":"REVG","size":3}]}'
    )
    cut = cut_payloads(raw)
    assert cut is not None
    assert len(cut.payloads) == 2

    assert parse_cut_message(cut, len(raw)) is None


def test_key_spelled_with_a_unicode_escape_is_not_cut_and_not_trusted() -> None:
    raw = (
        b'{"type":"SUBMIT_TASKS","sessionId":"s","tasks":['
        b'{"filename":"a","mimeType":"m","dataBase64":"QUJD","size":3},'
        b'{"filename":"b","mimeType":"m","data\\u0042ase64":"REVG","size":3}]}'
    )
    cut = cut_payloads(raw)
    assert cut is not None
    assert [bytes(p) for p in cut.payloads] == [b"QUJD"]

    assert parse_cut_message(cut, len(raw)) is None
    full = parse_client_message(raw)
    assert [bytes(p) for p in full.payloads] == [b"QUJD", b"REVG"]


def test_skeleton_that_is_not_json_gives_none() -> None:
    raw = orjson.dumps(MESSAGE)[:-1]
    cut = cut_payloads(raw)
    assert cut is not None

    assert parse_cut_message(cut, len(raw)) is None


def test_hand_made_skeleton_that_is_not_json_gives_none() -> None:
    cut = CutMessage(b'{"type": SUBMIT', [memoryview(b"QUJD")], ["p-0"])
    assert parse_cut_message(cut, 10) is None


def test_other_message_types_with_a_database64_field_give_none() -> None:
    raw = orjson.dumps(
        {"type": "TASK_COMPLETED", "taskId": "t", "resultUrl": "u", "dataBase64": "QQ"}
    )
    cut = cut_payloads(raw)
    assert cut is not None

    assert parse_cut_message(cut, len(raw)) is None


def test_skeleton_with_a_negative_size_is_an_invalid_field() -> None:
    raw = orjson.dumps(submit(task(0), task(1, size=-1)))
    cut = cut_payloads(raw)
    assert cut is not None

    with pytest.raises(InvalidField, match=r"tasks\[1\]\.size") as info:
        parse_cut_message(cut, len(raw))
    assert info.value.code == "invalid_field"


def test_skeleton_with_a_wrong_typed_filename_is_an_invalid_field() -> None:
    raw = orjson.dumps(submit(task(0, filename=5)))
    cut = cut_payloads(raw)
    assert cut is not None

    with pytest.raises(InvalidField, match=r"tasks\[0\]\.filename"):
        parse_cut_message(cut, len(raw))


def test_skeleton_with_an_unknown_type_is_unknown_type() -> None:
    raw = orjson.dumps({**MESSAGE, "type": "SUBMIT_TASKZ"})
    cut = cut_payloads(raw)
    assert cut is not None

    with pytest.raises(UnknownType) as info:
        parse_cut_message(cut, len(raw))
    assert info.value.message_type == "SUBMIT_TASKZ"
    assert info.value.code == "unknown_type"


# Property: the shortcut never says anything the full parser would not.

_KNOWN_TASK_KEYS = {"filename", "mimeType", "dataBase64", "size"}
_KNOWN_TOP_KEYS = {"type", "sessionId", "tasks"}

_tricky_keys = st.sampled_from(
    [
        "dataBase64",
        'x"dataBase64',
        "x\\",
        "data\\Base64",
        '"dataBase64": "',
        "dataBase64 ",
        "DataBase64",
    ]
)
_keys = st.one_of(st.text(max_size=12), _tricky_keys)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | _tricky_keys,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(_keys, children, max_size=3)
    ),
    max_leaves=6,
)

_tasks = st.lists(
    st.tuples(
        st.text(),
        st.text(),
        st.binary(max_size=48),
        st.integers(min_value=0, max_value=2**53 - 1),
        st.dictionaries(
            _keys.filter(lambda k: k not in _KNOWN_TASK_KEYS), _json_values, max_size=2
        ),
    ),
    max_size=4,
)


def _has_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_has_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_has_key(v, key) for v in value)
    return False


def _outcome(parse: Any, *args: Any) -> Any:
    try:
        return parse(*args)
    except LinkupError as exc:
        return exc


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tasks=_tasks,
    extra=st.dictionaries(
        _keys.filter(lambda k: k not in _KNOWN_TOP_KEYS), _json_values, max_size=3
    ),
    ensure_ascii=st.booleans(),
    layout=st.sampled_from(
        [
            {},
            {"separators": (",", ":")},
            {"separators": (" , ", " : ")},
            {"indent": 2},
            {"indent": "\t", "separators": (",", "\r\n:\t")},
        ]
    ),
    type_first=st.booleans(),
)
def test_cut_path_agrees_with_the_full_parse(
    tasks: list[tuple[str, str, bytes, int, dict[str, Any]]],
    extra: dict[str, Any],
    ensure_ascii: bool,
    layout: dict[str, Any],
    type_first: bool,
) -> None:
    plugin_tasks = [
        {
            **more,
            "filename": filename,
            "mimeType": mime,
            "dataBase64": base64.b64encode(data).decode(),
            "size": size,
        }
        for filename, mime, data, size, more in tasks
    ]
    core = {"sessionId": "s-1", "tasks": plugin_tasks}
    message = (
        {"type": "SUBMIT_TASKS", **extra, **core}
        if type_first
        else {**core, **extra, "type": "SUBMIT_TASKS"}
    )
    raw = json.dumps(message, ensure_ascii=ensure_ascii, **layout).encode()

    full = _outcome(parse_client_message, raw)
    assert isinstance(full, Inbound)  # a well-formed message by construction

    # As the bridge does: the skeleton is parsed only if every payload is
    # verbatim (the files always are; a stray `dataBase64` elsewhere may not be).
    cut = cut_payloads(raw)
    shortcut = None
    if cut is not None and all(is_verbatim(payload) for payload in cut.payloads):
        shortcut = _outcome(parse_cut_message, cut, len(raw))
        if shortcut is not None:
            assert isinstance(shortcut, Inbound)
            assert header_of(shortcut) == header_of(full)

    # Without any other `dataBase64` key, the shortcut must actually be taken.
    if (
        plugin_tasks
        and not _has_key(extra, "dataBase64")
        and not any(_has_key(more, "dataBase64") for *_, more in tasks)
    ):
        assert isinstance(shortcut, Inbound)
