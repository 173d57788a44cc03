"""
Plain HTTP on the WebSocket port: the status page, ``/status`` and friends.

websockets hands every request to :func:`respond` before its handshake. A
WebSocket upgrade, on any path (the plugin sends whatever path the user typed),
goes on to the handshake, where the bridge tells the status page's feed
(``/status/live``) from plugins; anything else is answered here.
"""

from __future__ import annotations

import dataclasses
import email.utils
import http
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from bridge.live import LIVE_PATH
from core.errors import Unavailable

if TYPE_CHECKING:
    from bridge.server import Bridge

__all__ = ["respond"]

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    ".json": "application/json",
}


_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _load_static() -> dict[str, tuple[bytes, str]]:
    # Every file the page needs, read once at start, by the path it is served
    # at: a request can only ever name one of these, never another file.
    files: dict[str, tuple[bytes, str]] = {}
    pending = [(resources.files("bridge").joinpath("static"), "/static")]
    while pending:
        directory, prefix = pending.pop()
        for entry in directory.iterdir():
            path = f"{prefix}/{entry.name}"
            if entry.is_dir():
                pending.append((entry, path))
            else:
                suffix = "." + entry.name.rpartition(".")[2]
                content_type = _CONTENT_TYPES.get(suffix, "application/octet-stream")
                files[path] = (entry.read_bytes(), content_type)
    files["/"] = files["/index.html"] = files["/static/index.html"]
    return files


_STATIC = _load_static()


async def respond(bridge: Bridge, request: Request) -> Response | None:
    """
    Answer a plain HTTP request, or return None to go on with a WebSocket.

    """
    path = urlsplit(request.path).path
    if request.headers.get("Upgrade", "").lower() == "websocket":
        if path == LIVE_PATH and not _same_origin(request.headers):
            # Another site open in a LAN user's browser must not read what
            # is being uploaded; plugins and other tools send no such Origin.
            return _json(http.HTTPStatus.FORBIDDEN, {"error": "cross-origin page"})
        return None

    if request.method not in ("GET", "HEAD"):
        return _json(http.HTTPStatus.METHOD_NOT_ALLOWED, {"error": "only GET and HEAD"})
    response = await _answer(bridge, path)
    if request.method == "HEAD":
        # Same headers, Content-Length included; no body.
        response = dataclasses.replace(response, body=b"")
    return response


def _same_origin(headers: Headers) -> bool:
    origin = headers.get("Origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == headers.get("Host", "").lower()


async def _answer(bridge: Bridge, path: str) -> Response:
    if path == "/status":
        try:
            stats = await bridge.fetch_stats()
        except Unavailable as exc:
            return _json(http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        return _json(http.HTTPStatus.OK, stats)
    if path in _STATIC:
        body, content_type = _STATIC[path]
        return _response(http.HTTPStatus.OK, body, content_type)
    if path == "/metrics":
        return _response(
            http.HTTPStatus.OK, generate_latest(bridge.registry), CONTENT_TYPE_LATEST
        )
    if path == "/healthz":
        return _json(http.HTTPStatus.OK, {"status": "ok"})
    if path == "/readyz":
        if bridge.link.up.is_set():
            return _json(http.HTTPStatus.OK, {"status": "ready"})
        return _json(
            http.HTTPStatus.SERVICE_UNAVAILABLE, {"status": "core unreachable"}
        )
    return _json(http.HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})


def _json(status: http.HTTPStatus, body: object) -> Response:
    return _response(status, orjson.dumps(body), "application/json")


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
            # The first server let any page read /status; keep that.
            ("Access-Control-Allow-Origin", "*"),
            # The status page shows client-supplied filenames. It writes them
            # as text; should markup slip in anyway, nothing but the bridge's
            # own files may run or load.
            ("Content-Security-Policy", _CONTENT_SECURITY_POLICY),
        ]
    )
    return Response(status.value, status.phrase, headers, body)
