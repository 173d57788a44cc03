"""
Shared helpers for the plugin-protocol end-to-end tests (test_protocol_*.py).

Not a test module: pytest does not collect it. Each test file turns
:func:`open_clients` into a fixture, so that every WebSocket a test opens is
closed at teardown, while its linkup is still running.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tests.e2e.harness import TIMEOUT, UNIT, Plugin, http_get

T = TypeVar("T")

# What a master hears about each of its files, once it has an outcome.
RESULTS = ("TASK_COMPLETED", "TASK_FAILED")


# Files and tasks.


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def result_url_for(data: bytes) -> str:
    """
    The URL a simulated worker reports for ``data``: derived from its content.

    """
    return f"https://img.example/{sha256_hex(data)}"


def make_task(
    filename: str, data: bytes, mime_type: str = "image/png"
) -> dict[str, Any]:
    """
    One entry of ``SUBMIT_TASKS.tasks``, as the plugin builds it.

    """
    return {
        "filename": filename,
        "mimeType": mime_type,
        "dataBase64": base64.b64encode(data).decode("ascii"),
        "size": len(data),
    }


# Talking to linkup.


class Clients:
    """
    Plugin connections opened during one test, all closed at its end.

    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.plugins: list[Plugin] = []

    async def connect(self, url: str | None = None) -> Plugin:
        plugin = await Plugin.connect(url or self.url)
        self.plugins.append(plugin)
        return plugin

    async def worker(self) -> tuple[Plugin, str]:
        """
        A registered worker and its id.

        """
        worker = await self.connect()
        await worker.send("WORKER_REGISTER")
        registered = await worker.expect("WORKER_REGISTERED")
        assert isinstance(registered["workerId"], str), registered
        assert registered["workerId"], registered
        return worker, registered["workerId"]

    async def master(self) -> tuple[Plugin, str, dict[str, Any]]:
        """
        A master with an open session: the plugin, the session id, serverStats.

        """
        master = await self.connect()
        await master.send("CREATE_SESSION")
        created = await master.expect("SESSION_CREATED")
        assert isinstance(created["sessionId"], str), created
        assert created["sessionId"], created
        return master, created["sessionId"], created["serverStats"]

    async def close(self) -> None:
        # All at once, and briefly: a test that failed may leave linkup unable
        # to answer a close, and teardown should not wait long for it.
        for plugin in self.plugins:
            plugin.websocket.close_timeout = UNIT
        await asyncio.gather(
            *(plugin.close() for plugin in self.plugins), return_exceptions=True
        )


@contextlib.asynccontextmanager
async def open_clients(
    linkup_url: Callable[..., str],
) -> AsyncIterator[Callable[..., Awaitable[Clients]]]:
    """
    Yield ``start(*options)``: start a linkup with ``options``, return Clients.

    """
    opened: list[Clients] = []

    async def start(*options: str) -> Clients:
        # Starting a process blocks; keep the event loop free meanwhile.
        url = await asyncio.to_thread(linkup_url, *options)
        clients = Clients(url)
        opened.append(clients)
        return clients

    try:
        yield start
    finally:
        for clients in opened:
            await clients.close()


