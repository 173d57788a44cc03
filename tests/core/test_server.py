"""
Tests of :mod:`core.server`'s group commit: the link messages waiting on the
socket are handled together, stored in one commit, and answered in order.

The core runs in a thread on an in-process socket; a DEALER plays the bridge.
Its messages are queued before the core's loop starts, so that they all wait
when the loop first looks.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from core import wire
from core.model import Changes
from core.scheduler import Scheduler
from core.server import BATCH_PAYLOAD_BYTES, CoreServer
from core.store import SqliteStore, open_data_dir
from core.wire import Command

ENDPOINT = "inproc://core-under-test"
HELLO = {"bridge": "b", "join": 1, "heartbeat": 1.0}
TIMEOUT_MS = 5000


class CountingStore(SqliteStore):
    """A store that notes every save that writes something."""

    saves: list[Changes]

    def save(self, changes: Changes) -> None:
        if changes:
            self.saves.append(changes)
        super().save(changes)


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


class Core:
    """
    A CoreServer made, run and closed in a thread of its own (SQLite wants
    that); :meth:`go` starts its loop once the test has queued its messages.

    """

    def __init__(
        self, context: zmq.Context[Any], tmp_path: Path, endpoint: str = ENDPOINT
    ) -> None:
        self.endpoint = endpoint
        self.saves: list[Changes] = []
        self.sent_after: list[int] = []
        self._built = threading.Event()
        self._go = threading.Event()
        self.thread = threading.Thread(
            target=self._main, args=(context, tmp_path), daemon=True
        )
        self.thread.start()
        assert self._built.wait(5)

    def _main(self, context: zmq.Context[Any], tmp_path: Path) -> None:
        store, spool = open_data_dir(tmp_path)
        store.__class__ = CountingStore
        store.saves = self.saves  # type: ignore[attr-defined]
        self.server = CoreServer(context, self.endpoint, Scheduler("x"), store, spool)
        socket = self.server._socket
        send = socket.send

        def noting_send(*args: Any, **kwargs: Any) -> Any:
            self.sent_after.append(len(self.saves))
            return send(*args, **kwargs)

        self.server._socket = _Wrapped(socket, noting_send)  # type: ignore[assignment]
        self._built.set()
        self._go.wait(5)
        try:
            self.server.run()
        finally:
            self.server._socket = socket
            self.server.close()

    def go(self) -> None:
        self._go.set()

    def stop(self, link: zmq.Socket[Any]) -> None:
        self.server.stop()
        send(link, Command.HEARTBEAT, {})
        self.thread.join(5)
        assert not self.thread.is_alive()


def bridge(context: zmq.Context[Any], endpoint: str = ENDPOINT) -> zmq.Socket[Any]:
    socket: zmq.Socket[Any] = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    socket.connect(endpoint)
    return socket


def linked(
    context: zmq.Context[Any], tmp_path: Path, *, deliver_many: bool = False
) -> tuple[Core, zmq.Socket[Any]]:
    """A core, not started yet, and a bridge that has said HELLO to it."""
    core = Core(context, tmp_path)
    link = bridge(context)
    hello = {**HELLO, "deliverMany": True} if deliver_many else HELLO
    send(link, Command.HELLO, hello)
    return core, link


def send(
    socket: zmq.Socket[Any],
    command: Command,
    header: dict[str, Any],
    payloads: tuple[bytes, ...] = (),
) -> None:
    socket.send_multipart(wire.encode(command, header, payloads))


def client_message(
    socket: zmq.Socket[Any], client: int, message: dict[str, Any], *payloads: bytes
) -> None:
    send(
        socket, Command.CLIENT_MESSAGE, {"client": client, "message": message}, payloads
    )


def receive(socket: zmq.Socket[Any]) -> wire.Envelope:
    return wire.decode(socket.recv_multipart())


# Deliveries received in a DELIVER_MANY and not yet returned, per socket.
_unreturned: weakref.WeakKeyDictionary[zmq.Socket[Any], list[wire.Envelope]] = (
    weakref.WeakKeyDictionary()
)


def next_delivery(socket: zmq.Socket[Any]) -> wire.Envelope:
    """
    The next DELIVER, skipping heartbeats, broadcasts and the like; the
    deliveries of a DELIVER_MANY one at a time.

    """
    waiting = _unreturned.setdefault(socket, [])
    while not waiting:
        envelope = receive(socket)
        if envelope.command in (Command.DELIVER, Command.DELIVER_MANY):
            waiting.extend(wire.deliveries(envelope))
    return waiting.pop(0)


def test_waiting_messages_share_one_commit_and_keep_their_order(
    context: zmq.Context[Any], tmp_path: Path
) -> None:
    core, link = linked(context, tmp_path)
    client_message(link, 1, {"type": "WORKER_REGISTER"})
    # Refused at once, but only after what the messages before it made.
    client_message(
        link, 1, {"type": "TASK_COMPLETED", "taskId": "t-0", "resultUrl": "u"}
    )
    client_message(link, 2, {"type": "CREATE_SESSION"})

    core.go()
    try:
        assert receive(link).command is Command.WELCOME
        delivered: list[tuple[int, str]] = []
        session_id = ""
        while len(delivered) < 3:
            envelope = next_delivery(link)
            message = envelope.header["message"]
            delivered.append((envelope.header["client"], message["type"]))
            session_id = message.get("sessionId", session_id)
        assert delivered == [
            (1, "WORKER_REGISTERED"),
            (1, "ERROR"),
            (2, "SESSION_CREATED"),
        ]
        # WORKER_REGISTER and CREATE_SESSION in one commit: the ERROR's flush
        # stored the first, the end of the batch the second.
        assert len(core.saves) == 2

        # A batch of files: its rows are committed by the spool, the tasks
        # by the one save, before the answer and the assignment go out.
        core.saves.clear()
        client_message(
            link,
            2,
            {
                "type": "SUBMIT_TASKS",
                "sessionId": session_id,
                "tasks": [
                    {"filename": "a.png", "mimeType": "image/png", "size": 1},
                    {"filename": "b.png", "mimeType": "image/png", "size": 1},
                ],
            },
            b"YQ==",
            b"Yg==",
        )
        seen: list[str] = []
        while "TASK_ASSIGNED" not in seen:
            envelope = next_delivery(link)
            seen.append(envelope.header["message"]["type"])
            if seen[-1] == "TASK_ASSIGNED":
                assert [bytes(p) for p in envelope.payloads] == [b"YQ=="]
        assert seen[:2] == ["TASKS_SUBMITTED", "TASK_ASSIGNED"]
        assert len(core.saves) == 1
    finally:
        core.stop(link)
        link.close()


def test_a_batch_is_stored_before_any_of_it_is_sent(
    context: zmq.Context[Any], tmp_path: Path
) -> None:
    """Every DELIVER of a batch leaves after the batch's commit."""
    core, link = linked(context, tmp_path)
    for client in range(1, 6):
        client_message(link, client, {"type": "WORKER_REGISTER"})

    core.go()
    try:
        registered = 0
        while registered < 5:
            next_delivery(link)
            registered += 1
    finally:
        core.stop(link)
        link.close()

    assert [len(changes.workers) for changes in core.saves] == [5]
    # Nothing but the WELCOME (the routing id and three frames) went out
    # before the commit.
    assert core.sent_after.count(0) == 4


