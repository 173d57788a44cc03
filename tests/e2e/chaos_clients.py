"""
The clients of the chaos test (test_chaos.py): a master that records every
outcome it hears, and a fleet of worker processes (chaos_worker.py).

Not a test module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.chaos_worker import REGISTERED, STANDING_BY
from tests.e2e.harness import TIMEOUT, Process

# What a master hears about each of its files once it has an outcome.
RESULTS = ("TASK_COMPLETED", "TASK_FAILED")
# The messages the core keeps per session and RESUME_SESSION's ``after``
# counts: every result, and the end of the session.
OUTCOMES = (*RESULTS, "SESSION_COMPLETED")

RECONNECT_DELAY = 0.2


@dataclass(slots=True)
class Outcome:
    message: dict[str, Any]
    #: Arrived as part of a RESUME_SESSION replay, not live.
    replayed: bool
    #: Which of the master's connections it arrived on, counting from 1.
    connection: int
    at: float


@dataclass
class Master:
    """
    A master plugin with linkup's own client behaviour: if the bridge closes
    its connection it reconnects and sends ``RESUME_SESSION`` with ``after``
    set to the number of outcome messages it already has.

    """

    url: str
    websocket: ClientConnection | None = None
    session_id: str | None = None
    #: Every outcome message, in the order received.
    outcomes: list[Outcome] = field(default_factory=list)
    #: Result messages per task id; more than one is a doubled task.
    by_task: dict[str, list[Outcome]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )
    submitted: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: (close code, reason) of each connection the bridge closed.
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)
    resumed: list[dict[str, Any]] = field(default_factory=list)
    #: What the closing RESUME_SESSION (:meth:`final_check`) replayed.
    final_replay: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    opened_at: float = 0.0
    _replays_left: int = 0
    _resuming: bool = False
    _resume_after: int = 0
    _final: bool = False
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    # Reading the record.

    @property
    def result_count(self) -> int:
        """Distinct tasks with a result."""
        return len(self.by_task)

    @property
    def session_completions(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.message["type"] == "SESSION_COMPLETED"]

    @property
    def finished(self) -> bool:
        return bool(self.session_completions)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    # Talking.

    async def open(self) -> str:
        self.opened_at = time.monotonic()
        await self._connect()
        await self._send({"type": "CREATE_SESSION"})
        while True:
            message = await self._receive()
            if message["type"] == "SESSION_CREATED":
                self.session_id = message["sessionId"]
                return self.session_id
            if message["type"] == "ERROR":
                raise AssertionError(f"CREATE_SESSION refused: {message}")

    async def submit(self, tasks: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """
        Send one SUBMIT_TASKS and wait for its TASKS_SUBMITTED; needs
        :meth:`run` running.

        """
        answered = len(self.submitted)
        errors = len(self.errors)
        await self._send(
            {"type": "SUBMIT_TASKS", "sessionId": self.session_id, "tasks": tasks}
        )
        async with asyncio.timeout(TIMEOUT):
            await self.wait_until(
                lambda: len(self.submitted) > answered or len(self.errors) > errors
            )
        if len(self.errors) > errors:
            raise AssertionError(f"SUBMIT_TASKS refused: {self.errors[errors:]}")
        return self.submitted[answered]

    async def run(self) -> None:
        """
        Receive until cancelled, resuming the session whenever the bridge
        closes the connection.

        """
        while True:
            try:
                message = await self._receive()
            except ConnectionClosed as closed:
                rcvd = closed.rcvd
                self.closes.append(
                    (None, None) if rcvd is None else (rcvd.code, rcvd.reason)
                )
                await self._resume()
                continue
            await self._handle(message)

    async def final_check(self) -> dict[str, Any]:
        """
        Send RESUME_SESSION on the open connection, with ``after`` the number
        of outcomes received, and return its SESSION_RESUMED.

        A barrier (the core has sent all it had for the session) and a check:
        the SESSION_RESUMED says how many outcomes the core holds. Whatever it
        replays goes to :attr:`final_replay`, not to the record.

        """
        resumes = len(self.resumed)
        self._final = True
        await self.send_resume()
        await self.wait_until(lambda: len(self.resumed) > resumes)
        return self.resumed[-1]

    async def close(self) -> None:
        if self.websocket is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.websocket.close(), 2)

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if self._final and kind in OUTCOMES:
            self.final_replay.append(message)
        elif kind in OUTCOMES:
            replayed = self._replays_left > 0
            self._replays_left -= replayed
            outcome = Outcome(message, replayed, self.connections, time.monotonic())
            self.outcomes.append(outcome)
            if kind in RESULTS:
                self.by_task[message["taskId"]].append(outcome)
        elif kind == "TASKS_SUBMITTED":
            self.submitted.append(message)
        elif kind == "SESSION_RESUMED":
            self._resuming = False
            self.resumed.append(message)
            self._replays_left = message["results"] - self._resume_after
        elif kind == "ERROR":
            if self._resuming:
                # The core may be away too: ask again in a moment.
                await asyncio.sleep(RECONNECT_DELAY)
                await self.send_resume()
            else:
                self.errors.append(message)
        async with self._changed:
            self._changed.notify_all()

    async def _resume(self) -> None:
        while True:
            await asyncio.sleep(RECONNECT_DELAY)
            try:
                await self._connect()
                await self.send_resume()
                return
            except (OSError, ConnectionClosed, TimeoutError):
                continue

    async def send_resume(self) -> None:
        self._resuming = True
        self._resume_after = len(self.outcomes)
        await self._send(
            {
                "type": "RESUME_SESSION",
                "sessionId": self.session_id,
                "after": self._resume_after,
            }
        )

    async def _connect(self) -> None:
        self.websocket = await connect(
            self.url, max_size=None, compression=None, open_timeout=TIMEOUT
        )
        self.connections += 1

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.websocket is not None
        await self.websocket.send(json.dumps(message))

    async def _receive(self) -> dict[str, Any]:
        assert self.websocket is not None
        return json.loads(await self.websocket.recv())  # type: ignore[no-any-return]


@dataclass
class WorkerProcess:
    process: Process
    urls: tuple[str, ...]
    upload_log: Path
    #: For a spare: the file whose creation calls it in.
    call_in: Path | None = None

    def standing_by(self) -> bool:
        return STANDING_BY in self.process.log()

    def registrations(self) -> int:
        return self.process.log().count(f" {REGISTERED} ")

    def current_url(self) -> str | None:
        """The URL of the bridge it last connected to, per its log."""
        connected = [
            line.rsplit("url=", 1)[1]
            for line in self.process.log().splitlines()
            if " connected url=" in line
        ]
        return connected[-1] if connected else None


class WorkerFleet:
    """
    Worker processes, started with ``start`` (a Deployment's), which keeps
    them for teardown.

    """

    def __init__(self, start: Callable[..., Process], log_dir: Path) -> None:
        self._start = start
        self.log_dir = log_dir
        self.live: list[WorkerProcess] = []
        self.spares: list[WorkerProcess] = []
        self.killed: list[WorkerProcess] = []
        self._numbers = iter(range(1, 1000))

    def start(self, urls: Sequence[str], *, spare: bool = False) -> WorkerProcess:
        """
        Start a worker, or a spare that waits for :meth:`call_in`.

        """
        number = next(self._numbers)
        upload_log = self.log_dir / f"uploads-{number}.log"
        call_in = self.log_dir / f"call-in-{number}" if spare else None
        process = self._start(
            f"worker-{number}",
            "-m",
            "tests.e2e.chaos_worker",
            "--upload-log",
            str(upload_log),
            "--seed",
            str(number),
            *(["--standby", str(call_in)] if call_in else []),
            *urls,
        )
        worker = WorkerProcess(process, tuple(urls), upload_log, call_in)
        (self.spares if spare else self.live).append(worker)
        return worker

    def call_in(self, urls: Sequence[str]) -> WorkerProcess:
        """Put a spare started for ``urls`` to work."""
        spare = next(w for w in self.spares if w.urls == tuple(urls))
        assert spare.call_in is not None
        spare.call_in.touch()
        self.spares.remove(spare)
        self.live.append(spare)
        return spare

    def kill9(self, worker: WorkerProcess) -> None:
        worker.process.kill9()
        self.live.remove(worker)
        self.killed.append(worker)

    def uploads(self) -> collections.Counter[str]:
        """How many times each task id was uploaded, over every worker."""
        counts: collections.Counter[str] = collections.Counter()
        for worker in (*self.killed, *self.live):
            if worker.upload_log.exists():
                counts.update(worker.upload_log.read_text().split())
        return counts
