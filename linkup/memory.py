"""
Give memory back to the operating system as soon as large buffers are freed.

A batch of files passes through the core and the bridge as large buffers
(ZeroMQ frames, WebSocket messages) that live for seconds. glibc serves
allocations below its mmap threshold (adaptive, up to 32 MiB) from heaps that
it seldom shrinks, so after a batch of 8 MiB files a process keeps hundreds
of MB it no longer uses. Below a fixed 1 MiB threshold every such buffer gets
pages of its own, returned the moment it is freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util

__all__ = ["return_large_buffers_promptly"]

_M_MMAP_THRESHOLD = -3
_THRESHOLD = 2**20


def return_large_buffers_promptly() -> None:
    """
    Set glibc's mmap threshold to 1 MiB; a no-op where there is no glibc.

    """
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)
