"""
The bridge's allocator settings, and giving memory back once large messages stop.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
import zmq.asyncio

from bridge import server
from bridge.memory import reuse_large_buffers
from bridge.server import Bridge, BridgeOptions


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_reuse_large_buffers_returns_a_working_release() -> None:
    release = reuse_large_buffers()
    assert release is not None
    release()


async def test_memory_is_released_once_large_messages_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "RELEASE_MEMORY_AFTER", 0.02)
    released: list[int] = []
    context = zmq.asyncio.Context()
    try:
        bridge = Bridge(
            context,
            BridgeOptions(core="tcp://127.0.0.1:1"),
            release_memory=lambda: released.append(bridge._large_bytes),
        )
        releasing = asyncio.create_task(bridge._release_memory_when_idle())
        try:
            # Nothing moved yet: nothing to give back.
            await asyncio.sleep(0.1)
            assert released == []
            # Large messages come, then stop: released once the last is
            # past, and not again while nothing moves.
            for _ in range(5):
                bridge._large_bytes += 1 << 20
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.15)
            assert released
            assert released[-1] == 5 << 20
            count = len(released)
            await asyncio.sleep(0.1)
            assert len(released) == count
        finally:
            releasing.cancel()
        await bridge.link.close()
    finally:
        context.destroy(linger=0)
