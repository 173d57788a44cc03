"""
linkup-core's I/O shell: one ZeroMQ ROUTER socket driving the scheduler.

The loop is synchronous on purpose: the core owns a single socket and a few
timers, so ``zmq.Poller`` is all the event loop it needs. Each turn it waits
for link messages or the next deadline, feeds the scheduler every message
that is waiting, and flushes the scheduler's output in one place
(:meth:`CoreServer._flush`): one commit and one burst of sends for the lot.

Durability: before anything goes out, the turn's changes are written to the
store (:mod:`core.store`), and submitted files are written to the spool
(:mod:`core.spool`) before the scheduler sees them, so that nothing is
acknowledged that a crash could lose.

Link supervision: every bridge says HELLO first, listing its live
connections, and is answered WELCOME with the ones the core knows; each side
then sends HEARTBEAT whenever it has sent nothing else for
``heartbeat_interval`` seconds, and any message counts as a sign of life.
A bridge silent for ``link_timeout`` seconds, or whose connection drops, is
declared lost and its clients are treated as disconnected. A message from a
bridge the core does not know is answered with RESET.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from core import wire
from core.errors import (
    INTERNAL_ERROR,
    InvalidField,
    LinkupError,
    ProtocolError,
    StorageFailed,
    UnknownType,
)
from core.model import (
    Broadcast,
    Changes,
    ClientClaim,
    ClientRef,
    Disconnect,
    Outgoing,
    Send,
    TaskSpec,
)
from core.observer import LinkedBridge, Observer
from core.scheduler import Scheduler
from core.spool import Spool
from core.store import StorageError, Store
from core.wire import Command
from metrics.core import CoreMetrics

__all__ = ["DEFAULT_BIND", "CoreServer"]

logger = logging.getLogger("linkup.core.server")

# Loopback by default: the link carries file data unencrypted, so exposing it
# beyond the machine must be a deliberate choice.
DEFAULT_BIND = "tcp://127.0.0.1:9528"

# One second between heartbeats. The core notices a bridge that dies at once
# (its connection drops); a bridge notices a dead core by its silence, so a
# shorter timeout would tell sooner, but it must be generous: websockets takes
# a message of the largest size a plugin may send (1 GiB) out of its buffer
# and unmasks it in one go, which holds a bridge's loop for seconds on a slow
# machine (docs/performance.md), and the core must not give it up meanwhile.
DEFAULT_HEARTBEAT_INTERVAL = 1.0
DEFAULT_LINK_TIMEOUT = 10.0

# WebSocket close code for clients the core drops (4000-4999: private use).
CLOSE_DROPPED = 4000

# Link messages handled, at most, before their changes are stored (in one
# transaction) and their output sent: a commit costs more than most messages.
BATCH_MESSAGES = 64

#: A turn's deliveries to one bridge are sent once they carry this much file
#: data or this many deliveries, so that batching never holds many files
#: read back from the spool at once, nor builds a huge header.
BATCH_PAYLOAD_BYTES = 256 * 1024
BATCH_DELIVERIES = 256

# Flags as plain ints: zmq's are enum.IntFlag members, and combining those on
# every frame (as Socket.send_multipart does) costs more than the send.
_SEND_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_SEND_LAST = int(zmq.NOBLOCK)
_RECV_NOW = int(zmq.NOBLOCK)

# Link commands handled in a batch: those that only feed the scheduler. Any
# other is handled after a flush, as it may be answered by the shell at once,
# and an answer must not overtake output of earlier messages. BYE gets no
# answer, and a flush before it would send what its own last messages made to
# a bridge that has gone, and take it for lost.
_BATCHED = frozenset(
    {Command.HEARTBEAT, Command.CLIENT_MESSAGE, Command.CLIENT_GONE, Command.BYE}
)


@dataclass(slots=True)
class _Bridge:
    routing_id: bytes
    instance: str
    #: Which of the bridge's attempts to join this is: a HELLO repeated while
    #: the bridge waits for WELCOME carries the same number.
    join: int
    last_heard: float
    last_sent: float
    #: Whether status pages are open on the bridge, and want views.
    watching: bool = False
    #: Whether the bridge takes DELIVER_MANY (its HELLO says so); a bridge
    #: from before it gets every delivery as a DELIVER of its own.
    deliver_many: bool = False


class _Deliveries:
    """DELIVERs waiting to go to one bridge together."""

    __slots__ = ("items", "payload_bytes")

    def __init__(self) -> None:
        self.items: list[tuple[dict[str, Any], Sequence[Any]]] = []
        self.payload_bytes = 0

    def add(self, header: dict[str, Any], payloads: Sequence[Any]) -> None:
        self.items.append((header, payloads))
        self.payload_bytes += sum(len(payload) for payload in payloads)

    def full(self) -> bool:
        return (
            self.payload_bytes >= BATCH_PAYLOAD_BYTES
            or len(self.items) >= BATCH_DELIVERIES
        )


class CoreServer:
    """
    Serve bridges on ``bind`` and run ``scheduler`` until :meth:`stop`.

    Args:
        context: The ZeroMQ context to make the socket in; the caller owns it.
        bind: Endpoint to bind the ROUTER socket to.
        scheduler: The state machine to drive, already restored from ``store``.
        store: Where the scheduler's changes are written.
        spool: Where submitted files are kept until their task ends.
        instance: This run's id, announced to bridges so that they notice a
            restart; random by default.
        check_room: Called with the size of a batch before it is spooled;
            raises StorageError if the disk has no room for it.
        heartbeat_interval: Seconds between heartbeats to each bridge.
        link_timeout: Seconds of silence after which a bridge is lost.
        metrics: Where to count; None for no metrics.
        clock: Monotonic clock, in seconds.

    """

    def __init__(
        self,
        context: zmq.Context[Any],
        bind: str,
        scheduler: Scheduler,
        store: Store,
        spool: Spool,
        *,
        instance: str | None = None,
        check_room: Callable[[int], None] | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        link_timeout: float = DEFAULT_LINK_TIMEOUT,
        metrics: CoreMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self.spool = spool
        self._check_room = check_room
        self.heartbeat_interval = heartbeat_interval
        self.link_timeout = link_timeout
        self.instance = instance or secrets.token_hex(3)
        self._clock = clock
        self._bridges: dict[bytes, _Bridge] = {}
        self._stopping = False
        self._metrics = metrics
        self._observer = Observer(scheduler, store, spool, metrics)

        self._socket = context.socket(zmq.ROUTER)
        # Unroutable messages raise instead of vanishing, and nothing is
        # dropped at a high-water mark.
        self._socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.setsockopt(zmq.RCVHWM, 0)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(bind)
        except zmq.ZMQError:
            self._socket.close(linger=0)
            raise
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # A bridge killed outright is noticed when its connection drops, not
        # link_timeout later: its workers' tasks go back to the queue at once.
        self._monitor = self._socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def run(self) -> None:
        """
        Serve until :meth:`stop` is called or a signal handler raises.

        """
        logger.info("core listening on %s instance=%s", self.endpoint, self.instance)
        while not self._stopping:
            timeout = self._time_until_next_timer()
            if self._poller.poll(round(timeout * 1000)):
                # What a bridge sent before it went is read before its going
                # is looked into: its last reports, and a BYE that says it
                # left rather than was lost.
                self._receive_waiting()
                if self._monitor.poll(0, zmq.POLLIN):
                    self._on_disconnect_event()
            self._run_timers()
            self._flush()

    def _receive_waiting(self) -> None:
        # Drain everything that is waiting before running timers, flushing
        # after every BATCH_MESSAGES messages and at the end: one commit and
        # one burst of sends for many messages (group commit). Nothing is
        # sent before the batch's changes are stored, as ever.
        handled = 0
        while self._receive_one():
            handled += 1
            if handled == BATCH_MESSAGES:
                self._flush()
                handled = 0
        self._flush()

    def _receive_one(self) -> bool:
        # In a function of its own so that the frames, a whole batch of files
        # perhaps, are freed on return rather than kept until the next one.
        socket = self._socket
        try:
            frame = socket.recv(_RECV_NOW, copy=False)
        except zmq.Again:
            return False
        frames = [frame]
        # The other parts of a message arrive with its first.
        while frame.more:
            frame = socket.recv(copy=False)
            frames.append(frame)
        try:
            self._on_frames(frames)
        except Exception:
            # A bug, or a peer that speaks the protocol wrongly: lose this
            # message, never the core.
            logger.error("bug while handling a link message", exc_info=True)
        return True

    def stop(self) -> None:
        """
        Make :meth:`run` return after its current turn.

        """
        self._stopping = True

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
        self.store.close()
        self.spool.close()
        logger.info("core stopped")

    def _on_disconnect_event(self) -> None:
        # The event does not say which bridge it was: probe them all. With
        # ROUTER_MANDATORY a send to a gone peer fails, and _send forgets it.
        while self._monitor.poll(0, zmq.POLLIN):
            self._monitor.recv_multipart()
        for routing_id in list(self._bridges):
            self._send(routing_id, Command.HEARTBEAT)

    # Timers.

    def _time_until_next_timer(self) -> float:
        now = self._clock()
        deadlines = [now + self.heartbeat_interval, self._observer.due]
        deadlines.extend(
            b.last_sent + self.heartbeat_interval for b in self._bridges.values()
        )
        deadlines.extend(
            b.last_heard + self.link_timeout for b in self._bridges.values()
        )
        scheduler_deadline = self.scheduler.next_deadline()
        if scheduler_deadline is not None:
            deadlines.append(scheduler_deadline)
        return max(0.0, min(deadlines) - now)

    def _run_timers(self) -> None:
        now = self._clock()
        for bridge in list(self._bridges.values()):
            if now - bridge.last_heard >= self.link_timeout:
                logger.warning(
                    "bridge lost after %.1fs of silence bridge=%s",
                    now - bridge.last_heard,
                    bridge.instance,
                )
                self._forget_bridge(bridge.routing_id, now)
        self._heartbeat_due_bridges()

        # Cheap when nothing is due, so no need to ask next_deadline() first.
        self.scheduler.tick(now)

        if now >= self._observer.due:
            watching = [b for b in self._bridges.values() if b.watching]
            view = self._observer.read(now, self._linked(now), bool(watching))
            if view is not None:
                for bridge in watching:
                    self._send(bridge.routing_id, Command.VIEW, {"view": view})

    def _linked(self, now: float) -> list[LinkedBridge]:
        return [
            LinkedBridge(
                bridge.instance[:8],
                len(self.scheduler.known_clients(bridge.routing_id)),
                round(now - bridge.last_heard, 1),
            )
            for bridge in self._bridges.values()
        ]

    def _heartbeat_due_bridges(self) -> None:
        now = self._clock()
        for bridge in list(self._bridges.values()):
            if now - bridge.last_sent >= self.heartbeat_interval:
                self._send(bridge.routing_id, Command.HEARTBEAT)

    # Input.

    def _on_frames(self, frames: Sequence[zmq.Frame]) -> None:
        routing_id = frames[0].bytes
        try:
            envelope = wire.decode(frames[1:])
        except ProtocolError as exc:
            logger.warning("refused link message: %s", exc)
            return

        if envelope.command not in _BATCHED:
            # Answered at once, perhaps: after what earlier messages made.
            self._flush()
        now = self._clock()
        bridge = self._bridges.get(routing_id)
        if envelope.command is Command.HELLO:
            self._on_hello(routing_id, envelope.header, now)
            return
        if bridge is None:
            # The core restarted or declared this bridge lost: it must start
            # over, since the core has forgotten its clients.
            logger.info("message from unknown bridge, sent RESET")
            self._send(routing_id, Command.RESET, {"reason": "unknown bridge"})
            return
        bridge.last_heard = now

        match envelope.command:
            case Command.HEARTBEAT:
                pass
            case Command.CLIENT_MESSAGE:
                client = (routing_id, int(envelope.header["client"]))
                self._on_client_message(client, envelope, now)
            case Command.CLIENT_GONE:
                client = (routing_id, int(envelope.header["client"]))
                logger.debug("< client gone client=%s", client[1])
                self.scheduler.client_gone(client, now)
            case Command.STATS_REQUEST:
                self._send(
                    routing_id,
                    Command.STATS_REPLY,
                    {
                        "request": envelope.header.get("request"),
                        "stats": self.scheduler.statistics(),
                    },
                )
            case Command.WATCH:
                bridge.watching = bool(envelope.header.get("watching"))
                logger.debug("< watch %s bridge=%s", bridge.watching, bridge.instance)
                if bridge.watching:
                    view = self._observer.view(now, self._linked(now))
                    self._send(routing_id, Command.VIEW, {"view": view})
            case Command.BYE:
                logger.info("bridge said goodbye bridge=%s", bridge.instance)
                self._forget_bridge(routing_id, now, lost=False)
            case _:
                logger.warning("unexpected link command %s", envelope.command.name)

    def _on_hello(self, routing_id: bytes, header: dict[str, Any], now: float) -> None:
        instance = str(header.get("bridge", routing_id.hex()))
        join = int(header.get("join", 0))
        known = self._bridges.get(routing_id)
        if known is not None and known.join == join:
            # A repeat of the HELLO already answered: answer it the same way.
            known.last_heard = now
            self._welcome(routing_id, self.scheduler.known_clients(routing_id))
            return

        if header.get("heartbeat") != self.heartbeat_interval:
            logger.warning(
                "bridge heartbeats every %ss, the core every %ss; set "
                "--heartbeat-interval alike on both bridge=%s",
                header.get("heartbeat"),
                self.heartbeat_interval,
                instance,
            )
        claims = [
            ClientClaim(
                int(c["client"]),
                c.get("holds"),
                c.get("report"),
                c.get("results", {}),
                tuple(c.get("sessions", ())),
                bool(c.get("gone", False)),
            )
            for c in header.get("clients", ())
        ]
        self._bridges[routing_id] = _Bridge(
            routing_id,
            instance,
            join,
            now,
            now,
            deliver_many=header.get("deliverMany") is True,
        )
        known_clients = self.scheduler.bridge_joined(routing_id, claims, now)
        logger.info(
            "bridge joined bridge=%s clients=%d known=%d",
            instance,
            len(claims),
            len(known_clients),
        )
        self._welcome(routing_id, known_clients)

    def _welcome(self, routing_id: bytes, known_clients: list[int]) -> None:
        self._send(
            routing_id,
            Command.WELCOME,
            {
                "core": self.instance,
                "heartbeat": self.heartbeat_interval,
                "join": self._bridges[routing_id].join,
                "known": known_clients,
            },
        )

    def _on_client_message(
        self, client: ClientRef, envelope: wire.Envelope, now: float
    ) -> None:
        message = envelope.header.get("message")
        message_type = message.get("type") if isinstance(message, dict) else None
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "< %s client=%s payload_bytes=%d",
                message_type,
                client[1],
                sum(len(p) for p in envelope.payloads),
            )
        try:
            if not isinstance(message, dict) or not isinstance(message_type, str):
                raise ProtocolError("link CLIENT_MESSAGE without a message type")
            self.scheduler.seen(client, now)
            self._dispatch(client, message_type, message, envelope.payloads, now)
        except LinkupError as exc:
            logger.warning(
                "refused %s client=%s: %s (%s)", message_type, client[1], exc, exc.code
            )
            self._reply_error(client, exc.code, str(exc))
            if message_type == "SUBMIT_TASKS" and self._metrics is not None:
                tasks = message.get("tasks") if isinstance(message, dict) else None
                files = len(tasks) if isinstance(tasks, list) else 1
                self._metrics.refused(exc.code, files)
        except Exception:
            logger.error("bug while handling %s", message_type, exc_info=True)
            self._reply_error(client, INTERNAL_ERROR, "internal error")

    def _dispatch(
        self,
        client: ClientRef,
        message_type: str,
        message: dict[str, Any],
        payloads: Sequence[Any],
        now: float,
    ) -> None:
        scheduler = self.scheduler
        match message_type:
            case "WORKER_REGISTER":
                scheduler.register_worker(client, now)
            case "WORKER_HEARTBEAT":
                scheduler.heartbeat(client, now)
            case "CREATE_SESSION":
                scheduler.create_session(client, now)
            case "SUBMIT_TASKS":
                self._submit(client, message, payloads, now)
            case "CANCEL_TASK":
                scheduler.cancel_task(client, message["taskId"], now)
            case "CANCEL_SESSION":
                scheduler.cancel_session(client, message["sessionId"], now)
            case "RESUME_SESSION":
                scheduler.resume_session(
                    client, message["sessionId"], message.get("after", 0), now
                )
            case "TASK_COMPLETED":
                scheduler.complete_task(
                    client, message["taskId"], message["resultUrl"], now
                )
            case "TASK_FAILED":
                scheduler.fail_task(client, message["taskId"], message["error"], now)
            case "TASK_WAITING":
                scheduler.report_waiting(
                    client,
                    message["taskId"],
                    message["waitTime"],
                    message["waitStart"],
                    now,
                )
            case "GET_STATS":
                scheduler.request_stats(client)
            case _:
                raise UnknownType(message_type)

    def _submit(
        self,
        client: ClientRef,
        message: dict[str, Any],
        payloads: Sequence[Any],
        now: float,
    ) -> None:
        # Files go to the spool before the scheduler accepts them, and leave
        # it again if it does not.
        tasks = message["tasks"]
        if len(tasks) != len(payloads):
            raise InvalidField(
                f"{len(tasks)} tasks arrived with {len(payloads)} payloads"
            )
        keys: list[str] = []
        try:
            if self._check_room is not None:
                self._check_room(sum(len(payload) for payload in payloads))
            # All or nothing. Writing a large batch takes a while: bridges
            # must not take the core's silence meanwhile for its loss.
            # TODO: the batch arrives whole (ZeroMQ delivers a multipart
            # message only complete) and stays in memory until it is spooled;
            # files sent and spooled one by one, with flow control on the
            # link, would hold one file instead (docs/performance.md, memory).
            keys = self.spool.put_many(payloads, self._heartbeat_due_bridges)
            specs = [
                TaskSpec(
                    task["filename"], task["mimeType"], task["size"], key, len(payload)
                )
                for task, key, payload in zip(tasks, keys, payloads, strict=True)
            ]
            self.scheduler.submit_tasks(client, message["sessionId"], specs, now)
        except StorageError as exc:
            self._unspool(keys)
            raise StorageFailed(f"linkup core cannot store the files: {exc}") from exc
        except BaseException:
            self._unspool(keys)
            raise

    def _unspool(self, keys: list[str]) -> None:
        # A file that cannot be deleted only takes space; the next start
        # removes it as an orphan.
        if not keys:
            return
        try:
            self.spool.delete_many(keys)
        except StorageError as exc:
            logger.warning("cannot delete %d spooled files: %s", len(keys), exc)

    def _forget_bridge(
        self, routing_id: bytes, now: float, *, lost: bool = True
    ) -> None:
        del self._bridges[routing_id]
        if lost and self._metrics is not None:
            self._metrics.bridges_lost.inc()
        self.scheduler.bridge_gone(routing_id, now)

    # Output.

    def _flush(self) -> None:
        # The one place where scheduler output reaches the disk and the
        # socket, in that order. Sending can lose a bridge, which makes more
        # output: loop until done.
        while True:
            self._store(self.scheduler.take_changes())
            outgoing = self.scheduler.messages_to_send()
            if not outgoing:
                self._observer.after_flush()
                return
            self._deliver(outgoing)

    def _store(self, changes: Changes) -> None:
        if not changes:
            return
        try:
            self.store.save(changes)
        except StorageError:
            # Carrying on would acknowledge what is not stored. Stop; what
            # is stored is consistent, and a restart takes over from there.
            logger.critical("cannot write the queue; stopping", exc_info=True)
            raise SystemExit(3) from None
        self._unspool(changes.freed_payloads)

    def _deliver(self, outgoing: list[Outgoing]) -> None:
        # A turn's deliveries to one bridge leave together, as one
        # DELIVER_MANY: one ZeroMQ message to send and to receive instead of
        # one per delivery, which was most of what the link cost per task.
        # Anything else for a bridge first sends what waits for it, so each
        # bridge sees the scheduler's output in the scheduler's order.
        waiting: dict[bytes, _Deliveries] = {}
        for item in outgoing:
            if isinstance(item, Send):
                bridge_id, number = item.client
                payloads = self._payloads(item)
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug(
                        "> %s client=%s payload_bytes=%d",
                        item.message.get("type"),
                        number,
                        sum(len(p) for p in payloads),
                    )
                header: dict[str, Any] = {"client": number, "message": item.message}
                if item.result is not None:
                    header["result"] = item.result
                batch = waiting.setdefault(bridge_id, _Deliveries())
                batch.add(header, payloads)
                if batch.full():
                    self._send_deliveries(bridge_id, waiting.pop(bridge_id))
            elif isinstance(item, Broadcast):
                self._send_all_deliveries(waiting)
                for bridge_id in list(self._bridges):
                    self._send(bridge_id, Command.BROADCAST, {"message": item.message})
            elif isinstance(item, Disconnect):
                bridge_id, number = item.client
                if bridge_id in waiting:
                    self._send_deliveries(bridge_id, waiting.pop(bridge_id))
                self._send(
                    bridge_id,
                    Command.CLOSE_CLIENT,
                    {"client": number, "code": CLOSE_DROPPED, "reason": item.reason},
                )
        self._send_all_deliveries(waiting)

    def _send_all_deliveries(self, waiting: dict[bytes, _Deliveries]) -> None:
        for bridge_id, batch in waiting.items():
            self._send_deliveries(bridge_id, batch)
        waiting.clear()

    def _send_deliveries(self, bridge_id: bytes, batch: _Deliveries) -> None:
        bridge = self._bridges.get(bridge_id)
        if len(batch.items) == 1 or bridge is None or not bridge.deliver_many:
            for header, payloads in batch.items:
                self._send(bridge_id, Command.DELIVER, header, payloads)
            return
        header, payloads = wire.delivery_batch(batch.items)
        self._send(bridge_id, Command.DELIVER_MANY, header, payloads)

    def _payloads(self, item: Send) -> tuple[Any, ...]:
        if item.payload_key is None:
            return ()
        try:
            return (self.spool.get(item.payload_key),)
        except (KeyError, OSError, StorageError):
            # TODO: fail the task when its spooled file is gone; today the
            # worker gets an empty file. Only someone deleting files from the
            # data dir by hand can cause it.
            logger.error("spooled file missing key=%s", item.payload_key)
            return (b"",)

    def _reply_error(self, client: ClientRef, code: str, message: str) -> None:
        # After the output of the messages before this one, which may be for
        # the same client. The refused request itself changed nothing.
        self._flush()
        bridge_id, number = client
        self._send(
            bridge_id,
            Command.DELIVER,
            {
                "client": number,
                "message": {"type": "ERROR", "code": code, "message": message},
            },
        )

    def _send(
        self,
        routing_id: bytes,
        command: Command,
        header: dict[str, Any] | None = None,
        payloads: Sequence[Any] = (),
    ) -> None:
        # What Socket.send_multipart does, without its per-frame overhead. The
        # link's own frames are small and copied; payloads are sent without a
        # copy (ZeroMQ copies those under its copy_threshold anyway).
        send = self._socket.send
        *head, last = wire.encode(command, header)
        try:
            send(routing_id, _SEND_MORE)
            for frame in head:
                send(frame, _SEND_MORE)
            if payloads:
                send(last, _SEND_MORE)
                for payload in payloads[:-1]:
                    send(payload, _SEND_MORE, copy=False)
                send(payloads[-1], _SEND_LAST, copy=False)
            else:
                send(last, _SEND_LAST)
        except zmq.ZMQError as exc:
            # With ROUTER_MANDATORY and no high-water mark, a send fails only
            # when the bridge has gone away: forget it and its clients now.
            bridge = self._bridges.get(routing_id)
            if bridge is None:
                return
            logger.warning(
                "bridge unreachable (%s), dropped bridge=%s", exc, bridge.instance
            )
            self._forget_bridge(routing_id, self._clock())
            return

        bridge = self._bridges.get(routing_id)
        if bridge is not None:
            bridge.last_sent = self._clock()
