"""
linkup-bridge's I/O shell: plugin WebSockets on one side, the core on the other.

Each WebSocket connection gets a number, unique within this bridge. Messages
from a plugin are validated and split (:mod:`bridge.messages`) and go to the
core tagged with that number; messages from the core are queued on the
connection's outbox, which one task per connection drains, so that a slow
client never holds up the link or other clients. Plain HTTP requests on the
same port are answered by :mod:`bridge.http`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
import zmq.asyncio
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from bridge import http
from bridge.link import CoreLink
from bridge.messages import (
    KNOWN_TYPES,
    Inbound,
    encode_error,
    encode_for_client,
    parse_client_message,
    parse_cut_message,
)
from bridge.payloads import LARGE_MESSAGE, cut_payloads, is_verbatim
from core import wire
from core.errors import (
    ERROR_CODES,
    InternalError,
    LinkupError,
    Unavailable,
    UnknownType,
)
from core.wire import Command
from metrics.bridge import BridgeMetrics

__all__ = ["Bridge", "BridgeOptions"]

logger = logging.getLogger("linkup.bridge")

# WebSocket close codes the bridge uses.
CLOSE_CORE_LOST = 1011
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True, slots=True)
class BridgeOptions:
    """
    Everything about a bridge that an operator may set.

    """

    core: str = "tcp://127.0.0.1:9528"
    host: str = "0.0.0.0"
    port: int = 9527
    #: The plugin sends a whole batch of files in one message.
    max_message_size: int = 2**30
    heartbeat_interval: float = 1.0
    link_timeout: float = 3.0
    #: WebSocket keepalive; the timeout is generous so that a peer busy
    #: sending a large batch is not mistaken for a dead one.
    ping_interval: float = 20.0
    ping_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


@dataclass(eq=False, slots=True)
class _Client:
    number: int
    websocket: ServerConnection
    # TODO: bound the outbox and push back on a client that reads slowly;
    # today a stalled reader makes its queue grow without limit.
    outbox: asyncio.Queue[bytes | _Close] = field(default_factory=asyncio.Queue)


class Bridge:
    """
    One bridge: serve plugins on ``options.host:options.port``, relay to a core.

    """

    def __init__(self, context: zmq.asyncio.Context, options: BridgeOptions) -> None:
        self.options = options
        self.link = CoreLink(
            context,
            options.core,
            self,
            heartbeat_interval=options.heartbeat_interval,
            link_timeout=options.link_timeout,
        )
        self._clients: dict[int, _Client] = {}
        self._numbers = itertools.count(1)
        self._stats_requests: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._request_numbers = itertools.count(1)

        self.registry = CollectorRegistry()
        self.metrics = BridgeMetrics(self.registry, KNOWN_TYPES, ERROR_CODES)
        self.metrics.connections.set_function(lambda: len(self._clients))
        self.metrics.core_link_up.set_function(lambda: int(self.link.up.is_set()))

    async def run(self) -> None:
        """
        Serve until cancelled, then close every connection and the link.

        """
        try:
            async with (
                serve(
                    self._serve_client,
                    self.options.host,
                    self.options.port,
                    process_request=self._process_request,
                    max_size=self.options.max_message_size,
                    # Frames are buffered up to max_queue x max_size: with a
                    # 1 GiB limit, keep the queue short.
                    max_queue=2,
                    # Deflate costs ~20 ms of CPU per MiB of Base64 and the
                    # LAN does not need it.
                    compression=None,
                    ping_interval=self.options.ping_interval,
                    ping_timeout=self.options.ping_timeout,
                ) as server,
                asyncio.TaskGroup() as tasks,
            ):
                port = next(iter(server.sockets)).getsockname()[1]
                logger.info(
                    "bridge listening on %s:%s, core %s",
                    self.options.host,
                    port,
                    self.options.core,
                )
                tasks.create_task(self.link.run())
                await asyncio.Future()  # until cancelled
        finally:
            await self.link.close()
            logger.info("bridge stopped")

    # Statistics, for /status.

    async def fetch_stats(self, wait: float = 2.0) -> dict[str, Any]:
        """
        Ask the core for the plugin-compatible statistics.

        Raises:
            Unavailable: The core is not reachable or did not answer in time.

        """
        number = next(self._request_numbers)
        future: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._stats_requests[number] = future
        try:
            await self.link.send(Command.STATS_REQUEST, {"request": number})
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            raise Unavailable("linkup core did not answer in time") from None
        finally:
            self._stats_requests.pop(number, None)

    # Plugin connections.

    async def _process_request(
        self, connection: ServerConnection, request: websockets.http11.Request
    ) -> websockets.http11.Response | None:
        return await http.respond(self, request)

    async def _serve_client(self, websocket: ServerConnection) -> None:
        if not self.link.up.is_set():
            try:
                await asyncio.wait_for(self.link.up.wait(), self.options.link_timeout)
            except TimeoutError:
                await websocket.close(
                    CLOSE_TRY_AGAIN_LATER, "linkup core unavailable, try again later"
                )
                return

        client = _Client(next(self._numbers), websocket)
        self._clients[client.number] = client
        logger.info(
            "client connected client=%d remote=%s path=%s",
            client.number,
            _remote(websocket),
            websocket.request.path if websocket.request else "?",
        )
        sender = asyncio.create_task(self._send_loop(client))
        try:
            while True:
                # Neither the received bytes nor the parsed message outlive
                # their use here: a batch can be hundreds of MB.
                try:
                    inbound = await self._parse(await websocket.recv(decode=False))
                except LinkupError as exc:
                    self._refuse(client, exc)
                    continue
                except ConnectionClosed:
                    raise
                except Exception:
                    logger.error("bug while parsing a message", exc_info=True)
                    self._refuse(client, InternalError())
                    continue
                await self._forward(client, inbound)
                del inbound
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
                # The plugin ignores close codes: say it where the operator looks.
                logger.warning(
                    "client=%d closed with 1009 (%s); the limit is %d bytes "
                    "(--max-message-size)",
                    client.number,
                    exc.sent.reason,
                    self.options.max_message_size,
                )
        finally:
            del self._clients[client.number]
            sender.cancel()
            with contextlib.suppress(Unavailable):
                await self.link.send(Command.CLIENT_GONE, {"client": client.number})
            logger.info("client disconnected client=%d", client.number)

    async def _parse(self, raw: bytes) -> Inbound:
        try:
            inbound = await self._parse_unchecked(raw)
        except LinkupError as exc:
            label = exc.message_type if isinstance(exc, UnknownType) else None
            self.metrics.message_received(label, len(raw))
            raise
        self.metrics.message_received(inbound.type, inbound.size)
        return inbound

    async def _parse_unchecked(self, raw: bytes) -> Inbound:
        # Large batches: cut the files out unparsed, checking them one at a
        # time and letting heartbeats and other clients run in between.
        if len(raw) >= LARGE_MESSAGE and (cut := cut_payloads(raw)) is not None:
            for payload in cut.payloads:
                if not is_verbatim(payload):
                    break
                await asyncio.sleep(0)
            else:
                inbound = parse_cut_message(cut, len(raw))
                if inbound is not None:
                    return inbound
            del cut
        return parse_client_message(raw)

    async def _forward(self, client: _Client, inbound: Inbound) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "< %s client=%d bytes=%d", inbound.type, client.number, inbound.size
            )
        try:
            await self.link.send(
                Command.CLIENT_MESSAGE,
                {"client": client.number, "message": inbound.header},
                inbound.payloads,
            )
        except Unavailable as exc:
            self._refuse(client, exc)

    def _refuse(self, client: _Client, error: LinkupError) -> None:
        logger.warning(
            "refused message client=%d: %s (%s)", client.number, error, error.code
        )
        self.metrics.error_sent(error.code)
        client.outbox.put_nowait(encode_error(error))

    async def _send_loop(self, client: _Client) -> None:
        websocket = client.websocket
        try:
            while True:
                item = await client.outbox.get()
                if isinstance(item, _Close):
                    await websocket.close(item.code, item.reason)
                    return
                await websocket.send(item, text=True)
        except ConnectionClosed:
            pass

    # Messages from the core (LinkHandler).

    def on_core_message(self, envelope: wire.Envelope) -> None:
        header = envelope.header
        match envelope.command:
            case Command.DELIVER:
                client = self._clients.get(header["client"])
                message = header["message"]
                if client is None:
                    logger.debug("- %s for gone client dropped", message.get("type"))
                    return
                if message.get("type") == "ERROR":
                    self.metrics.error_sent(message.get("code", ""))
                payload = envelope.payloads[0] if envelope.payloads else None
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug(
                        "> %s client=%d payload_bytes=%d",
                        message.get("type"),
                        client.number,
                        0 if payload is None else len(payload),
                    )
                client.outbox.put_nowait(encode_for_client(message, payload))
            case Command.BROADCAST:
                data = orjson.dumps(header["message"])
                for client in self._clients.values():
                    client.outbox.put_nowait(data)
            case Command.CLOSE_CLIENT:
                client = self._clients.get(header["client"])
                if client is not None:
                    logger.info(
                        "core closed client=%d: %s", client.number, header["reason"]
                    )
                    client.outbox.put_nowait(_Close(header["code"], header["reason"]))
            case Command.STATS_REPLY:
                future = self._stats_requests.get(header["request"])
                if future is not None and not future.done():
                    future.set_result(header["stats"])
            case _:
                logger.warning("unexpected command from core %s", envelope.command.name)

    def on_link_lost(self, reason: str) -> None:
        # The core has forgotten our clients, or soon will: close them so that
        # the plugins reconnect and register afresh.
        for client in self._clients.values():
            client.outbox.put_nowait(_Close(CLOSE_CORE_LOST, "linkup core lost"))
        for future in self._stats_requests.values():
            if not future.done():
                future.set_exception(Unavailable(f"linkup core lost: {reason}"))


def _remote(websocket: ServerConnection) -> str:
    address = websocket.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"
