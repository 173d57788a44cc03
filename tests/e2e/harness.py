"""
Real linkup processes and plugin-like WebSocket clients for end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

# Every wait in the end-to-end tests is a multiple of this, so that a slow CI
# machine can be given more time without touching the tests.
UNIT = float(os.environ.get("LINKUP_TEST_TIME_UNIT", "1.0"))
TIMEOUT = 10 * UNIT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = TIMEOUT) -> tuple[int, dict[str, str], bytes]:
    """
    GET ``url``; return status, headers and body, whatever the status.

    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class Process:
    """
    One linkup command running as a child process, its stderr kept in a file.

    """

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        #: Where the process serves the core's Prometheus metrics, if it does.
        self.metrics_port: int | None = None
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, *self.argv],
            stdout=subprocess.PIPE,
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def kill9(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(TIMEOUT)

    def stop(self, timeout: float = TIMEOUT) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        return self.popen.returncode

    def wait_for_log(self, text: str, timeout: float = TIMEOUT) -> None:
        """
        Wait until ``text`` appears in this process's log.

        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in {self.name} log:\n{self.log()}")


def read_stdout_until(process: Process, *texts: str, timeout: float = TIMEOUT) -> str:
    """
    Read ``process``'s stdout until every one of ``texts`` has appeared.

    """
    assert process.popen.stdout is not None
    fd = process.popen.stdout.fileno()
    output = b""
    deadline = time.monotonic() + timeout
    while not all(text in output.decode(errors="replace") for text in texts):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                f"{texts!r} not all printed within {timeout}s; stdout:\n"
                f"{output.decode(errors='replace')}\nstderr:\n{process.log()}"
            )
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(
                    f"stdout closed before {texts!r}; stdout:\n"
                    f"{output.decode(errors='replace')}\nstderr:\n{process.log()}"
                )
            output += chunk
    return output.decode(errors="replace")


# Fast link supervision, so that a lost peer is noticed within a second or so.
FAST_LINK = ("--heartbeat-interval", "0.2", "--link-timeout", "1")
# Comfortably more than that link timeout, far less than the defaults' 3 s.
NOTICE_WITHIN = 5 * UNIT


async def eventually(check: Any, what: str, timeout: float = NOTICE_WITHIN) -> Any:
    """
    Poll the async ``check`` until it returns something truthy, and return it;
    fail after ``timeout`` naming ``what`` and the last answer.

    For state that announces no change, such as a metric.

    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout}s; last: {last}")


async def wait_for_close(plugin: Plugin, timeout: float = NOTICE_WITHIN) -> int | None:
    """
    Read until the server closes ``plugin``'s connection; return its close code.

    None means that the connection broke without a close frame.

    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"connection still open after {timeout}s")
        try:
            await asyncio.wait_for(plugin.websocket.recv(), remaining)
        except TimeoutError:
            continue
        except ConnectionClosed as closed:
            return None if closed.rcvd is None else closed.rcvd.code


def wait_ready(port: int, process: Process, timeout: float = TIMEOUT) -> None:
    """
    Wait until the bridge on ``port`` answers /readyz with 200.

    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise AssertionError(f"{process.name} exited early:\n{process.log()}")
        with contextlib.suppress(OSError):
            status, _, _ = http_get(f"http://127.0.0.1:{port}/readyz", timeout=1)
            if status == 200:
                return
        time.sleep(0.05)
    raise AssertionError(f"bridge on {port} not ready:\n{process.log()}")


