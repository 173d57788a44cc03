"""
The bridge's Prometheus metrics.

Label values come from fixed sets only (known message types plus ``other``,
known error codes), never from what a client sends, so the number of series
stays bounded however many clients come.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["BridgeMetrics"]

OTHER = "other"
#: Label for messages refused as malformed: not JSON, no type, or fields
#: that do not match their type's schema.
INVALID = "invalid"


class BridgeMetrics:
    """
    Create the bridge's metrics in ``registry``.

    Args:
        registry: Where to register; a new one per bridge keeps tests apart.
        message_types: The message types clients may send.
        error_codes: The error codes clients may be sent.

    """

    def __init__(
        self,
        registry: CollectorRegistry,
        message_types: Iterable[str],
        error_codes: Iterable[str],
    ) -> None:
        self._message_types = frozenset(message_types)
        self._error_codes = frozenset(error_codes)
        self.connections = Gauge(
            "linkup_bridge_websocket_connections",
            "WebSocket connections open on this bridge.",
            registry=registry,
        )
        self.messages_received = Counter(
            "linkup_bridge_messages_received_total",
            "Messages received from clients, by type.",
            ["type"],
            registry=registry,
        )
        self.errors_sent = Counter(
            "linkup_bridge_errors_sent_total",
            "ERROR replies sent to clients, by code.",
            ["code"],
            registry=registry,
        )
        self.received_bytes = Counter(
            "linkup_bridge_received_bytes_total",
            "Bytes of client messages received.",
            registry=registry,
        )
        self.core_link_up = Gauge(
            "linkup_bridge_core_link_up",
            "1 while the core knows this bridge, else 0.",
            registry=registry,
        )
        # Series for every known label value exist from the first scrape.
        for message_type in (*self._message_types, OTHER, INVALID):
            self.messages_received.labels(message_type)
        for code in (*self._error_codes, OTHER):
            self.errors_sent.labels(code)

    def message_received(self, message_type: str | None, size: int) -> None:
        """
        Count a message; ``message_type`` is None if it was malformed.

        """
        if message_type is None:
            label = INVALID
        elif message_type in self._message_types:
            label = message_type
        else:
            label = OTHER
        self.messages_received.labels(label).inc()
        self.received_bytes.inc(size)

    def error_sent(self, code: str) -> None:
        self.errors_sent.labels(code if code in self._error_codes else OTHER).inc()
