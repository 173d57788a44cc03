"""
The bridge's Prometheus metrics.

Label values come from fixed sets only (known message types plus ``other``,
known error codes, three roles), never from what a client sends, so the
number of series stays bounded however many clients come.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ROLES", "BridgeMetrics"]

OTHER = "other"
#: Label for messages refused as malformed: not JSON, no type, or fields
#: that do not match their type's schema.
INVALID = "invalid"
#: What a connection is to the core: given a role by WORKER_REGISTERED, or by
#: SESSION_CREATED or SESSION_RESUMED, or not (yet).
ROLES = ("worker", "master", "none")

KIB = 1024
MIB = 1024 * KIB
# From a heartbeat to a whole batch of files in one message.
MESSAGE_BYTES_BUCKETS = (256, 4 * KIB, 64 * KIB, MIB, 16 * MIB, 256 * MIB, 1024 * MIB)


class BridgeMetrics:
    """
    Create the bridge's metrics in ``registry``.

    Args:
        registry: Where to register; a new one per bridge keeps tests apart.
        message_types: The message types clients may send.
        outbound_types: The message types clients may be sent.
        error_codes: The error codes clients may be sent.

    """

    def __init__(
        self,
        registry: CollectorRegistry,
        message_types: Iterable[str],
        outbound_types: Iterable[str],
        error_codes: Iterable[str],
    ) -> None:
        self._message_types = frozenset(message_types)
        self._outbound_types = frozenset(outbound_types)
        self._error_codes = frozenset(error_codes)
        self.connections = Gauge(
            "linkup_websocket_connections",
            "Plugin WebSocket connections open on this bridge, by role.",
            ["role"],
            registry=registry,
        )
        self.messages_received = Counter(
            "linkup_websocket_messages_received",
            "Messages received from clients, by type.",
            ["type"],
            registry=registry,
        )
        self.messages_sent = Counter(
            "linkup_websocket_messages_sent",
            "Messages queued for clients, by type.",
            ["type"],
            registry=registry,
        )
        self.errors_sent = Counter(
            "linkup_websocket_errors_sent",
            "ERROR replies sent to clients, by code.",
            ["code"],
            registry=registry,
        )
        self.message_bytes = Histogram(
            "linkup_websocket_message_bytes",
            "Sizes of WebSocket messages, received from or queued for clients.",
            ["direction"],
            buckets=MESSAGE_BYTES_BUCKETS,
            registry=registry,
        )
        self.core_link_up = Gauge(
            "linkup_core_link_up",
            "1 while the core knows this bridge, else 0.",
            registry=registry,
        )
        self.core_link_losses = Counter(
            "linkup_core_link_losses",
            "Times the link to the core was lost.",
            registry=registry,
        )
        self.status_viewers = Gauge(
            "linkup_status_viewers",
            "Live status pages connected to this bridge.",
            registry=registry,
        )
        # Series for every known label value exist from the first scrape.
        # The children are kept: labels() costs microseconds per message.
        self._received = {
            label: self.messages_received.labels(label) for label in self._message_types
        }
        self._received_other = self.messages_received.labels(OTHER)
        self._received_invalid = self.messages_received.labels(INVALID)
        self._sent = {
            label: self.messages_sent.labels(label) for label in self._outbound_types
        }
        self._sent_other = self.messages_sent.labels(OTHER)
        self._errors = {
            code: self.errors_sent.labels(code) for code in self._error_codes
        }
        self._errors_other = self.errors_sent.labels(OTHER)
        self._received_bytes = self.message_bytes.labels("received")
        self._sent_bytes = self.message_bytes.labels("sent")

    def message_received(self, message_type: str | None, size: int) -> None:
        """
        Count a message; ``message_type`` is None if it was malformed.

        """
        if message_type is None:
            self._received_invalid.inc()
        else:
            self._received.get(message_type, self._received_other).inc()
        self._received_bytes.observe(size)

    def message_sent(self, message_type: object, size: int) -> None:
        counter = (
            self._sent.get(message_type) if isinstance(message_type, str) else None
        )
        (self._sent_other if counter is None else counter).inc()
        self._sent_bytes.observe(size)

    def error_sent(self, code: str) -> None:
        self._errors.get(code, self._errors_other).inc()
