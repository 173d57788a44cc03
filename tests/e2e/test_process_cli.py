"""
The three commands as a user runs them: output, options, signals and errors.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.harness import (
    TIMEOUT,
    UNIT,
    Process,
    free_port,
    http_get,
    read_stdout_until,
    wait_ready,
)

# The console scripts that `pip install` puts beside the interpreter.
BIN = Path(sys.executable).parent
# "Within a few seconds" for stopping; linkup itself gives its children 5 s.
STOP_WITHIN = 8 * UNIT


def _run(command: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """
    Run a console script to its end; fail the test if it hangs.

    """
    argv = [str(BIN / command), *arguments]
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as expired:
        stderr = expired.stderr or b""
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    pytest.fail(f"{argv} still running after {TIMEOUT}s (killed); stderr:\n{stderr}")


def _start_linkup(deployment, *arguments: str) -> Process:
    return deployment.start(
        f"linkup-{len(deployment.processes)}", "-m", "linkup", *arguments
    )


def _children(process: Process) -> list[psutil.Process]:
    children = psutil.Process(process.pid).children(recursive=True)
    commands = sorted(" ".join(child.cmdline()) for child in children)
    assert len(children) == 2, commands
    assert any(" -m core " in f"{c} " for c in commands), commands
    assert any(" -m bridge " in f"{c} " for c in commands), commands
    return children


def _gone(process: psutil.Process) -> bool:
    # An orphan that has exited may linger as a zombie until init reaps it.
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(processes: list[psutil.Process], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_gone(process) for process in processes):
            return
        time.sleep(0.05)
    alive = [" ".join(p.cmdline()) for p in processes if not _gone(p)]
    raise AssertionError(f"still running after {timeout}s: {alive}")


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port that something listens on while the block runs."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def test_linkup_prints_where_to_connect_and_how_to_stop(deployment):
    """linkup PORT prints the ws:// URL, the status page URL and Ctrl-C."""
    port = free_port()
    linkup = _start_linkup(deployment, str(port), "--host", "127.0.0.1")
    output = read_stdout_until(
        linkup,
        f"ws://127.0.0.1:{port}",
        f"http://127.0.0.1:{port}",
        "Ctrl-C",
    )
    # Printed once it is ready: what it says works at once.
    status, _, body = http_get(f"http://127.0.0.1:{port}/status")
    assert status == 200, body
    status, headers, _ = http_get(f"http://127.0.0.1:{port}/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "Traceback" not in output + linkup.log()


def test_linkup_port_option_is_the_same_as_the_positional_port(deployment):
    """linkup --port PORT serves on PORT, like linkup PORT."""
    port = free_port()
    linkup = _start_linkup(deployment, "--port", str(port), "--host", "127.0.0.1")
    read_stdout_until(linkup, f"ws://127.0.0.1:{port}")
    wait_ready(port, linkup)


def test_ctrl_c_stops_linkup_and_its_children_cleanly(deployment):
    """SIGINT to linkup: exit 0 within seconds, no traceback, no child left."""
    port = free_port()
    linkup = _start_linkup(deployment, str(port), "--host", "127.0.0.1")
    read_stdout_until(linkup, "Ctrl-C")
    children = _children(linkup)

    linkup.signal(signal.SIGINT)
    assert linkup.popen.wait(STOP_WITHIN) == 0
    _wait_gone(children, 1 * UNIT)
    assert "Traceback" not in linkup.log()
    assert _port_is_free(port)
    assert linkup.popen.stdout is not None
    assert "stopped" in linkup.popen.stdout.read().decode(errors="replace")


def test_sigterm_stops_linkup_and_its_children_cleanly(deployment):
    """SIGTERM to linkup: exit 0 within seconds, no traceback, no child left."""
    port = free_port()
    linkup = _start_linkup(deployment, str(port), "--host", "127.0.0.1")
    read_stdout_until(linkup, "Ctrl-C")
    children = _children(linkup)

    linkup.signal(signal.SIGTERM)
    assert linkup.popen.wait(STOP_WITHIN) == 0
    _wait_gone(children, 1 * UNIT)
    assert "Traceback" not in linkup.log()


def test_ctrl_c_in_a_terminal_stops_the_whole_process_group(tmp_path):
    """SIGINT to linkup's process group, as a terminal sends it: all exit quietly."""
    port = free_port()
    with (tmp_path / "linkup.log").open("wb") as log:
        linkup = subprocess.Popen(
            [sys.executable, "-m", "linkup", str(port), "--host", "127.0.0.1"],
            stdout=subprocess.PIPE,
            stderr=log,
            process_group=0,
        )
    try:
        assert linkup.stdout is not None
        printed = b""
        deadline = time.monotonic() + TIMEOUT
        while b"Ctrl-C" not in printed and time.monotonic() < deadline:
            if select.select([linkup.stdout], [], [], 0.1)[0]:
                printed += os.read(linkup.stdout.fileno(), 65536)
        assert b"Ctrl-C" in printed, (tmp_path / "linkup.log").read_text()
        children = psutil.Process(linkup.pid).children(recursive=True)
        assert len(children) == 2

        os.killpg(linkup.pid, signal.SIGINT)
        assert linkup.wait(STOP_WITHIN) == 0
        _wait_gone(children, 1 * UNIT)
        assert "Traceback" not in (tmp_path / "linkup.log").read_text()
    finally:
        if linkup.poll() is None:
            os.killpg(linkup.pid, signal.SIGKILL)
            linkup.wait()
        if linkup.stdout is not None:
            linkup.stdout.close()


def test_children_end_themselves_when_linkup_is_killed(deployment):
    """kill -9 of linkup: its core and bridge exit by themselves within seconds."""
    port = free_port()
    linkup = _start_linkup(deployment, str(port), "--host", "127.0.0.1")
    read_stdout_until(linkup, "Ctrl-C")
    children = _children(linkup)

    linkup.kill9()
    _wait_gone(children, STOP_WITHIN)
    # No orphan keeps the port: linkup can be started again at once.
    assert _port_is_free(port)


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (
            "linkup",
            [
                "PORT",
                "--port",
                "--host",
                "--max-message-size",
                "--max-outbox",
                "--core-metrics-port",
                "--log-level",
            ],
        ),
        ("linkup-core", ["--bind", "--metrics-port", "--metrics-host", "--log-level"]),
        (
            "linkup-bridge",
            [
                "--core",
                "--port",
                "--host",
                "--max-message-size",
                "--max-outbox",
                "--log-level",
            ],
        ),
    ],
)
def test_help_lists_the_options(command, options):
    """--help exits 0 and names each command's options."""
    result = _run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: {command}" in result.stdout
    for option in options:
        assert option in result.stdout, option
    for level in ("DEBUG", "INFO", "WARNING", "ERROR"):
        assert level in result.stdout


