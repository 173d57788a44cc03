"""
A connection's outbox: what the bridge still has to send to one plugin.

Everything for a connection goes through its outbox, in order: messages from
the core, ``ERROR`` replies and the request to close. One task per connection
(``Bridge._send_loop``) takes items out and writes them to the WebSocket, so
putting never waits, and a client that reads slowly holds up only its own
outbox.

The outbox is bounded, so that a client that stops reading cannot make the
bridge hold an ever growing backlog:

- A ``STATS_UPDATE`` push replaces the one still waiting, if any
  (:meth:`Outbox.put_latest`): it is a snapshot, and only the latest matters.
- Any other message is queued, and counts its size in bytes (a
  ``TASK_ASSIGNED`` with its file data spliced in counts the whole file).
  When the outbox already holds something and the new message would take the
  waiting bytes over ``max_bytes``, the outbox *overflows*: it drops what it
  holds and from then on yields only ``Close(1008, "too slow: N bytes
  waiting")``. One message larger than ``max_bytes`` is still accepted into
  an empty outbox, so that a large file reaches a worker that keeps up.

The messages being written to the WebSocket have left the outbox and do not
count. The sender takes one message (:meth:`Outbox.get`) and with it those
that wait right behind it, up to ``batch_bytes`` in all
(:meth:`Outbox.take_ready`), so that at most about one message, or
``batch_bytes`` of small ones, more is held for a connection.

A message is ``bytes`` or, for a ``TASK_ASSIGNED`` with its file, a
:class:`bridge.messages.Spliced` (the file stays a view of the core's frame);
either counts its length.

Pure: no I/O, no clock, no logging. One consumer may wait in :meth:`get`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from websockets.frames import CloseCode

from bridge.messages import Spliced

__all__ = ["CLOSE_TOO_SLOW", "DEFAULT_MAX_BYTES", "Close", "Outbox"]

#: Default for ``max_bytes``, and for ``--max-outbox``.
DEFAULT_MAX_BYTES = 64 * 2**20

#: Close code for a client whose outbox overflowed.
CLOSE_TOO_SLOW = CloseCode.POLICY_VIOLATION  # 1008


@dataclass(frozen=True, slots=True)
class Close:
    """
    Close the WebSocket with ``code`` and ``reason``, after what is before it.

    """

    code: int
    reason: str


@dataclass(eq=False, slots=True)
class _Latest:
    # A queued snapshot that a newer one may replace where it stands.
    data: bytes


class Outbox:
    """
    The bounded queue of one connection; see the module's docstring.

    Args:
        max_bytes: Bytes that may wait before the outbox overflows.

    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        #: Called once, with the Close it queued, when the outbox overflows.
        self.on_overflow: Callable[[Close], None] | None = None
        self._items: deque[bytes | Spliced | _Latest | Close] = deque()
        self._bytes = 0
        # The waiting snapshot that put_latest replaces, if any.
        self._latest: _Latest | None = None
        # Set once a Close is queued: nothing after it could be sent.
        self._closing = False
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        """
        Bytes of the messages waiting, not counting the one being sent.

        """
        return self._bytes

    @property
    def closing(self) -> bool:
        """
        A Close is queued (or was taken): later messages are dropped.

        """
        return self._closing

    def put_nowait(self, item: bytes | Spliced | Close) -> None:
        """
        Queue a message, or the request to close after what is queued.

        Never waits. Dropped if a Close is already queued. May overflow the
        outbox instead of queueing ``item``.

        """
        if self._closing:
            return
        if isinstance(item, Close):
            self._closing = True
            self._append(item)
            return
        if self._overflows(len(item)):
            return
        self._bytes += len(item)
        self._append(item)

    def put_latest(self, data: bytes) -> None:
        """
        Queue a snapshot (``STATS_UPDATE``) that supersedes any still waiting.

        A waiting snapshot is replaced where it stands, so the client gets
        the newer one no later than it would have got the older one.
        Otherwise as :meth:`put_nowait`.

        """
        if self._closing:
            return
        latest = self._latest
        if latest is None:
            if self._overflows(len(data)):
                return
            self._latest = _Latest(data)
            self._bytes += len(data)
            self._append(self._latest)
            return
        if self._overflows(len(data) - len(latest.data)):
            return
        self._bytes += len(data) - len(latest.data)
        latest.data = data

    async def get(self) -> bytes | Spliced | Close:
        """
        Wait for the next item and take it.

        """
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._take()

    def take_ready(self, batch_bytes: int) -> list[bytes | Spliced]:
        """
        Take the messages waiting at the front, without waiting, while they
        add up to at most ``batch_bytes``; never a Close, nor what is behind
        one.

        """
        taken: list[bytes | Spliced] = []
        budget = batch_bytes
        items = self._items
        while items:
            item = items[0]
            if isinstance(item, Close):
                break
            size = len(item.data) if isinstance(item, _Latest) else len(item)
            if size > budget:
                break
            budget -= size
            message = self._take()
            assert not isinstance(message, Close)
            taken.append(message)
        return taken

    def _take(self) -> bytes | Spliced | Close:
        item = self._items.popleft()
        if isinstance(item, Close):
            return item
        if isinstance(item, _Latest):
            self._latest = None
            item = item.data
        self._bytes -= len(item)
        return item

    def _append(self, item: bytes | Spliced | _Latest | Close) -> None:
        self._items.append(item)
        self._ready.set()

    def _overflows(self, extra: int) -> bool:
        # "Already holds something and would go over": a single message
        # larger than the limit still goes through an empty outbox.
        waiting = self._bytes + extra
        if not self._items or waiting <= self.max_bytes:
            return False
        self._items.clear()
        self._bytes = 0
        self._latest = None
        close = Close(CLOSE_TOO_SLOW, f"too slow: {waiting} bytes waiting")
        self.put_nowait(close)
        if self.on_overflow is not None:
            self.on_overflow(close)
        return True