class Plugin:
    """
    A WebSocket client speaking the plugin's JSON protocol.

    Messages that a test did not ask for yet are kept, in order, so that a
    test can wait for one type while others arrive.

    """

    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self.backlog: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str) -> Plugin:
        websocket = await connect(url, max_size=None, compression=None)
        return cls(websocket)

    async def send(self, message_type: str, **fields: Any) -> None:
        await self.websocket.send(json.dumps({"type": message_type, **fields}))

    async def send_raw(self, data: str | bytes) -> None:
        await self.websocket.send(data)

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.pop(0)
        async with asyncio.timeout(timeout):  # not wait_for: see expect()
            raw = await self.websocket.recv()
        return json.loads(raw)

    async def expect(
        self, *message_types: str, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """
        Return the first message of one of ``message_types``, keeping others.

        """
        for index, message in enumerate(self.backlog):
            if message["type"] in message_types:
                return self.backlog.pop(index)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(
                    f"no {message_types} within {timeout}s; got {self.backlog}"
                )
            # asyncio.timeout, not wait_for: on Python 3.11, wait_for can
            # swallow a cancellation that meets an arriving message, and a
            # background loop around expect() would then never stop.
            try:
                async with asyncio.timeout(remaining):
                    raw = await self.websocket.recv()
            except TimeoutError:
                raise TimeoutError(
                    f"no {message_types} within {timeout}s; got {self.backlog}"
                ) from None
            message = json.loads(raw)
            if message["type"] in message_types:
                return message
            self.backlog.append(message)

    async def expect_nothing(self, message_type: str, within: float) -> None:
        """
        Assert that no ``message_type`` arrives within ``within`` seconds.

        Use sparingly: it waits the whole time by design.

        """
        with contextlib.suppress(TimeoutError):
            message = await self.expect(message_type, timeout=within)
            raise AssertionError(f"unexpected {message}")

    async def close(self) -> None:
        await self.websocket.close()


async def register_worker(url: str) -> tuple[Plugin, str]:
    worker = await Plugin.connect(url)
    await worker.send("WORKER_REGISTER")
    registered = await worker.expect("WORKER_REGISTERED")
    return worker, registered["workerId"]


async def create_session(url: str) -> tuple[Plugin, str, dict[str, Any]]:
    master = await Plugin.connect(url)
    await master.send("CREATE_SESSION")
    created = await master.expect("SESSION_CREATED")
    return master, created["sessionId"], created["serverStats"]


class Deployment:
    """
    Processes started for one test; all stopped at teardown.

    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: list[Process] = []

    def start(self, name: str, *argv: str) -> Process:
        process = Process(name, argv, self.log_dir)
        self.processes.append(process)
        return process

    def data_dir_options(self, options: tuple[str, ...], name: str) -> list[str]:
        """
        A data dir of this test's own, unless ``options`` choose storage.

        """
        if "--memory" in options or "--data-dir" in options:
            return []
        return ["--data-dir", str(self.log_dir / f"data-{name}")]

    def metrics_options(self, options: tuple[str, ...], option: str) -> list[str]:
        """
        The core's metrics on a free port, unless ``options`` choose one: its
        default could be taken by another test's process.

        """
        return [] if option in options else [option, str(free_port())]

    def linkup(self, *options: str) -> tuple[Process, int]:
        """
        Start ``linkup PORT`` on loopback; return it once ready, and its port.

        """
        port = free_port()
        metrics = self.metrics_options(options, "--core-metrics-port")
        options = (*self.data_dir_options(options, str(port)), *metrics, *options)
        process = self.start(
            f"linkup-{port}",
            "-m",
            "linkup",
            str(port),
            "--host",
            "127.0.0.1",
            "--log-level",
            "DEBUG",
            *options,
        )
        process.metrics_port = _metrics_port(options, "--core-metrics-port")
        wait_ready(port, process)
        return process, port

    def core(self, *options: str, endpoint: str | None = None) -> tuple[Process, str]:
        """
        Start linkup-core on ``endpoint`` (a free port by default).

        """
        endpoint = endpoint or f"tcp://127.0.0.1:{free_port()}"
        name = endpoint.rsplit(":", 1)[-1].replace("/", "_")
        metrics = self.metrics_options(options, "--metrics-port")
        options = (*self.data_dir_options(options, f"core-{name}"), *metrics, *options)
        process = self.start(
            f"core-{len(self.processes)}",
            "-m",
            "core",
            "--bind",
            endpoint,
            "--log-level",
            "DEBUG",
            *options,
        )
        process.metrics_port = _metrics_port(options, "--metrics-port")
        return process, endpoint

    def bridge(
        self, core: str, *options: str, wait: bool = True
    ) -> tuple[Process, int]:
        port = free_port()
        process = self.start(
            f"bridge-{port}",
            "-m",
            "bridge",
            "--core",
            core,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "DEBUG",
            *options,
        )
        if wait:
            wait_ready(port, process)
        return process, port

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def _metrics_port(options: tuple[str, ...], option: str) -> int | None:
    port = int(options[options.index(option) + 1])
    return port or None
