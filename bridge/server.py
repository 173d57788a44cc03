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
import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
import websockets
import zmq.asyncio
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from bridge import http
from bridge.connection import COALESCE_BYTES, BridgeConnection
from bridge.continuity import OPENING_REQUESTS, REPORTS, Continuity
from bridge.link import CoreLink
from bridge.live import LIVE_PATH, LiveStatus
from bridge.memory import RELEASE_MEMORY_AFTER
from bridge.messages import (
    KNOWN_TYPES,
    OUTBOUND_TYPES,
    Inbound,
    Spliced,
    encode_error,
    parse_client_message,
    parse_cut_message,
    splice_for_client,
)
from bridge.outbox import DEFAULT_MAX_BYTES, Close, Outbox
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
from metrics.bridge import ROLES, BridgeMetrics
from metrics.build import new_registry

__all__ = ["Bridge", "BridgeOptions"]

logger = logging.getLogger("linkup.bridge")

# WebSocket close codes the bridge uses.
CLOSE_CORE_LOST = 1011
CLOSE_TRY_AGAIN_LATER = 1013

# How long a close may wait for the closing handshake before the TCP
# connection is reset. KeepaliveConnection makes it bound the whole close,
# even for a client that has stopped reading, and the bridge's shutdown with
# it: below the 5 s that `linkup` gives the bridge to stop.
CLOSE_TIMEOUT = 4.0


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
    #: WebSocket keepalive: a ping every ping_interval; a connection is
    #: closed when a ping has waited ping_timeout for its pong while no byte
    #: moved either way (bridge.keepalive), so a client busy sending or
    #: receiving a large message is never mistaken for a dead one.
    ping_interval: float = 20.0
    ping_timeout: float = 60.0
    #: Bytes a client's outbox may hold before the client is closed as too
    #: slow (bridge.outbox).
    max_outbox_bytes: int = DEFAULT_MAX_BYTES
    #: How long clients stay connected while the core is away, so that a
    #: restarted core can take them back; after that they are closed.
    core_grace: float = 120.0


# The name the rest of this module uses for a queued close.
_Close = Close


@dataclass(eq=False, slots=True)
class _Client:
    number: int
    websocket: BridgeConnection
    #: Bounded: see bridge.outbox.
    outbox: Outbox
    continuity: Continuity = field(default_factory=Continuity)


