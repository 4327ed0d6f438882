"""The two ways docs/hardening.md shows to keep loopwatch's endpoints private, as apps to test.

``build_private_port(public_app_port=..., admin_port=...)``: the app serves no metrics on its
own port; its lifespan runs a second uvicorn server, on the same event loop, that serves
``/metrics`` and ``/loopwatch/events`` on another port (bind it to 127.0.0.1 or an internal
interface). ``build_token(token)``: the endpoints stay on the app's port behind a bearer
token. The code between the ``# --8<--`` markers is quoted in docs/hardening.md.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

# --8<-- [start:private-port]
import asyncio
import contextlib
import socket

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

import loopwatch


class SideServer(uvicorn.Server):
    """A uvicorn server run from the app's lifespan: the main server owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


def admin_lifespan(port: int, host: str = "127.0.0.1", registry: Any = None) -> Any:
    """A lifespan that serves /metrics and /loopwatch/events on ``host:port``, on the app's
    own event loop (events_app shows the monitor of the loop it runs on). With
    ``--workers N`` every worker binds the port with SO_REUSEPORT and any of them answers a
    scrape (multiprocess mode aggregates them all)."""
    admin = Starlette(routes=[
        Mount("/metrics", loopwatch.metrics_app(registry)),
        Mount("/loopwatch/events", loopwatch.events_app()),
    ])

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        server = SideServer(uvicorn.Config(admin, lifespan="off", log_level="warning"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            yield
        finally:
            server.should_exit = True
            await task
            sock.close()

    return lifespan
# --8<-- [end:private-port]


def build_private_port(admin_port: int, registry: CollectorRegistry | None = None) -> FastAPI:
    # --8<-- [start:private-port-usage]
    app = FastAPI(lifespan=admin_lifespan(port=admin_port, registry=registry))
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry)
    # no /metrics or /loopwatch/events on the public port
    # --8<-- [end:private-port-usage]

    @app.get("/block")
    async def block(ms: int = 0) -> dict[str, int]:
        import time

        time.sleep(ms / 1000)  # noqa: ASYNC251 - blocking on purpose
        return {"blocked": ms}

    return app


# --8<-- [start:token]
def require_token(app: Any, token: str) -> Any:
    """``app`` (an ASGI app) for HTTP requests bearing ``Authorization: Bearer <token>``
    only; anything else gets 401. Prometheus sends it with ``authorization:
    {credentials: <token>}`` in the scrape config."""
    if len(token) < 16:
        raise ValueError("the metrics token must be at least 16 characters")
    expected = f"Bearer {token}".encode()

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = b""
            for name, value in scope["headers"]:
                if name.lower() == b"authorization":
                    given = value
            if not hmac.compare_digest(given, expected):
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"www-authenticate", b'Bearer realm="metrics"'),
                    (b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": b"Unauthorized\n"})
                return
        await app(scope, receive, send)

    return guarded
# --8<-- [end:token]


def build_token(token: str, registry: CollectorRegistry | None = None) -> FastAPI:
    app = FastAPI()
    # --8<-- [start:token-usage]
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry)
    app.mount("/metrics", require_token(loopwatch.metrics_app(registry), token))
    app.mount("/loopwatch/events", require_token(loopwatch.events_app(), token))
    # --8<-- [end:token-usage]

    @app.get("/json")
    async def json_route() -> dict[str, bool]:
        return {"ok": True}

    return app
