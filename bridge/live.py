"""
The live status page's feed: views from the core, pushed to open pages.

A page opens a WebSocket to :data:`LIVE_PATH`. While at least one is open,
the bridge asks the core to watch (link ``WATCH``); the core then sends a
``VIEW`` whenever what the page shows has changed, at most every half second
(:mod:`core.server`). Each view goes to every page as one JSON text message.

A view is a snapshot: a page that has not yet been sent the previous one gets
only the newest (:meth:`bridge.outbox.Outbox.put_latest`), so a slow page
costs one view's worth of memory, and never holds up anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from bridge.outbox import Close, Outbox

__all__ = ["LIVE_PATH", "LiveStatus"]

logger = logging.getLogger("linkup.bridge.live")

#: The path a status page connects to. Plugins connect on any path the user
#: typed; this one is taken.
LIVE_PATH = "/status/live"

#: A view is tens of KB; a page that falls this far behind is closed.
MAX_VIEWER_BYTES = 4 * 1024 * 1024
#: A page sends nothing; this much is allowed so that nobody can make the
#: bridge buffer a plugin-sized message only to drop it.
MAX_PAGE_MESSAGE = 4096


class LiveStatus:
    """
    The open status pages of one bridge, and the last view for them.

    Args:
        name: This bridge's short name, shown on the page.
        watch: Called with True when the first page opens, or when the link
            comes up with pages open; with False when the last one closes.

    """

    def __init__(self, name: str, watch: Callable[[bool], None]) -> None:
        self.name = name
        self._watch = watch
        self._viewers: set[Outbox] = set()
        self._view: dict[str, Any] | None = None
        self._core_link = False

    @property
    def viewers(self) -> int:
        return len(self._viewers)

    async def serve(self, websocket: ServerConnection) -> None:
        """
        Feed one page until it goes away.

        """
        # Read by websockets before each frame, so it applies from here on.
        websocket.protocol.max_message_size = MAX_PAGE_MESSAGE
        outbox = Outbox(MAX_VIEWER_BYTES)
        self._viewers.add(outbox)
        if len(self._viewers) == 1:
            self._watch(True)
        if self._view is not None:
            outbox.put_latest(self._encode())
        sender = asyncio.create_task(_send_loop(websocket, outbox))
        try:
            # The page sends nothing; whatever comes is read and dropped, so
            # that the connection notices the page closing.
            async for _ in websocket:
                pass
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            self._viewers.discard(outbox)
            if not self._viewers:
                # No fresh views come while nobody watches: the next page
                # must wait for one rather than be shown an old one as live.
                self._view = None
                self._watch(False)

    def on_view(self, view: dict[str, Any]) -> None:
        """
        A new view from the core: send it to every page.

        """
        self._view = view
        self._push()

    def on_link(self, up: bool) -> None:
        """
        The link to the core came up or went down.

        """
        self._core_link = up
        if up and self._viewers:
            self._watch(True)
        if self._view is not None:
            self._push()

    def _push(self) -> None:
        if not self._viewers:
            return
        data = self._encode()
        for outbox in self._viewers:
            outbox.put_latest(data)

    def _encode(self) -> bytes:
        assert self._view is not None
        links = dict(self._view.get("links", {}))
        links["thisBridge"] = {"name": self.name, "coreLink": self._core_link}
        return orjson.dumps({**self._view, "links": links})


async def _send_loop(websocket: ServerConnection, outbox: Outbox) -> None:
    with contextlib.suppress(ConnectionClosed):
        while True:
            item = await outbox.get()
            if isinstance(item, Close):
                logger.warning("closing a status page: %s", item.reason)
                await websocket.close(item.code, item.reason)
                return
            assert isinstance(item, bytes)  # views only; no file is spliced in
            await websocket.send(item, text=True)