@pytest.mark.parametrize(
    ("command", "arguments", "named"),
    [
        ("linkup", ["--max-message-size", "lots"], "--max-message-size"),
        ("linkup", ["--max-message-size", "0"], "--max-message-size"),
        ("linkup", ["--port", "http"], "--port"),
        ("linkup", ["70000"], "70000"),
        ("linkup", ["8080", "--port", "8081"], "PORT and --port"),
        ("linkup", ["--log-level", "LOUD"], "--log-level"),
        ("linkup", ["--heartbeat-interval", "-1"], "--heartbeat-interval"),
        ("linkup-core", ["--heartbeat-interval", "0"], "--heartbeat-interval"),
        ("linkup-core", ["--max-attempts", "0"], "--max-attempts"),
        # No metrics port: the default one may be taken by a linkup running here.
        ("linkup-core", ["--bind", "nonsense", "--metrics-port", "0"], "nonsense"),
        ("linkup-bridge", ["--max-message-size", "1 lot"], "--max-message-size"),
        ("linkup-bridge", ["--max-outbox", "0"], "--max-outbox"),
        ("linkup", ["--max-outbox", "lots"], "--max-outbox"),
        ("linkup-bridge", ["--port", "70000"], "70000"),
        ("linkup-bridge", ["--log-level", "LOUD"], "--log-level"),
        ("linkup-core", ["--metrics-port", "70000"], "70000"),
        ("linkup", ["--core-metrics-port", "-1"], "--core-metrics-port"),
        ("linkup", ["8080", "--core-metrics-port", "8080"], "the bridge's port"),
        ("linkup", ["65534"], "--core-metrics-port"),
    ],
)
def test_a_bad_option_value_is_refused_with_a_clear_message(command, arguments, named):
    """A bad option value: non-zero exit, a message naming it, no traceback."""
    result = _run(command, *arguments)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_linkup_exits_with_a_message_when_its_port_is_taken():
    """A port in use: linkup exits non-zero with a message, without hanging."""
    with taken_port() as port:
        result = _run("linkup", str(port), "--host", "127.0.0.1")
    assert result.returncode != 0
    assert str(port) in result.stderr
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "ws://" not in result.stdout


def test_a_second_linkup_on_the_same_port_refuses_to_start(deployment):
    """Another linkup holds the port: no banner, a message naming the port."""
    _, port = deployment.linkup()
    result = _run("linkup", str(port), "--host", "127.0.0.1")
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stderr
    assert "ws://" not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def test_linkup_bridge_exits_with_a_message_when_its_port_is_taken():
    """A port in use: linkup-bridge exits non-zero with a message, no hang."""
    with taken_port() as port:
        result = _run("linkup-bridge", "--port", str(port), "--host", "127.0.0.1")
    assert result.returncode != 0
    assert str(port) in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_linkup_core_exits_with_a_message_when_its_endpoint_is_taken():
    """An endpoint in use: linkup-core exits non-zero with a message, no hang."""
    with taken_port() as port:
        result = _run("linkup-core", "--bind", f"tcp://127.0.0.1:{port}")
    assert result.returncode != 0
    assert str(port) in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_linkup_core_exits_with_a_message_when_its_metrics_port_is_taken(tmp_path):
    """A metrics port in use: linkup-core says which and exits, no traceback."""
    with taken_port() as port:
        result = _run(
            "linkup-core",
            "--bind",
            f"ipc://{tmp_path}/core.sock",
            "--memory",
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(port),
        )
    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr
    assert "--metrics-port" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_linkup_refuses_a_taken_core_metrics_port_before_starting():
    """linkup checks the core's metrics port first: no banner, a clear message."""
    with taken_port() as port:
        result = _run(
            "linkup",
            str(free_port()),
            "--host",
            "127.0.0.1",
            "--core-metrics-port",
            str(port),
        )
    assert result.returncode != 0
    assert str(port) in result.stderr
    assert "--core-metrics-port" in result.stderr
    assert "ws://" not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr


def test_core_metrics_port_0_turns_the_core_metrics_off(deployment):
    """With --core-metrics-port 0 the banner names only the bridge's /metrics."""
    process, port = deployment.linkup("--core-metrics-port", "0")
    banner = read_stdout_until(process, "Ctrl-C")
    assert f"http://127.0.0.1:{port}/metrics" in banner
    assert banner.count("/metrics") == 1, banner
