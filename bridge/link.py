"""
The bridge's end of the core-bridge link: one DEALER socket, supervised.

The link is *up* between a WELCOME from the core and the moment the core is
lost: silent for ``link_timeout`` seconds, or answering RESET because it no
longer knows this bridge (it restarted, or gave the bridge up for dead). When
the link goes down the bridge is told (:meth:`LinkHandler.on_link_lost`); the
link then says HELLO every tenth of a second until a core answers. Each HELLO
lists the bridge's live connections (:meth:`LinkHandler.client_claims`), so
that a restarted core can pick up where it was without the plugins
reconnecting; the WELCOME says which of them the core knows
(:meth:`LinkHandler.on_link_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq
import zmq.asyncio

from core import wire
from core.errors import ProtocolError, Unavailable
from core.wire import Command

__all__ = ["CoreLink", "LinkHandler"]

logger = logging.getLogger("linkup.bridge.link")


class LinkHandler(Protocol):
    def on_core_message(self, envelope: wire.Envelope) -> None: ...

    def client_claims(self) -> list[dict[str, Any]]:
        """
        The live connections, for HELLO: ``{"client", "holds", "report"}``.

        """
        ...

    def on_link_up(self, known: list[int], core_restarted: bool) -> None: ...

    def on_link_lost(self, reason: str) -> None: ...


class CoreLink:
    """
    Connect to the core at ``endpoint`` and keep the link alive.

    Args:
        context: asyncio ZeroMQ context; the caller owns it.
        endpoint: The core's endpoint, e.g. ``tcp://127.0.0.1:9528``.
        handler: Receives the core's messages and news of a lost link.
        heartbeat_interval: Seconds between heartbeats.
        link_timeout: Seconds of silence after which the core is lost.

    """

    def __init__(
        self,
        context: zmq.asyncio.Context,
        endpoint: str,
        handler: LinkHandler,
        *,
        heartbeat_interval: float,
        link_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.instance = uuid.uuid4().hex
        self.heartbeat_interval = heartbeat_interval
        self.link_timeout = link_timeout
        #: Set while the core knows this bridge.
        self.up = asyncio.Event()
        #: The instance id of the core, from its last WELCOME.
        self.core_instance: str | None = None
        self._handler = handler
        self._clock = clock
        self._last_heard = 0.0
        self._last_sent = 0.0
        #: Counts this bridge's attempts to join; HELLOs repeated while
        #: waiting for a WELCOME share one number, so the core answers once.
        self._join = 1
        # The claims of the current join, made once: a repeated HELLO must
        # say what the first said, since the core applies only the first.
        self._claims: tuple[int, list[dict[str, Any]]] | None = None

        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.ROUTING_ID, self.instance.encode())
        # Fail sends at once while no core is connected, instead of queueing
        # them for a core that may never come; and never drop at a high-water
        # mark while one is.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)

    async def run(self) -> None:
        """
        Receive from the core and supervise the link until cancelled.

        """
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._receive_loop())
            tasks.create_task(self._heartbeat_loop())

    async def send(
        self,
        command: Command,
        header: dict[str, Any] | None = None,
        payloads: Sequence[Any] = (),
    ) -> None:
        """
        Send one message to the core.

        Raises:
            Unavailable: The link is down.

        """
        if not self.up.is_set():
            raise Unavailable("linkup core is unavailable, try again later")
        await self._send(command, header, payloads)

    async def close(self) -> None:
        """
        Tell the core goodbye, briefly, and close the socket.

        """
        if self.up.is_set():
            with contextlib.suppress(Unavailable):
                await self._send(Command.BYE)
        self._socket.close(linger=500)

    async def _send(
        self,
        command: Command,
        header: dict[str, Any] | None = None,
        payloads: Sequence[Any] = (),
    ) -> None:
        frames = wire.encode(command, header, payloads)
        try:
            await self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # IMMEDIATE: no connection to a core at the moment.
            raise Unavailable("linkup core is unavailable, try again later") from None
        self._last_sent = self._clock()

    async def _receive_loop(self) -> None:
        while True:
            frames = await self._socket.recv_multipart(copy=False)
            try:
                envelope = wire.decode(frames)
            except ProtocolError as exc:
                logger.warning("refused message from core: %s", exc)
                continue
            self._last_heard = self._clock()

            match envelope.command:
                case Command.WELCOME:
                    self._on_welcome(envelope.header)
                case Command.HEARTBEAT:
                    pass
                case Command.RESET:
                    if self.up.is_set():
                        self._lose(
                            f"core reset the link: {envelope.header.get('reason')}"
                        )
                    await self._say_hello()
                case _ if self.up.is_set():
                    try:
                        self._handler.on_core_message(envelope)
                    except Exception:
                        logger.error(
                            "bug while handling %s from core",
                            envelope.command.name,
                            exc_info=True,
                        )
                case _:
                    logger.debug("- ignored %s while joining", envelope.command.name)

    def _on_welcome(self, header: dict[str, Any]) -> None:
        if self.up.is_set() or header.get("join", self._join) != self._join:
            return
        if header.get("heartbeat") != self.heartbeat_interval:
            logger.warning(
                "core heartbeats every %ss, this bridge every %ss: set "
                "--heartbeat-interval alike on both, or one may think the "
                "other lost",
                header.get("heartbeat"),
                self.heartbeat_interval,
            )
        core = str(header.get("core"))
        restarted = self.core_instance is not None and core != self.core_instance
        if restarted:
            logger.info("core restarted: instance %s, was %s", core, self.core_instance)
        self.core_instance = core
        self.up.set()
        logger.info("connected to core %s instance=%s", self.endpoint, core)
        self._handler.on_link_up(list(header.get("known", ())), restarted)

    async def _heartbeat_loop(self) -> None:
        await self._say_hello()
        while True:
            # While joining, knock more often than the heartbeat so that a
            # starting bridge is ready as soon as its core is.
            joining = not self.up.is_set()
            await asyncio.sleep(
                min(0.1, self.heartbeat_interval)
                if joining
                else self.heartbeat_interval
            )
            now = self._clock()
            if self.up.is_set() and now - self._last_heard >= self.link_timeout:
                self._lose(f"core silent for {now - self._last_heard:.1f}s")

            try:
                if not self.up.is_set():
                    await self._say_hello()
                elif now - self._last_sent >= self.heartbeat_interval * 0.9:
                    await self._send(Command.HEARTBEAT)
            except Unavailable:
                pass

    async def _say_hello(self) -> None:
        try:
            await self._send(
                Command.HELLO,
                {
                    "bridge": self.instance,
                    "heartbeat": self.heartbeat_interval,
                    "join": self._join,
                    "clients": self._claims_of_this_join(),
                    # This bridge takes several deliveries in one message.
                    "deliverMany": True,
                },
            )
        except Unavailable:
            logger.debug("- no core at %s yet", self.endpoint)

    def claims_changed(self) -> None:
        """
        A connection with a role came, went or reported while the link is
        down: the next HELLO must say so.

        A HELLO the core may already have applied cannot change; a new join
        number makes the core apply the new claims, and this bridge wait for
        the WELCOME that answers them.

        """
        if not self.up.is_set() and self._claims is not None:
            self._join += 1
            self._claims = None

    def _claims_of_this_join(self) -> list[dict[str, Any]]:
        if self._claims is None or self._claims[0] != self._join:
            self._claims = (self._join, self._handler.client_claims())
        return self._claims[1]

    def _lose(self, reason: str) -> None:
        logger.warning("lost the core: %s", reason)
        self.up.clear()
        self._join += 1
        self._handler.on_link_lost(reason)
