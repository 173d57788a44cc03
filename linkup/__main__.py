"""
linkup: run a core and a bridge together, as one command.

The two run as child processes (so that they use two CPU cores) linked over a
private IPC socket. This process only supervises them: it prints where to
connect once the bridge is ready, stops both on Ctrl-C or SIGTERM, and starts
again a child that dies (the core takes its queue back from the data dir and
the bridge keeps the plugins connected meanwhile), unless it keeps dying. The
children also ask the kernel to end them should this process die without
cleaning up, so that no orphan keeps the port.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import psutil

from bridge.__main__ import add_bridge_options
from core.__main__ import (
    add_link_options,
    add_scheduler_options,
    add_storage_options,
    default_data_dir,
    port_number,
    port_or_zero,
    scheduler_and_storage_argv,
)
from linkup import __version__
from linkup.logs import add_log_level_option, configure_logging

logger = logging.getLogger("linkup")

DEFAULT_PORT = 9527
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
# A child that dies is started again, but not a fourth time within a minute:
# one that keeps dying has a reason the operator must see.
MAX_RESTARTS = 3
RESTART_WINDOW = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linkup",
        description="Run a linkup core and bridge together. Point the plugin's "
        "联动上传 setting at the WebSocket URL this prints.",
    )
    parser.add_argument(
        "port_argument",
        nargs="?",
        type=port_number,
        metavar="PORT",
        help=f"port for WebSockets and the status page (default: {DEFAULT_PORT})",
    )
    parser.add_argument("--port", type=port_number, help="same as PORT")
    parser.add_argument(
        "--host", default="0.0.0.0", help="address to listen on (default: %(default)s)"
    )
    # The default data dir depends on the port, so that `linkup` and
    # `linkup 8080` can run side by side; it is filled in once that is known.
    add_storage_options(parser, data_dir=None)
    add_scheduler_options(parser)
    add_bridge_options(parser)
    add_link_options(parser)
    parser.add_argument(
        "--core-metrics-port",
        type=port_or_zero,
        metavar="PORT",
        help="serve the core's Prometheus metrics at http://HOST:PORT/metrics; "
        "0: do not (default: PORT + 2, e.g. 9529); the bridge's are at "
        "http://HOST:PORT/metrics",
    )
    add_log_level_option(parser)
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {p for p in (args.port_argument, args.port) if p is not None}
    if len(given) > 1:
        parser.error("PORT and --port disagree; give one")
    port = given.pop() if given else DEFAULT_PORT
    if args.data_dir is None:
        args.data_dir = default_data_dir(f"port-{port}")
    if not _port_is_free(args.host, port):
        parser.exit(
            1,
            f"linkup: port {port} is already in use (another linkup?); "
            f"choose another, e.g. `linkup {port + 1 if port < 65535 else 8080}`\n",
        )
    metrics_port = args.core_metrics_port
    if metrics_port is None:
        if port + 2 > 65535:
            parser.exit(
                1,
                f"linkup: port {port} leaves no room for the core's metrics on "
                "PORT+2; choose one with --core-metrics-port, or 0 for none\n",
            )
        metrics_port = port + 2
    if metrics_port == port:
        parser.exit(
            1,
            f"linkup: --core-metrics-port {metrics_port} is the bridge's port; "
            "choose another, or 0 for none\n",
        )
    if metrics_port and not _port_is_free(args.host, metrics_port):
        parser.exit(
            1,
            f"linkup: port {metrics_port}, for the core's metrics, is already in "
            "use; choose another with --core-metrics-port, or 0 for none\n",
        )
    configure_logging(args.log_level)

    stop_requested = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    runtime_dir = Path(tempfile.mkdtemp(prefix="linkup-"))
    endpoint = f"ipc://{runtime_dir / 'core.sock'}"
    common = [
        "--log-level",
        args.log_level,
        "--heartbeat-interval",
        str(args.heartbeat_interval),
        "--link-timeout",
        str(args.link_timeout),
    ]
    commands = {
        "core": [
            "--bind",
            endpoint,
            *scheduler_and_storage_argv(args),
            "--metrics-host",
            args.host,
            "--metrics-port",
            str(metrics_port),
            *common,
        ],
        "bridge": [
            "--core",
            endpoint,
            "--host",
            args.host,
            "--port",
            str(port),
            "--max-message-size",
            str(args.max_message_size),
            "--ping-interval",
            str(args.ping_interval),
            "--ping-timeout",
            str(args.ping_timeout),
            "--max-outbox",
            str(args.max_outbox),
            "--core-grace",
            str(args.core_grace),
            *common,
        ],
    }
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, arguments in commands.items():
            children[name] = _spawn(name, *arguments)

        if not _wait_until_ready(args.host, port, children, lambda: stop_requested):
            return 0 if stop_requested else 1
        print(_banner(args.host, port, metrics_port), flush=True)

        restarts = {name: deque[float]() for name in commands}
        while not stop_requested:
            for name, child in children.items():
                if child.poll() is None:
                    continue
                if not _may_restart(restarts[name], time.monotonic()):
                    logger.warning(
                        "%s exited with status %s, %d times within %gs; stopping",
                        name,
                        child.returncode,
                        MAX_RESTARTS + 1,
                        RESTART_WINDOW,
                    )
                    return 1
                logger.warning(
                    "%s exited with status %s; starting it again",
                    name,
                    child.returncode,
                )
                children[name] = _spawn(name, *commands[name])
            time.sleep(0.2)
        return 0
    finally:
        _stop(children)
        shutil.rmtree(runtime_dir, ignore_errors=True)
        if stop_requested:
            print("linkup stopped / 已停止", flush=True)


def _may_restart(recent: deque[float], now: float) -> bool:
    # Note a restart at ``now`` unless MAX_RESTARTS happened in the window.
    while recent and now - recent[0] > RESTART_WINDOW:
        recent.popleft()
    if len(recent) >= MAX_RESTARTS:
        return False
    recent.append(now)
    return True


def _port_is_free(host: str, port: int) -> bool:
    # Checked before starting anything: otherwise another linkup on the port
    # would answer our readiness probe and we would claim to be running.
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError:
        return False
    return True


def _spawn(module: str, *arguments: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *arguments], preexec_fn=_die_with_parent
    )


def _die_with_parent() -> None:
    # Linux: deliver SIGTERM to the child when this process dies, even by
    # SIGKILL. Elsewhere the children outlive a killed parent.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_until_ready(
    host: str,
    port: int,
    children: dict[str, subprocess.Popen[bytes]],
    stop_requested: Callable[[], bool],
) -> bool:
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in probe_host:
        probe_host = f"[{'::1' if probe_host == '::' else probe_host}]"
    url = f"http://{probe_host}:{port}/readyz"
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if stop_requested():
            return False
        for name, child in children.items():
            if child.poll() is not None:
                logger.warning("%s failed to start (status %s)", name, child.returncode)
                return False
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=1) as response,
        ):
            if response.status == 200:
                return True
        time.sleep(0.1)
    logger.warning("linkup did not become ready within %.0fs", READY_TIMEOUT)
    return False


def _stop(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for name, child in children.items():
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0fs, killed", name, STOP_TIMEOUT)
            child.kill()
            child.wait()


def lan_addresses() -> list[str]:
    """
    This machine's IPv4 addresses that other machines may reach.

    """
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family != socket.AF_INET:
                continue
            ip = ipaddress.ip_address(address.address)
            if not (ip.is_loopback or ip.is_link_local):
                found.append(address.address)
    return sorted(set(found))


def _banner(host: str, port: int, metrics_port: int) -> str:
    if host in ("0.0.0.0", "", "::"):
        local = "localhost"
        others = lan_addresses()
    else:
        local = host
        others = []
    lines = [
        f"linkup {__version__} is running / 联动上传服务器已启动",
        "",
        f"  WebSocket / 插件服务器地址:  ws://{local}:{port}",
        f"  Status page / 状态页面:      http://{local}:{port}",
        f"  Metrics / 监控指标:          http://{local}:{port}/metrics",
    ]
    if metrics_port:
        lines.append(
            f"                               http://{local}:{metrics_port}/metrics"
        )
    if others:
        lines += [
            "",
            "  On the LAN, type one of these into the plugin / 局域网内请在插件中填写:",
        ]
        lines += [f"    ws://{address}:{port}" for address in others]
    lines += ["", "Press Ctrl-C to stop / 按 Ctrl-C 停止"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
