"""
Fixtures that start real linkup processes on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import UNIT, Plugin, Process, free_port, wait_ready
from tests.e2e.protocol_helpers import open_clients


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


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path)
    yield deployment
    deployment.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for process in deployment.processes:
            print(f"----- {process.name} log -----\n{process.log()}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    # Keep each phase's report on the test item, so that fixtures can print
    # the processes' logs when the test itself failed.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def linkup_url(deployment: Deployment) -> Callable[..., str]:
    def start(*options: str) -> str:
        _, port = deployment.linkup(*options)
        return f"ws://127.0.0.1:{port}"

    return start


@pytest.fixture
async def close_plugins(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    """
    Close every client a test opened, even when it failed half-way, before
    the deployment stops: a bridge waits for its clients' closing handshake.

    """
    opened: list[Plugin] = []
    connect = Plugin.connect.__func__  # type: ignore[attr-defined]

    async def tracked(cls: type[Plugin], url: str) -> Plugin:
        plugin = await connect(cls, url)
        opened.append(plugin)
        return plugin

    monkeypatch.setattr(Plugin, "connect", classmethod(tracked))
    yield
    for plugin in opened:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(plugin.close(), 2 * UNIT)


@pytest.fixture
async def start(linkup_url: Callable[..., str]) -> AsyncIterator[Any]:
    """
    ``start(*options)``: a new linkup with those options, and a Clients for it
    that closes every connection at teardown.

    """
    async with open_clients(linkup_url) as start:
        yield start