def next_of(socket: zmq.Socket[Any], *commands: Command) -> wire.Envelope:
    """The next message that is one of ``commands``, skipping the others."""
    while True:
        envelope = receive(socket)
        if envelope.command in commands:
            return envelope


def test_a_bridge_that_does_not_take_batches_gets_a_deliver_each(
    context: zmq.Context[Any], tmp_path: Path
) -> None:
    # A bridge from before DELIVER_MANY does not say "deliverMany".
    core, link = linked(context, tmp_path)
    for client in range(1, 4):
        client_message(link, client, {"type": "WORKER_REGISTER"})

    core.go()
    try:
        received = [
            next_of(link, Command.DELIVER, Command.DELIVER_MANY) for _ in range(3)
        ]
    finally:
        core.stop(link)
        link.close()

    assert [envelope.command for envelope in received] == [Command.DELIVER] * 3
    assert [envelope.header["client"] for envelope in received] == [1, 2, 3]


def test_a_turns_deliveries_to_a_bridge_leave_as_one_message(
    context: zmq.Context[Any], tmp_path: Path
) -> None:
    core, link = linked(context, tmp_path, deliver_many=True)
    for client in range(1, 6):
        client_message(link, client, {"type": "WORKER_REGISTER"})

    core.go()
    try:
        envelope = next_of(link, Command.DELIVER, Command.DELIVER_MANY)
    finally:
        core.stop(link)
        link.close()

    assert envelope.command is Command.DELIVER_MANY
    assert [
        (delivery.header["client"], delivery.header["message"]["type"])
        for delivery in wire.deliveries(envelope)
    ] == [(client, "WORKER_REGISTERED") for client in range(1, 6)]


