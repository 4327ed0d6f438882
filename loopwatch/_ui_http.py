"""The live page's HTTP plumbing: ASGI types, responses, its static files, its headers."""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = [
    "JSON", "NO_STORE", "SECURITY", "STATIC", "ASGIApp", "Headers", "Receive", "Scope", "Send",
    "Static", "busy", "gzip_if", "not_found", "not_http", "query", "query_int", "refuse",
    "respond", "route_path", "send_static",
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

GZIP_MIN_BYTES = 1024
STATIC = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
}
#: Everything the page loads comes from its own origin; nothing inline, no other host.
SECURITY = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]
JSON = (b"content-type", b"application/json")
NO_STORE = (b"cache-control", b"no-store")


class Static:
    """A file of the page, read once: its bytes, gzipped bytes and ETag."""

    __slots__ = ("body", "content_type", "etag", "gzipped")

    def __init__(self, name: str) -> None:
        self.body = (importlib.resources.files("loopwatch") / "_ui_static" / name).read_bytes()
        self.gzipped = gzip.compress(self.body, compresslevel=9, mtime=0)
        self.etag = b'"' + hashlib.sha256(self.body).hexdigest()[:16].encode() + b'"'
        self.content_type = STATIC[name]


def query(scope: Scope) -> dict[str, str]:
    """The page's few query parameters; nothing at all from a query string of more than 8."""
    raw = scope.get("query_string", b"").decode("latin-1")
    try:
        return dict(urllib.parse.parse_qsl(raw, max_num_fields=8))
    except ValueError:
        return {}


def query_int(query: dict[str, str], name: str, default: int) -> int:
    value = query.get(name, "")
    if value.lstrip("-").isdigit() and len(value) <= 20:
        return int(value)
    return default


def gzip_if(body: bytes, accept_gzip: bool) -> tuple[bytes, bool]:
    if accept_gzip and len(body) >= GZIP_MIN_BYTES:
        return gzip.compress(body, compresslevel=5, mtime=0), True
    return body, False


def route_path(scope: Scope) -> str:
    """The path below the mount (Starlette keeps the full path and extends root_path)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


async def respond(send: Send, status: int, body: bytes, headers: Headers, head: bool) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def send_static(send: Send, static: Static, headers: dict[bytes, bytes],
                      accept_gzip: bool, head: bool) -> None:
    out: Headers = [(b"content-type", static.content_type), (b"etag", static.etag),
                    (b"cache-control", b"no-cache"), (b"vary", b"Accept-Encoding"), *SECURITY]
    if headers.get(b"if-none-match") == static.etag:
        await respond(send, 304, b"", out, True)
        return
    body = static.body
    if accept_gzip:
        body = static.gzipped
        out.append((b"content-encoding", b"gzip"))
    await respond(send, 200, body, out, head)


async def busy(send: Send, head: bool) -> None:
    await respond(send, 503, b'{"detail":"busy: retry"}',
                  [JSON, NO_STORE, (b"retry-after", b"1")], head)


async def not_found(send: Send, head: bool) -> None:
    await respond(send, 404, b"Not Found\n", [(b"content-type", b"text/plain")], head)


async def refuse(send: Send, verdict: str, head: bool) -> None:
    if verdict == "token":
        status = 401
        text = ("This page needs its token: open it once as <mount>/?token=<token>, or send "
                "Authorization: Bearer <token>.\n")
        extra: Headers = [(b"www-authenticate", b'Bearer realm="loopwatch"')]
    else:
        status, text, extra = 403, "Forbidden\n", []
    await respond(send, status, text.encode(),
                  [(b"content-type", b"text/plain; charset=utf-8"), NO_STORE, *extra], head)


async def not_http(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":  # served on its own, without a framework around it
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1003})
