"""
The simulated plugins of ``python -m benchmarks``: masters and workers.

Each master runs in a process of its own and the workers are spread over a
few more, so that the load generator uses every CPU it can get instead of
queueing behind one Python interpreter. They talk to the parent
over a multiprocessing queue of events ``(kind, number, monotonic time,
payload)``; CLOCK_MONOTONIC is the same in every process on Linux, so the
parent can compare the times.

Workers answer at once: a TASK_ASSIGNED is decoded, hashed and answered with
TASK_COMPLETED ``{taskId, resultUrl: RESULT_PREFIX + sha256}``. Masters check
every result against the hash of the file they sent under that name.

A master opens one session per SUBMIT_TASKS, as the plugin does (a completed
session takes no more tasks), and keeps at most ``window`` files submitted
and without result, so that linkup is kept busy without queueing the whole
run at once. A task's latency runs from just before its SUBMIT_TASKS is
written to the socket to the moment its TASK_COMPLETED is read.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from benchmarks.payloads import FileMaker, file_name, submit_parts
from benchmarks.queued_memory import StreamingClient, expect

try:
    # SIMD Base64, some 40 times faster than the standard library: the workers
    # decode every byte linkup sends, and should not be what limits the run.
    from pybase64 import b64decode as _b64decode

    def decode_base64(data: bytes | memoryview) -> bytes:
        return _b64decode(data, validate=True)

    BASE64_DECODER = "pybase64"
except ImportError:  # pragma: no cover - without the bench extra

    def decode_base64(data: bytes | memoryview) -> bytes:
        return base64.b64decode(data, validate=True)

    BASE64_DECODER = "base64 (standard library)"


__all__ = [
    "BASE64_DECODER",
    "RESULT_PREFIX",
    "MasterLoad",
    "ResultBook",
    "WorkerGroupLoad",
    "master_process",
    "split_task",
    "worker_group_process",
]

RESULT_PREFIX = "https://linkup-benchmark.invalid/"
HEARTBEAT_INTERVAL = 10.0  # as the plugin: linkup drops workers silent for 30 s
MAX_REPORTED_PROBLEMS = 10
DATA_KEY = b'"dataBase64":"'
CREATE_SESSION = b'{"type":"CREATE_SESSION"}'
WORKER_REGISTER = b'{"type":"WORKER_REGISTER"}'
WORKER_HEARTBEAT = b'{"type":"WORKER_HEARTBEAT"}'

Events = Any  # a multiprocessing Queue, which has no usable generic type


def _connect(url: str, timeout: float) -> connect:
    # No compression (linkup offers none), no size limit (a TASK_ASSIGNED is
    # as large as its file), no proxy from the environment, and no pings of
    # our own: linkup pings, and websockets answers.
    return connect(
        url,
        compression=None,
        max_size=None,
        proxy=None,
        ping_interval=None,
        open_timeout=timeout,
    )


def _own_cpu() -> dict[str, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3)}


# Masters.


@dataclass(frozen=True, slots=True)
class MasterLoad:
    number: int
    url: str
    files: int
    file_size: int
    #: Files per SUBMIT_TASKS, each message in a session of its own.
    batch: int
    #: Most files submitted and still without a result.
    window: int
    #: One message, written piece by piece (StreamingClient): a message of a
    #: gigabyte never sits in the master's memory.
    streamed: bool
    seed: int
    timeout: float


@dataclass(slots=True)
class ResultBook:
    """What a master sent, when, and what came back; every check is here."""

    maker: FileMaker
    names: Sequence[str]
    expected: dict[str, str] = field(init=False)
    sent_at: dict[str, float] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    submitted: int = 0
    verified: int = 0
    first_send: float | None = None
    last_result: float | None = None

    def __post_init__(self) -> None:
        self.expected = {
            name: RESULT_PREFIX + self.maker.digest(name) for name in self.names
        }

    @property
    def open(self) -> int:
        """Files submitted and still without a result."""
        return len(self.sent_at)

    @property
    def finished(self) -> bool:
        return (
            self.submitted == len(self.names) and not self.sent_at and not self.sessions
        )

    def submitting(self, session_id: str, names: Sequence[str], when: float) -> None:
        """Called just before the SUBMIT_TASKS of ``names`` is written."""
        for name in names:
            self.sent_at[name] = when
        self.sessions[session_id] = len(names)
        self.submitted += len(names)
        if self.first_send is None:
            self.first_send = when

    def on_message(self, message: dict[str, Any], when: float) -> None:
        """Book one message from linkup, read at ``when``."""
        match message.get("type"):
            case "TASK_COMPLETED" | "TASK_FAILED":
                self._result(message, when)
            case "TASKS_SUBMITTED":
                expected = self.sessions.get(message.get("sessionId", ""))
                if message.get("taskCount") != expected:
                    self.problems.append(f"{message} for {expected} tasks")
            case "SESSION_COMPLETED":
                self._session_completed(message)
            case "ERROR":
                # The answer that was refused will never come: stop now.
                raise RuntimeError(f"linkup refused a request: {message}")

    def _result(self, message: dict[str, Any], when: float) -> None:
        name = message.get("filename", "")
        sent = self.sent_at.pop(name, None)
        if sent is None:
            self.problems.append(f"a result for a file not awaited: {message}")
            return
        self.last_result = when
        self.latencies.append(when - sent)
        if message["type"] == "TASK_FAILED":
            self.problems.append(f"TASK_FAILED: {message}")
        elif message.get("resultUrl") != self.expected[name]:
            self.problems.append(
                f"wrong result for {name}: {message.get('resultUrl')}, "
                f"expected {self.expected[name]}"
            )
        else:
            self.verified += 1

    def _session_completed(self, message: dict[str, Any]) -> None:
        count = self.sessions.pop(message.get("sessionId", ""), None)
        stats = message.get("stats", {})
        wanted = {"completed": count, "failed": 0, "total": count}
        if count is None or {key: stats.get(key) for key in wanted} != wanted:
            self.problems.append(f"{message}, expected stats {wanted}")

    def report(self) -> dict[str, Any]:
        problems = list(self.problems)
        if self.sent_at or self.submitted < len(self.names):
            problems.append(
                f"{len(self.sent_at)} files without a result, "
                f"{len(self.names) - self.submitted} never submitted"
            )
        if self.sessions:
            problems.append(f"{len(self.sessions)} sessions never completed")
        if len(problems) > MAX_REPORTED_PROBLEMS:
            extra = len(problems) - MAX_REPORTED_PROBLEMS
            problems = [*problems[:MAX_REPORTED_PROBLEMS], f"... and {extra} more"]
        return {
            "files": len(self.names),
            "verified": self.verified,
            "errors": problems,
            "latencies": self.latencies,
            "first_send": self.first_send,
            "last_result": self.last_result,
        }


def master_process(load: MasterLoad, events: Events, go: Any) -> None:
    """
    One master: reports ``master_ready`` once connected with a session and
    its files planned, starts on ``go`` (a multiprocessing Event), and
    reports ``master_done`` with its ResultBook's report.

    """
    maker = FileMaker(load.file_size, load.seed)
    book = ResultBook(maker, [file_name(load.number, i) for i in range(load.files)])
    errors: list[str] = []

    def ready() -> None:
        events.put(("master_ready", load.number, time.monotonic(), {}))

    try:
        if load.streamed:
            _streamed_master(load, book, ready, go)
        else:
            asyncio.run(_windowed_master(load, book, ready, go))
    except Exception as exc:
        errors.append(f"master {load.number}: {type(exc).__name__}: {exc}")
    report = book.report()
    report["errors"] = errors + report["errors"]
    events.put(("master_done", load.number, time.monotonic(), report | _own_cpu()))


async def _windowed_master(
    load: MasterLoad, book: ResultBook, ready: Callable[[], None], go: Any
) -> None:
    batches = [
        book.names[start : start + load.batch]
        for start in range(0, len(book.names), load.batch)
    ]
    async with _connect(load.url, load.timeout) as websocket:
        created: asyncio.Queue[str] = asyncio.Queue()
        room = asyncio.Event()

        async def receive() -> None:
            while not book.finished:
                raw = await websocket.recv(decode=False)
                when = time.monotonic()
                message = orjson.loads(raw)
                if message.get("type") == "SESSION_CREATED":
                    created.put_nowait(message["sessionId"])
                book.on_message(message, when)
                room.set()

        async def create_session() -> str:
            await websocket.send(CREATE_SESSION, text=True)
            return await created.get()

        async def submit(first_session: str) -> None:
            session_id = first_session
            for number, batch in enumerate(batches):
                if number:
                    # No lost wake-up: nothing runs between the test and clear().
                    while book.open and book.open + len(batch) > load.window:
                        room.clear()
                        await room.wait()
                    session_id = await create_session()
                message = b"".join(submit_parts(session_id, batch, book.maker))
                book.submitting(session_id, batch, time.monotonic())
                await websocket.send(message, text=True)

        receiver = asyncio.create_task(receive())
        # As the plugin: a session first, then the user picks the files.
        first_session = await asyncio.wait_for(create_session(), load.timeout)
        ready()
        if not await asyncio.to_thread(go.wait, load.timeout):
            raise TimeoutError("no go from the parent")
        submitter = asyncio.create_task(submit(first_session))
        done, _ = await asyncio.wait(
            {receiver, submitter},
            timeout=load.timeout,
            return_when=asyncio.FIRST_EXCEPTION,
        )
        for task in done:
            task.result()
        if receiver not in done:
            receiver.cancel()
            submitter.cancel()
            raise TimeoutError(f"results missing after {load.timeout:.0f}s")


def _streamed_master(
    load: MasterLoad, book: ResultBook, ready: Callable[[], None], go: Any
) -> None:
    deadline = time.monotonic() + load.timeout
    client = StreamingClient(load.url, timeout=load.timeout)
    try:
        client.send_json({"type": "CREATE_SESSION"})
        session_id = expect(client, "SESSION_CREATED", deadline)["sessionId"]
        parts = submit_parts(session_id, book.names, book.maker)
        ready()
        if not go.wait(load.timeout):
            raise TimeoutError("no go from the parent")
        book.submitting(session_id, book.names, time.monotonic())
        client.send_streamed_text(sum(map(len, parts)), iter(parts))
        # One message: nothing can come back before it has been written, so
        # reading only now delays no result.
        while not book.finished:
            message = client.receive(max(0.0, deadline - time.monotonic()))
            book.on_message(message, time.monotonic())
    finally:
        client.close()


# Workers.


@dataclass(frozen=True, slots=True)
class WorkerGroupLoad:
    number: int
    #: One URL per worker of the group.
    urls: tuple[str, ...]
    timeout: float


@dataclass(slots=True)
class WorkerTally:
    tasks: int = 0
    payload_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    def answer(self, task: dict[str, Any], data: memoryview) -> bytes:
        """The TASK_COMPLETED for one TASK_ASSIGNED: the hash of what arrived."""
        content = decode_base64(data)
        if len(content) != task.get("size"):
            self.problems.append(
                f"task {task.get('id')}: {len(content)} bytes, size {task.get('size')}"
            )
        self.tasks += 1
        self.payload_bytes += len(content)
        digest = hashlib.sha256(content).hexdigest()
        return orjson.dumps(
            {
                "type": "TASK_COMPLETED",
                "taskId": task["id"],
                "resultUrl": RESULT_PREFIX + digest,
            }
        )


def split_task(raw: bytes) -> tuple[dict[str, Any], memoryview]:
    """
    A message, parsed without its ``dataBase64`` string, and that string.

    Cutting the data out costs a search; parsing it as JSON would copy it into
    a Python str first. Base64 needs no JSON escapes, and a stray one would
    fail the strict decode, not pass unnoticed.

    """
    key = raw.find(DATA_KEY)
    if key < 0:
        return orjson.loads(raw), memoryview(b"")
    start = key + len(DATA_KEY)
    end = raw.index(b'"', start)
    return orjson.loads(raw[:start] + raw[end:]), memoryview(raw)[start:end]


def worker_group_process(
    group: WorkerGroupLoad, events: Events, stop: Connection
) -> None:
    """
    Workers for every URL of ``group``: reports ``workers_ready`` once all are
    registered, and ``workers_done`` (tasks, bytes, problems, CPU) once
    ``stop`` (the read end of a pipe) is readable, that is when the parent
    sends on it or closes it, or dies.

    """
    tally = WorkerTally()
    try:
        asyncio.run(_work(group, events, stop, tally))
    except Exception as exc:
        tally.problems.append(f"workers {group.number}: {type(exc).__name__}: {exc}")
    report = {
        "workers": len(group.urls),
        "tasks": tally.tasks,
        "payload_bytes": tally.payload_bytes,
        "errors": tally.problems[:MAX_REPORTED_PROBLEMS],
    }
    events.put(("workers_done", group.number, time.monotonic(), report | _own_cpu()))


async def _work(
    group: WorkerGroupLoad, events: Events, stop: Connection, tally: WorkerTally
) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_stop() -> None:
        loop.remove_reader(stop.fileno())
        stopping.set()

    loop.add_reader(stop.fileno(), on_stop)
    registered = [loop.create_future() for _ in group.urls]
    workers = [
        asyncio.create_task(_worker(url, tally, stopping, future, group.timeout))
        for url, future in zip(group.urls, registered, strict=True)
    ]
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*registered), group.timeout)
    events.put(
        (
            "workers_ready",
            group.number,
            time.monotonic(),
            {"seconds": round(time.monotonic() - started, 3)},
        )
    )
    await asyncio.gather(*workers)


async def _worker(
    url: str,
    tally: WorkerTally,
    stopping: asyncio.Event,
    registered: asyncio.Future[None],
    timeout: float,
) -> None:
    try:
        async with _connect(url, timeout) as websocket:
            await websocket.send(WORKER_REGISTER, text=True)
            chores = [
                asyncio.create_task(_heartbeats(websocket)),
                asyncio.create_task(_close_when_set(websocket, stopping)),
            ]
            try:
                await _serve(websocket, tally, registered)
            except ConnectionClosedOK:
                if not stopping.is_set():
                    raise
            finally:
                for chore in chores:
                    chore.cancel()
    except (OSError, TimeoutError, ConnectionClosed) as exc:
        if not registered.done():
            registered.set_exception(exc)
        tally.problems.append(f"worker on {url}: {type(exc).__name__}: {exc}")


async def _serve(
    websocket: ClientConnection, tally: WorkerTally, registered: asyncio.Future[None]
) -> None:
    while True:
        raw = await websocket.recv(decode=False)
        message, data = split_task(raw)
        match message.get("type"):
            case "TASK_ASSIGNED":
                await websocket.send(tally.answer(message["task"], data), text=True)
            case "WORKER_REGISTERED":
                if not registered.done():
                    registered.set_result(None)
            case "ERROR":
                tally.problems.append(f"ERROR to a worker: {message}")


async def _heartbeats(websocket: ClientConnection) -> None:
    # A timer, as in the plugin; it keeps a worker alive through a long
    # wait for its first task (a gigabyte message on its way, for instance).
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        await websocket.send(WORKER_HEARTBEAT, text=True)


async def _close_when_set(websocket: ClientConnection, stopping: asyncio.Event) -> None:
    await stopping.wait()
    await websocket.close()
