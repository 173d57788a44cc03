"""
The core's metrics endpoint: an HTTP server on a thread of its own.

prometheus-client's ``start_http_server`` starts a thread per connection
with no limit and no timeout, so connections that send nothing pile up
threads that take the GIL from the core's loop. This one serves the same
WSGI app with a few threads at most, and drops a connection that stays
silent.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

__all__ = ["MetricsServer"]

logger = logging.getLogger("linkup.metrics")

#: Scrapes served at once; further connections are closed at once.
MAX_CONNECTIONS = 8
#: Seconds a connection may stay silent before it is dropped.
CONNECTION_TIMEOUT = 5.0


class _Handler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        # Every scrape would be a line on stderr.
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Threads are not waited for when the server closes: each ends within
    # CONNECTION_TIMEOUT by itself.
    block_on_close = False

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily):
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            logger.warning("metrics: %d scrapes at once, one refused", MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went silent or away; nothing of the core's.
        logger.debug("metrics: connection from %s ended badly", client_address)


class MetricsServer:
    """
    Serve ``registry`` on ``host``:``port`` until :meth:`close`.

    Raises:
        OSError: The address cannot be bound.

    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = _Server((host, port), family)
        self._server.set_app(make_wsgi_app(registry))
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