class Bridge:
    """
    One bridge: serve plugins on ``options.host:options.port``, relay to a core.

    """

    def __init__(
        self,
        context: zmq.asyncio.Context,
        options: BridgeOptions,
        *,
        release_memory: Callable[[], None] | None = None,
    ) -> None:
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
        self._close_timer: asyncio.TimerHandle | None = None
        #: Workers that reported while the core was away and then left: their
        #: reports still go to the core in the claims, marked gone.
        self._departed: dict[int, Continuity] = {}
        self._request_numbers = itertools.count(1)
        self._background: set[asyncio.Task[None]] = set()
        #: Gives the heap's free memory back (bridge.memory), if anything.
        self._release_memory = release_memory
        #: Bytes of large messages received and of payloads sent, so far.
        self._large_bytes = 0

        self.live = LiveStatus(self.link.instance[:8], self._watch)

        # /metrics is served on this loop (bridge.http), so these functions
        # read the bridge's state from its own thread.
        self.registry = new_registry("bridge")
        self.metrics = BridgeMetrics(
            self.registry, KNOWN_TYPES, OUTBOUND_TYPES, ERROR_CODES
        )
        for role in ROLES:
            self.metrics.connections.labels(role).set_function(
                functools.partial(self._count_clients, role)
            )
        self.metrics.core_link_up.set_function(lambda: int(self.link.up.is_set()))
        self.metrics.status_viewers.set_function(lambda: self.live.viewers)

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
                    # BridgeConnection (a KeepaliveConnection) takes
                    # ping_timeout as the time a ping may wait while no byte
                    # moves either way; it turns websockets' own, pong-only,
                    # timeout off. It also sends and reads with fewer copies.
                    create_connection=BridgeConnection,
                    ping_interval=self.options.ping_interval,
                    ping_timeout=self.options.ping_timeout,
                    close_timeout=CLOSE_TIMEOUT,
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
                if self._release_memory is not None:
                    tasks.create_task(self._release_memory_when_idle())
                await asyncio.Future()  # until cancelled
        finally:
            await self.link.close()
            logger.info("bridge stopped")

    async def _release_memory_when_idle(self) -> None:
        # Files in flight reuse the heap's memory (bridge.memory); once they
        # stop, it goes back to the system.
        assert self._release_memory is not None
        seen = self._large_bytes
        held = False
        while True:
            await asyncio.sleep(RELEASE_MEMORY_AFTER)
            if self._large_bytes != seen:
                seen = self._large_bytes
                held = True
            elif held:
                self._release_memory()
                held = False

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

    def _count_clients(self, role: str) -> int:
        return sum(1 for c in self._clients.values() if c.continuity.role == role)

    def _watch(self, watching: bool) -> None:
        async def send() -> None:
            with contextlib.suppress(Unavailable):
                await self.link.send(Command.WATCH, {"watching": watching})

        # Kept until done: the loop holds only weak references to tasks.
        task = asyncio.create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _serve_client(self, websocket: ServerConnection) -> None:
        request = websocket.request
        if request is not None and urlsplit(request.path).path == LIVE_PATH:
            await self.live.serve(websocket)
            return

        if not self.link.up.is_set():
            try:
                await asyncio.wait_for(self.link.up.wait(), self.options.link_timeout)
            except TimeoutError:
                await websocket.close(
                    CLOSE_TRY_AGAIN_LATER, "linkup core unavailable, try again later"
                )
                return

        assert isinstance(websocket, BridgeConnection)
        client = _Client(
            next(self._numbers), websocket, Outbox(self.options.max_outbox_bytes)
        )
        self._clients[client.number] = client
        # The path only: a query string may carry what a user meant as secret.
        logger.info(
            "client connected client=%d remote=%s path=%s",
            client.number,
            _remote(websocket),
            urlsplit(websocket.request.path).path if websocket.request else "?",
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
                if inbound.size >= LARGE_MESSAGE:
                    # websockets keeps the last frame it parsed, here the
                    # whole batch, until the next one arrives: a ping makes
                    # the plugin's pong that next frame.
                    await websocket.ping()
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
            try:
                await self.link.send(Command.CLIENT_GONE, {"client": client.number})
            except Unavailable:
                # The core hears of it from the claims when it is back.
                if client.continuity.has_role:
                    if client.continuity.report is not None:
                        self._departed[client.number] = client.continuity
                    self.link.claims_changed()
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
        if len(raw) >= LARGE_MESSAGE:
            self._large_bytes += len(raw)
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

    # TODO: a per-client limit on requests in flight; a client that floods
    # GET_STATS (or any request) is served in turn with everyone else, and
    # delays the others' messages behind its own at the core.
    async def _forward(self, client: _Client, inbound: Inbound) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "< %s client=%d bytes=%d", inbound.type, client.number, inbound.size
            )
        try:
            # TODO: one link message per client message, a tenth of the
            # bridge's CPU per small task; the answers of one turn of the loop
            # could go in one message, as the core's deliveries do
            # (docs/performance.md, 1 KiB files).
            await self.link.send(
                Command.CLIENT_MESSAGE,
                {"client": client.number, "message": inbound.header},
                inbound.payloads,
            )
        except Unavailable as exc:
            self._hold_while_away(client, inbound, exc)
        else:
            client.continuity.forwarded(inbound.type, inbound.header)

    def _hold_while_away(
        self, client: _Client, inbound: Inbound, error: Unavailable
    ) -> None:
        # The core is away. A report is kept for it; signs of life are not
        # needed (the core hears of live connections when it is back); any
        # other request is refused, so that the client knows.
        if inbound.type in REPORTS:
            logger.info(
                "core away, report kept client=%d type=%s", client.number, inbound.type
            )
            client.continuity.keep_report(inbound.header)
            self.link.claims_changed()
        elif inbound.type in ("WORKER_HEARTBEAT", "TASK_WAITING"):
            logger.debug("- %s dropped while the core is away", inbound.type)
        elif inbound.type in OPENING_REQUESTS:
            self._close(client, CLOSE_TRY_AGAIN_LATER, f"{error}")
        else:
            self._refuse(client, error)

    def _refuse(self, client: _Client, error: LinkupError) -> None:
        logger.warning(
            "refused message client=%d: %s (%s)", client.number, error, error.code
        )
        self.metrics.error_sent(error.code)
        data = encode_error(error)
        self.metrics.message_sent("ERROR", len(data))
        client.outbox.put_nowait(data)

    async def _send_loop(self, client: _Client) -> None:
        # The only writer to this WebSocket. Other tasks only put into the
        # outbox, which never waits: a client that reads slowly holds up this
        # loop and nothing else.
        websocket = client.websocket
        outbox = client.outbox
        sending: asyncio.Timeout | None = None

        def overflowed(close: Close) -> None:
            logger.warning(
                "closing client=%d: %s (--max-outbox %d)",
                client.number,
                close.reason,
                self.options.max_outbox_bytes,
            )
            # The message being sent may be stuck behind a peer that does not
            # read: stop waiting for it (expire the timeout now), and go on to
            # the Close now queued.
            if sending is not None:
                sending.reschedule(-1)

        outbox.on_overflow = overflowed
        try:
            while True:
                item = await outbox.get()
                if isinstance(item, Close):
                    # Bounded by CLOSE_TIMEOUT (KeepaliveConnection.close).
                    await websocket.close(item.code, item.reason)
                    return
                # The small messages waiting behind it go in the same write.
                batch = [item, *outbox.take_ready(COALESCE_BYTES)]
                try:
                    # Cancelling send_messages() is safe here: it only ever
                    # waits after writing every frame to the transport, for
                    # the buffer to drain.
                    async with asyncio.timeout(None) as sending:
                        await websocket.send_messages(batch)
                except TimeoutError:
                    pass
                finally:
                    sending = None
        except ConnectionClosed:
            pass

    def _broadcast(self, message: dict[str, Any]) -> None:
        data = orjson.dumps(message)
        message_type = message.get("type")
        # A STATS_UPDATE is a snapshot: a client that has not yet been sent
        # the previous one gets only the newest.
        put = Outbox.put_latest if message_type == "STATS_UPDATE" else Outbox.put_nowait
        for client in self._clients.values():
            self.metrics.message_sent(message_type, len(data))
            put(client.outbox, data)

    # Messages from the core (LinkHandler).

    def on_core_message(self, envelope: wire.Envelope) -> None:
        header = envelope.header
        match envelope.command:
            case Command.DELIVER:
                self._deliver(envelope)
            case Command.DELIVER_MANY:
                # Each delivery on its own, as if each had come alone: a bug
                # with one must not cost the others their messages.
                for delivery in wire.deliveries(envelope):
                    try:
                        self._deliver(delivery)
                    except Exception:
                        logger.error("bug while handling a delivery", exc_info=True)
            case Command.BROADCAST:
                self._broadcast(header["message"])
            case Command.CLOSE_CLIENT:
                client = self._clients.get(header["client"])
                if client is not None:
                    logger.info(
                        "core closed client=%d: %s", client.number, header["reason"]
                    )
                    client.outbox.put_nowait(_Close(header["code"], header["reason"]))
            case Command.VIEW:
                self.live.on_view(header["view"])
            case Command.STATS_REPLY:
                future = self._stats_requests.get(header["request"])
                if future is not None and not future.done():
                    future.set_result(header["stats"])
            case _:
                logger.warning("unexpected command from core %s", envelope.command.name)

    def _deliver(self, envelope: wire.Envelope) -> None:
        header = envelope.header
        client = self._clients.get(header["client"])
        message = header["message"]
        if client is None:
            logger.debug("- %s for gone client dropped", message.get("type"))
            return
        if message.get("type") == "ERROR":
            self.metrics.error_sent(message.get("code", ""))
        client.continuity.delivered(message, header.get("result"))
        payload = envelope.payloads[0] if envelope.payloads else None
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "> %s client=%d payload_bytes=%d",
                message.get("type"),
                client.number,
                0 if payload is None else len(payload),
            )
        if payload is None:
            data: bytes | Spliced = orjson.dumps(message)
        else:
            data = splice_for_client(message, payload)
            self._large_bytes += len(data)
        self.metrics.message_sent(message.get("type"), len(data))
        client.outbox.put_nowait(data)

    def client_claims(self) -> list[dict[str, Any]]:
        claims = [
            client.continuity.claim(number)
            for number, client in self._clients.items()
            if client.continuity.has_role
        ]
        claims.extend(
            {**continuity.claim(number), "gone": True}
            for number, continuity in self._departed.items()
        )
        return claims

    def on_link_up(self, known: list[int], core_restarted: bool) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._departed.clear()
        self.live.on_link(True)

        # A connection with a role the core no longer has (a core without a
        # data dir restarted, or it gave this bridge up) must start over.
        known_set = set(known)
        for client in self._clients.values():
            if client.continuity.has_role and client.number not in known_set:
                client.continuity.has_role = False
                self._close(client, CLOSE_CORE_LOST, "linkup core lost this connection")

    def on_link_lost(self, reason: str) -> None:
        self.metrics.core_link_losses.inc()
        self.live.on_link(False)
        for future in self._stats_requests.values():
            if not future.done():
                future.set_exception(Unavailable(f"linkup core lost: {reason}"))

        # A request the core may never have received is not left waiting.
        for client in self._clients.values():
            awaiting = client.continuity.awaiting
            if awaiting is None:
                continue
            client.continuity.awaiting = None
            reason = f"linkup core stopped before answering {awaiting}"
            if awaiting in OPENING_REQUESTS:
                self._close(client, CLOSE_CORE_LOST, reason)
            else:
                self._refuse(client, Unavailable(f"{reason}; send it again"))

        # Clients stay connected for a while, so that a restarted core can
        # take them back; after that they are closed and reconnect.
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(
                self.options.core_grace, self._close_all_after_grace
            )

    def _close_all_after_grace(self) -> None:
        self._close_timer = None
        if self.link.up.is_set():
            return
        logger.warning(
            "core away for %gs, closing %d clients",
            self.options.core_grace,
            len(self._clients),
        )
        for client in self._clients.values():
            self._close(client, CLOSE_CORE_LOST, "linkup core lost")

    def _close(self, client: _Client, code: int, reason: str) -> None:
        client.outbox.put_nowait(_Close(code, reason))


def _remote(websocket: ServerConnection) -> str:
    address = websocket.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"
