"""
Starting a real linkup for a benchmark: a free port, and waiting until ready.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

__all__ = ["free_port", "wait_ready"]

READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(port: int, linkup: subprocess.Popen[bytes]) -> None:
    """
    Wait until the linkup on ``port`` answers /readyz, or fail if it exits.

    """
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if linkup.poll() is not None:
            raise RuntimeError(f"linkup exited with status {linkup.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("linkup did not become ready")
