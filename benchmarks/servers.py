"""
What the load is driven against, as real processes on free ports: ``linkup``
(the launcher: one core, one bridge), ``split`` (``linkup-core`` and two
``linkup-bridge``), or ``relay`` (the reference, benchmarks/relay.py).

Each target gets a fresh work dir (data dir and logs), removed when it stops,
and is measured through psutil handles on the processes that do the work.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.processes import free_port, wait_ready
from benchmarks.queued_memory import (
    linkup_children,
    read_hwm,
    reset_hwm,
    stop_process,
)

__all__ = ["TARGETS", "ProcessMeter", "Target", "start_target"]

TARGETS = ("linkup", "split", "relay")
STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 30


@dataclass(frozen=True, slots=True)
class Target:
    kind: str
    #: WebSocket URLs; clients are spread over them round-robin.
    urls: tuple[str, ...]
    #: The processes that do the work, by role: core, bridge, bridge-2, relay.
    processes: dict[str, psutil.Process]
    logs: tuple[Path, ...]

    def alive(self) -> bool:
        return all(
            process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            for process in self.processes.values()
        )

    def log_tail(self) -> str:
        tails = []
        for log in self.logs:
            lines = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            tails.append(f"--- {log.name}, last lines:\n" + "\n".join(lines))
        return "\n".join(tails)


@contextlib.contextmanager
def start_target(
    kind: str, max_message_size: int, linkup_args: Sequence[str] = ()
) -> Iterator[Target]:
    """
    Start ``kind``, wait until it answers /readyz, yield it, stop it.
    ``linkup_args`` go to every linkup process (not to the relay).

    """
    python = sys.executable
    size = str(max_message_size)
    with tempfile.TemporaryDirectory(prefix=f"linkup-bench-{kind}-") as work:
        work_dir = Path(work)
        started: list[subprocess.Popen[bytes]] = []

        def launch(name: str, arguments: Sequence[str]) -> subprocess.Popen[bytes]:
            with (work_dir / f"{name}.log").open("wb") as log:
                process = subprocess.Popen(
                    [python, *arguments], stdout=log, stderr=subprocess.STDOUT
                )
            started.append(process)
            return process

        try:
            if kind == "linkup":
                port = free_port()
                launcher = launch(
                    "linkup",
                    [
                        *("-m", "linkup", str(port), "--host", "127.0.0.1"),
                        *("--data-dir", str(work_dir / "data")),
                        *("--max-message-size", size, "--core-metrics-port", "0"),
                        *linkup_args,
                    ],
                )
                wait_ready(port, launcher)
                core, bridge = linkup_children(launcher.pid)
                processes = {"core": core, "bridge": bridge}
                ports = [port]
            elif kind == "split":
                link = f"tcp://127.0.0.1:{free_port()}"
                core_process = launch(
                    "core",
                    [
                        *("-m", "core", "--bind", link, "--metrics-port", "0"),
                        *("--data-dir", str(work_dir / "data")),
                        *linkup_args,
                    ],
                )
                processes = {"core": psutil.Process(core_process.pid)}
                ports = []
                for number in (1, 2):
                    port = free_port()
                    bridge_process = launch(
                        f"bridge-{number}",
                        [
                            *("-m", "bridge", "--core", link, "--host", "127.0.0.1"),
                            *("--port", str(port), "--max-message-size", size),
                            *linkup_args,
                        ],
                    )
                    wait_ready(port, bridge_process)
                    name = "bridge" if number == 1 else f"bridge-{number}"
                    processes[name] = psutil.Process(bridge_process.pid)
                    ports.append(port)
            elif kind == "relay":
                port = free_port()
                relay = launch(
                    "relay",
                    ["-m", "benchmarks.relay", str(port), "--max-message-size", size],
                )
                wait_ready(port, relay)
                processes = {"relay": psutil.Process(relay.pid)}
                ports = [port]
            else:
                raise ValueError(f"unknown target {kind!r}")
            yield Target(
                kind,
                tuple(f"ws://127.0.0.1:{port}" for port in ports),
                processes,
                tuple(sorted(work_dir.glob("*.log"))),
            )
        finally:
            # Bridges before the core, as an operator would.
            for process in reversed(started):
                stop_process(process, STOP_TIMEOUT)


class ProcessMeter:
    """
    CPU time (user + system) of named processes between start() and stop(),
    and their peak RSS over the same window (VmHWM, the kernel's own peak,
    reset at start() where the kernel allows it; else since the process began).

    """

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self._cpu_at_start: dict[str, float | None] = {}
        self.peak_since_start = False

    def start(self, track_memory: bool = True) -> None:
        if track_memory:
            self.peak_since_start = all(
                [reset_hwm(process) for process in self.processes.values()]
            )
        self._cpu_at_start = {
            name: _cpu(process) for name, process in self.processes.items()
        }

    def stop(self, ended: dict[str, float] | None = None) -> dict[str, Any]:
        """
        CPU seconds and peak RSS (None if unknown) by name. ``ended``: the
        total CPU seconds of processes that may have exited already, as they
        reported them on their way out.

        """
        ended = ended or {}
        cpu = {}
        for name, process in self.processes.items():
            total = ended.get(name)
            if total is None:
                total = _cpu(process)
            start = self._cpu_at_start.get(name)
            cpu[name] = None if total is None or start is None else total - start
        peak = {name: read_hwm(process) for name, process in self.processes.items()}
        return {
            "cpu_seconds": {
                name: None if value is None else round(value, 3)
                for name, value in cpu.items()
            },
            "peak_rss": peak,
        }


def _cpu(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)
