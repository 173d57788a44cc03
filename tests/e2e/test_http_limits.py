"""
What the HTTP side of both processes refuses or bounds: methods, other sites'
pages, oversized page messages, and idle connections to the core's metrics.
"""

from __future__ import annotations

import asyncio
import http.client
import socket

import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from bridge.live import MAX_PAGE_MESSAGE
from metrics.serve import MAX_CONNECTIONS
from tests.e2e.harness import TIMEOUT, eventually, http_get


def request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


async def read_until_closed(feed: ClientConnection) -> None:
    # Views keep coming until the bridge closes the page.
    async with asyncio.timeout(TIMEOUT):
        async for _ in feed:
            pass


@pytest.fixture
def port(deployment) -> int:
    _, port = deployment.linkup()
    return port


def test_head_answers_headers_without_a_body(port):
    """HEAD /metrics: the headers of GET, Content-Length included, no body."""
    status, headers, body = request(port, "HEAD", "/metrics")
    assert status == 200
    assert int(headers["Content-Length"]) > 0
    assert body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_are_refused(port, method):
    """Only GET and HEAD are served; nothing is done for a POST to /status."""
    status, _, body = request(port, method, "/status")
    assert status == 405
    assert b"GET" in body


async def test_a_page_of_another_site_cannot_follow_the_feed(port):
    """A browser's cross-origin WebSocket to /status/live is refused with 403."""
    url = f"ws://127.0.0.1:{port}/status/live"
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, origin="http://evil.example")
    assert refused.value.response.status_code == 403

    async with connect(url, origin=f"http://127.0.0.1:{port}") as feed:
        assert b'"type":"view"' in await asyncio.wait_for(
            feed.recv(decode=False), TIMEOUT
        )


async def test_a_page_that_sends_a_large_message_is_closed(port):
    """Over MAX_PAGE_MESSAGE from a page: closed with 1009, nothing buffered."""
    async with connect(f"ws://127.0.0.1:{port}/status/live") as feed:
        await feed.send("x" * (MAX_PAGE_MESSAGE + 1))
        with pytest.raises(ConnectionClosedError) as closed:
            await read_until_closed(feed)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


async def test_idle_connections_cannot_pile_up_threads_in_the_core(deployment):
    """Many silent connections to the core's metrics: all but a few are closed."""
    linkup, port = deployment.linkup()
    (core,) = [
        child
        for child in psutil.Process(linkup.pid).children()
        if "core" in child.cmdline()
    ]
    threads_before = core.num_threads()

    idle = []
    try:
        for _ in range(5 * MAX_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", linkup.metrics_port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
            sock.setblocking(False)
            idle.append(sock)

        async def others_closed() -> bool:
            return sum(map(_closed_by_peer, idle)) >= 4 * MAX_CONNECTIONS

        await eventually(others_closed, "the connections beyond the slots closed")
        # A few threads of the core's own may come and go besides the slots.
        assert core.num_threads() <= threads_before + MAX_CONNECTIONS + 2
        status, _, _ = await asyncio.to_thread(
            http_get, f"http://127.0.0.1:{port}/readyz"
        )
        assert status == 200
    finally:
        for sock in idle:
            sock.close()

    async def scraped() -> bool:
        try:
            status, _, body = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{linkup.metrics_port}/metrics", 1.0
            )
        except OSError:
            return False
        return status == 200 and b"linkup_workers" in body

    await eventually(scraped, "a scrape after the idle connections closed")


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
