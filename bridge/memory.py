"""
How the bridge uses glibc's allocator: reuse large buffers while files flow,
give the memory back once they stop.

Every file passes through the bridge in a few large buffers that live for
milliseconds: websockets' read buffer and the unmasked message of a batch,
the frame of each ``TASK_ASSIGNED`` that ZeroMQ receives from the core. The
core and the launcher fix glibc's mmap threshold at 1 MiB
(:mod:`linkup.memory`), so that each such buffer gets pages of its own that
go back to the system when it is freed. For the bridge that was the
costliest part of moving a file: the kernel faults in and zeroes every page
of every new buffer, and on a 2-CPU test machine that made a copy of a large
buffer take five times as long as a copy into memory already in use.

So the bridge serves buffers of up to 32 MiB (glibc's largest mmap
threshold on 64-bit) from its heap, where the next message reuses the pages
the last one freed, and keeps up to 64 MiB free at the top of the heap
rather than trimming it after every message. Larger buffers get pages of
their own: a batch of more than 32 MiB is read into a mapping of its size
(:mod:`bridge.connection`), which goes as soon as the batch is taken out of
it. What the heap holds free is
given back by :func:`malloc_trim` once a second has passed without a large
message (``Bridge`` decides when), so an idle bridge is as small as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["RELEASE_MEMORY_AFTER", "reuse_large_buffers"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Buffers up to this size come from the heap and are reused.
MMAP_THRESHOLD = 32 * 2**20
#: Free memory kept at the top of the heap until the bridge trims it.
TRIM_THRESHOLD = 64 * 2**20
#: Seconds without a large message either way after which the bridge gives
#: the heap's free memory back (it checks that often, so it happens between
#: one and two of these after the last one).
RELEASE_MEMORY_AFTER = 1.0


def reuse_large_buffers() -> Callable[[], None] | None:
    """
    Set glibc's thresholds as above, and return a function that gives the
    heap's free memory back to the system (``malloc_trim(0)``); None where
    there is no glibc, which changes nothing.

    """
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        trim = libc.malloc_trim
        if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
            mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)

            def release() -> None:
                trim(0)

            return release
    return None
