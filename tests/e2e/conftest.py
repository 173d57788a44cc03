"""
Fixtures of the end-to-end tests: plugins connected to a linkup of their own
(`deployment`, in tests/conftest.py, starts the processes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.e2e.harness import UNIT, Deployment, Plugin
from tests.e2e.protocol_helpers import open_clients


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