async def submit(
    master: Plugin, session_id: str, tasks: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """
    Send ``SUBMIT_TASKS`` and return its ``TASKS_SUBMITTED`` answer.

    """
    await master.send("SUBMIT_TASKS", sessionId=session_id, tasks=list(tasks))
    submitted = await master.expect("TASKS_SUBMITTED")
    assert submitted["sessionId"] == session_id, submitted
    assert submitted["taskCount"] == len(tasks), submitted
    return submitted


async def get_stats(plugin: Plugin) -> dict[str, Any]:
    """
    Ask ``GET_STATS`` and return the answer's ``stats``.

    Pushed ``STATS_UPDATE`` messages already received are dropped first, so
    that the answer is not mistaken for an older push. Call it only when no
    worker is joining or leaving.

    """
    plugin.backlog[:] = [m for m in plugin.backlog if m["type"] != "STATS_UPDATE"]
    await plugin.send("GET_STATS")
    update = await plugin.expect("STATS_UPDATE")
    return update["stats"]


async def expect_stats(
    plugin: Plugin, timeout: float = TIMEOUT, **expected: Any
) -> dict[str, Any]:
    """
    Wait for a pushed ``STATS_UPDATE`` whose stats have the ``expected`` values.

    Earlier updates that do not match are skipped.

    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while True:
        remaining = deadline - loop.time()
        try:
            update = await plugin.expect("STATS_UPDATE", timeout=max(remaining, 0))
        except TimeoutError:
            raise AssertionError(
                f"no STATS_UPDATE with {expected} within {timeout}s; saw {seen}"
            ) from None
        stats = update["stats"]
        if all(stats.get(key) == value for key, value in expected.items()):
            return stats
        seen.append(stats)


async def expect_error(plugin: Plugin, code: str) -> dict[str, Any]:
    """
    Wait for an ``ERROR`` and check its shape and code.

    """
    error = await plugin.expect("ERROR")
    assert error["code"] == code, error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    return error


async def expect_silence(plugin: Plugin, *message_types: str, within: float) -> None:
    """
    Assert that none of ``message_types`` arrives within ``within`` seconds.

    """
    try:
        message = await plugin.expect(*message_types, timeout=within)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected {message}")


def types_in_backlog(plugin: Plugin) -> list[str]:
    return [message["type"] for message in plugin.backlog]


async def assert_still_served(*plugins: Plugin) -> None:
    """
    Each plugin's connection still answers ``GET_STATS`` and got no ``ERROR``.

    Results come back in order, so an ``ERROR`` caused by anything sent
    before would already be in the backlog once the answer is in.

    """
    for plugin in plugins:
        await get_stats(plugin)
        assert "ERROR" not in types_in_backlog(plugin), plugin.backlog


async def expect_assignment(
    workers: Sequence[Plugin], timeout: float = TIMEOUT
) -> tuple[Plugin, dict[str, Any]]:
    """
    The first ``TASK_ASSIGNED`` that any of ``workers`` receives, and who.

    """
    waits = {
        asyncio.ensure_future(worker.expect("TASK_ASSIGNED", timeout=timeout)): worker
        for worker in workers
    }
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    # Two may finish together: keep the others' messages for later.
    winner = next(iter(done))
    for wait in done:
        if wait is not winner and wait.exception() is None:
            waits[wait].backlog.insert(0, wait.result())
    return waits[winner], winner.result()


# Background tasks: workers and heartbeats.


@contextlib.asynccontextmanager
async def in_background(
    *coroutines: Awaitable[Any],
) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """
    Run ``coroutines`` as tasks for the duration of the block, then cancel them.

    A task that failed makes the block fail with its exception.

    """
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            raise result


async def watching(background: Iterable[asyncio.Task[Any]], main: Awaitable[T]) -> T:
    """
    Await ``main``, failing at once if a background task ends before it.

    """
    main_task = asyncio.ensure_future(main)
    tasks = list(background)
    done, _ = await asyncio.wait(
        [main_task, *tasks], return_when=asyncio.FIRST_COMPLETED
    )
    if main_task in done:
        return main_task.result()
    main_task.cancel()
    await asyncio.gather(main_task, return_exceptions=True)
    for task in done:
        task.result()  # raises the background task's failure
    raise AssertionError(f"background task ended early: {done}")


async def heartbeat(worker: Plugin, interval: float = 0.2 * UNIT) -> None:
    """
    Send ``WORKER_HEARTBEAT`` every ``interval`` seconds, like the plugin.

    """
    while True:
        await worker.send("WORKER_HEARTBEAT")
        await asyncio.sleep(interval)


@dataclass(frozen=True)
class Upload:
    """
    What a simulated worker received in one ``TASK_ASSIGNED``.

    """

    task_id: str
    filename: str
    mime_type: str
    digest: str


async def upload_forever(
    worker: Plugin, uploads: list[Upload], rng: random.Random, upload_time: float
) -> None:
    """
    Act as a plugin worker until cancelled: decode, "upload", report the URL.

    The upload takes up to ``upload_time`` seconds, during which no second
    ``TASK_ASSIGNED`` may arrive: one task at a time per worker.

    """
    while True:
        try:
            assigned = await worker.expect("TASK_ASSIGNED", timeout=TIMEOUT)
        except TimeoutError:
            continue  # idle; the test cancels this task when done
        task = assigned["task"]
        data = base64.b64decode(task["dataBase64"], validate=True)
        assert len(data) == task["size"], task["filename"]
        uploads.append(
            Upload(task["id"], task["filename"], task["mimeType"], sha256_hex(data))
        )
        await worker.expect_nothing("TASK_ASSIGNED", within=rng.uniform(0, upload_time))
        await worker.send(
            "TASK_COMPLETED", taskId=task["id"], resultUrl=result_url_for(data)
        )


async def collect_results(
    master: Plugin,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """
    A master's results in order of arrival, up to its ``SESSION_COMPLETED``.

    """
    results = []
    while True:
        message = await master.expect(*RESULTS, "SESSION_COMPLETED")
        if message["type"] == "SESSION_COMPLETED":
            return results, message
        results.append(message)


# HTTP.


def http_url(ws_url: str, path: str) -> str:
    return ws_url.replace("ws://", "http://", 1) + path


async def fetch(ws_url: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """
    GET ``path`` on the port of ``ws_url``, off the event loop.

    """
    return await asyncio.to_thread(http_get, http_url(ws_url, path))


def header(headers: dict[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    raise AssertionError(f"no {name} header in {headers}")