def test_a_batch_of_deliveries_goes_once_it_carries_enough_file_data(
    context: zmq.Context[Any], tmp_path: Path
) -> None:
    # Four files of 100 KiB for four workers in one turn: BATCH_PAYLOAD_BYTES
    # (256 KiB) is reached at the third assignment, which sends the batch;
    # the fourth goes on its own.
    assert BATCH_PAYLOAD_BYTES == 256 * 1024
    file = b"QUJD" * (25 * 1024)
    core, link = linked(context, tmp_path, deliver_many=True)
    for worker in (1, 2, 3, 4):
        client_message(link, worker, {"type": "WORKER_REGISTER"})
    client_message(link, 5, {"type": "CREATE_SESSION"})

    core.go()
    try:
        session_id = ""
        while not session_id:
            message = next_delivery(link).header["message"]
            session_id = message.get("sessionId", "")
        task = {"filename": "a.bin", "mimeType": "text/plain", "size": 75 * 1024}
        client_message(
            link,
            5,
            {"type": "SUBMIT_TASKS", "sessionId": session_id, "tasks": [task] * 4},
            *[file] * 4,
        )
        batch = next_of(link, Command.DELIVER, Command.DELIVER_MANY)
        last = next_of(link, Command.DELIVER, Command.DELIVER_MANY)
    finally:
        core.stop(link)
        link.close()

    assert batch.command is Command.DELIVER_MANY
    delivered = wire.deliveries(batch)
    assert [d.header["message"]["type"] for d in delivered] == [
        "TASKS_SUBMITTED",
        "TASK_ASSIGNED",
        "TASK_ASSIGNED",
        "TASK_ASSIGNED",
    ]
    assert [d.header["client"] for d in delivered[1:]] == [1, 2, 3]
    assert [bytes(p) for d in delivered for p in d.payloads] == [file] * 3
    assert last.command is Command.DELIVER
    assert last.header["client"] == 4
    assert [bytes(p) for p in last.payloads] == [file]


def test_a_bridge_that_leaves_has_its_last_messages_read_first(
    context: zmq.Context[Any], tmp_path: Path
) -> None:
    # A bridge stopping sends its last messages and BYE, then closes. When the
    # core sees those messages and the monitor's disconnect in one poll, it
    # must read the messages first: probing the bridges first found this one
    # gone, dropped it as lost, and refused its last messages with RESET.
    # Over ipc: an inproc connection reports no disconnect to the monitor.
    endpoint = f"ipc://{tmp_path}/core.sock"
    core = Core(context, tmp_path, endpoint)
    server_poll = core.server._poller.poll
    open_gate = threading.Event()
    open_gate.set()
    at_gate = threading.Event()

    def gated_poll(timeout: int) -> Any:
        at_gate.set()
        assert open_gate.wait(10)
        return server_poll(timeout)

    core.server._poller.poll = gated_poll  # type: ignore[method-assign]
    link = bridge(context, endpoint)
    send(link, Command.HELLO, HELLO)
    core.go()
    try:
        assert next_of(link, Command.WELCOME).header["join"] == 1

        # Hold the loop before its next poll, then leave as a bridge does.
        open_gate.clear()
        at_gate.clear()
        send(link, Command.HEARTBEAT, {})
        assert at_gate.wait(5)
        client_message(link, 1, {"type": "WORKER_REGISTER"})
        send(link, Command.BYE, {})
        link.close(linger=5000)
        # Both waiting for the loop (it is held, so the sockets are free).
        assert core.server._monitor.poll(5000, zmq.POLLIN)
        assert core.server._socket.poll(5000, zmq.POLLIN)
        log = _LogEvent("said goodbye", "bridge unreachable")
        core_logger = logging.getLogger("linkup.core")
        level = core_logger.level
        core_logger.addHandler(log)
        core_logger.setLevel(logging.INFO)
        try:
            open_gate.set()
            assert log.wait(5)
        finally:
            core_logger.removeHandler(log)
            core_logger.setLevel(level)
    finally:
        open_gate.set()
        closing = bridge(context, endpoint)
        core.stop(closing)
        closing.close()

    # The worker joined and then left with its bridge, which said goodbye.
    assert "said goodbye" in log.first
    assert any("worker joined" in message for message in log.messages)
    assert not any("unknown bridge" in message for message in log.messages)


class _LogEvent(logging.Handler):
    """Keeps every message; set once one containing one of ``texts`` comes."""

    def __init__(self, *texts: str) -> None:
        super().__init__(logging.DEBUG)
        self.texts = texts
        self.first = ""
        self.messages: list[str] = []
        self._seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if not self._seen.is_set() and any(t in message for t in self.texts):
            self.first = message
            self._seen.set()

    def wait(self, timeout: float) -> bool:
        return self._seen.wait(timeout)


class _Wrapped:
    """A socket whose send is replaced; everything else passes through."""

    def __init__(self, socket: zmq.Socket[Any], send: Any) -> None:
        self._socket = socket
        self.send = send

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)
