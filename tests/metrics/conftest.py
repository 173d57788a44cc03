"""
Fixtures for the metrics tests: real linkup processes, and a real Prometheus.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import TIMEOUT, free_port, http_get
from tests.metrics.support import START_PROMETHEUS, in_ci


class Prometheus:
    """
    A running Prometheus that scrapes the targets of a file_sd file.

    Args:
        url: Its base URL.
        targets: The file_sd JSON file it reads its targets from.

    """

    def __init__(self, url: str, targets: Path) -> None:
        self.url = url.rstrip("/")
        self.targets = targets

    def api(self, path: str, **params: str) -> Any:
        """
        GET ``/api/v1/<path>`` and return its ``data``.

        """
        query = urllib.parse.urlencode(params)
        status, _, body = http_get(f"{self.url}/api/v1/{path}?{query}", timeout=5)
        answer = json.loads(body)
        assert status == 200, answer
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """
        Evaluate ``expr`` now; return its samples (a scalar as one sample).

        """
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def _read_groups(self) -> list[dict[str, Any]]:
        try:
            groups = json.loads(self.targets.read_text())
        except FileNotFoundError:
            return []
        assert isinstance(groups, list), groups
        return groups

    def _write_groups(self, groups: list[dict[str, Any]]) -> None:
        # Prometheus may read the file at any moment: never let it see half.
        new = self.targets.with_name(f".{self.targets.name}.{os.getpid()}.new")
        new.write_text(json.dumps(groups, indent=2))
        os.replace(new, self.targets)

    def add_targets(self, groups: list[dict[str, Any]]) -> None:
        """
        Add file_sd target groups, keeping whatever else the file lists.

        """
        self._write_groups([*self._read_groups(), *groups])

    def remove_targets(self, addresses: set[str]) -> None:
        """
        Remove every group listing one of ``addresses`` from the file.

        """
        kept = [
            group
            for group in self._read_groups()
            if not addresses & set(group.get("targets", []))
        ]
        self._write_groups(kept)


def _start_own_prometheus(binary: str) -> tuple[Prometheus, int, Path]:
    # A new directory of its own, whatever the environment says: it is
    # removed at teardown.
    env = {k: v for k, v in os.environ.items() if k != "LINKUP_PROMETHEUS_DIR"}
    started = subprocess.run(
        ["bash", str(START_PROMETHEUS)],
        env={
            **env,
            "LINKUP_PROMETHEUS_PORT": str(free_port()),
            "LINKUP_PROMETHEUS_BIN": binary,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    values = {}
    for line in started.stdout.splitlines():
        name, _, value = line.partition("=")
        (values[name],) = shlex.split(value)
    prometheus = Prometheus(
        values["LINKUP_PROMETHEUS_URL"], Path(values["LINKUP_PROMETHEUS_TARGETS"])
    )
    return (
        prometheus,
        int(values["LINKUP_PROMETHEUS_PID"]),
        Path(values["LINKUP_PROMETHEUS_DIR"]),
    )


def _gone(pid: int) -> bool:
    # Not our child (the script that started it has exited), so it cannot be
    # waited for: gone once it no longer exists, or is a zombie that its new
    # parent has yet to reap.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def _stop(pid: int, directory: Path) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + TIMEOUT
    while not _gone(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def prometheus() -> Iterator[Prometheus]:
    """
    The Prometheus that CI started (LINKUP_PROMETHEUS_URL and
    LINKUP_PROMETHEUS_TARGETS, from .ci/start-prometheus), else one of our
    own started with .ci/start-prometheus on a free port. Without either,
    the test is skipped, or fails if CI is set.

    """
    url = os.environ.get("LINKUP_PROMETHEUS_URL")
    targets = os.environ.get("LINKUP_PROMETHEUS_TARGETS")
    if url and targets:
        yield Prometheus(url, Path(targets))
        return
    binary = shutil.which(os.environ.get("LINKUP_PROMETHEUS_BIN", "prometheus"))
    if binary is None:
        message = (
            "no Prometheus: set LINKUP_PROMETHEUS_URL and LINKUP_PROMETHEUS_TARGETS "
            "(.ci/start-prometheus), or put prometheus on PATH"
        )
        if in_ci():
            pytest.fail(f"{message}; CI is set, so this is an error")
        pytest.skip(message)
    own, pid, directory = _start_own_prometheus(binary)
    try:
        yield own
    finally:
        _stop(pid, directory)
