"""The demo application: the article's FastAPI backend, watched by loopwatch."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline

from . import antipatterns, routes
from .config import Settings
from .errors import UpstreamResponseTooLarge

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["MAX_UPSTREAM_BODY", "BoundedTransport", "add_loopwatch", "create_app", "make_client"]

#: The largest upstream body the demo reads: its answers are small JSON documents, and a
#: larger one would be buffered, parsed on the event loop and sent on whole.
MAX_UPSTREAM_BODY = 10 * 1024 * 1024


class _BoundedStream(httpx.AsyncByteStream):
    def __init__(self, stream: httpx.AsyncByteStream, request: httpx.Request,
                 deadline: float, limit: int) -> None:
        self._stream, self._request, self._deadline, self._limit = stream, request, deadline, limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        chunks = self._stream.__aiter__()
        while True:
            remaining = self._deadline - time.monotonic()
            try:
                with anyio.fail_after(max(remaining, 0)):
                    chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise httpx.ReadTimeout("the upstream's body did not arrive within the timeout",
                                        request=self._request) from None
            received += len(chunk)
            if received > self._limit:
                raise UpstreamResponseTooLarge(
                    f"the upstream's body is larger than {self._limit} bytes",
                    request=self._request)
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


class BoundedTransport(httpx.AsyncBaseTransport):
    """Bounds each upstream call as a whole: ``timeout`` seconds from sending the request
    to the last byte of the body, and at most ``limit`` bytes of body.

    httpx's own timeouts bound each network operation, so an upstream that sends a byte
    every few seconds never trips them and holds the request (and a pool connection)
    forever; and it reads a body of any size. Either way the demo could not keep its
    promise to answer within its timeout.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, timeout: float, limit: int) -> None:
        self._inner, self._timeout, self._limit = inner, timeout, limit

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        deadline = time.monotonic() + self._timeout
        try:
            with anyio.fail_after(self._timeout):
                response = await self._inner.handle_async_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout("the upstream did not answer within the timeout",
                                    request=request) from None
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._limit:
            await response.stream.aclose()  # type: ignore[union-attr]
            raise UpstreamResponseTooLarge(
                f"the upstream's body is {length} bytes, more than {self._limit}",
                request=request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _BoundedStream(response.stream, request, deadline, self._limit)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()

DESCRIPTION = """\
The routes of *Build a FastAPI Async Backend That Calls External APIs Without Blocking*,
next to the mistakes it warns about (under `/antipatterns`).

Every `X-Sim-*` request header is forwarded to the upstream simulator, so one request can
make the upstream slow or fail: `X-Sim-Delay-Ms: 200`, `X-Sim-Jitter-Ms: 50`,
`X-Sim-Status: 500`, `X-Sim-Error-Rate: 0.1`, `X-Sim-Hang: 1`, `X-Sim-Drop: close` (or
`reset`), `X-Sim-Garbage: 1`.
"""


def make_client(settings: Settings) -> httpx.AsyncClient:
    """The one upstream client the app shares: its pool is what makes calls cheap.

    A client per request would open (and tear down) a TCP connection per call and could
    open unboundedly many; the shared one reuses at most ``max_connections``.
    """
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_keepalive_connections,
    )
    return httpx.AsyncClient(
        base_url=settings.upstream_url,
        timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
        limits=limits,
        transport=BoundedTransport(
            httpx.AsyncHTTPTransport(limits=limits), settings.timeout, MAX_UPSTREAM_BODY
        ),
    )


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Create the shared client at start-up; close it, and its connections, at shutdown."""
    async with make_client(app.state.settings) as client:
        app.state.http_client = client
        yield


#: Where the demo serves Swagger UI's and ReDoc's JavaScript, CSS and icon.
DOCS_ASSETS = "/static-offline-docs"
#: ReDoc's sidebar always shows Redocly's logo from their CDN: the page may load nothing
#: that is not the demo's (inline styles and a blob: worker are ReDoc's own), so the browser
#: never asks (the logo is left out) and the docs page contacts no one but the demo.
REDOC_CSP = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:;"
    " worker-src 'self' blob:"
)


def _add_redoc(app: FastAPI) -> None:
    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = REDOC_CSP
        return page


def add_loopwatch(app: FastAPI, *, registry: CollectorRegistry | None = None) -> None:
    """Watch ``app`` with loopwatch: the only place the demo touches it.

    Imported here, not at the top, so that the demo can be built and tested without the
    monitor (``create_app(instrument=False)``), e.g. to measure what the monitor costs.
    """
    import loopwatch

    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry)
    metrics, events = loopwatch.metrics_app(registry=registry), loopwatch.events_app()
    # Both /metrics (what Prometheus scrapes by default, no redirect) and /metrics/.
    app.add_route("/metrics", metrics, include_in_schema=False)
    app.mount("/metrics", metrics)
    app.add_route("/loopwatch/events", events, include_in_schema=False)
    app.mount("/loopwatch/events", events)
    # The live page (after the events, which the mount would otherwise shadow).
    app.mount("/loopwatch", loopwatch.ui_app(registry=registry))


def create_app(
    settings: Settings | None = None,
    *,
    instrument: bool = True,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the demo app.

    ``settings`` defaults to :meth:`Settings.from_env`. With ``instrument`` the app is
    watched by loopwatch (see :func:`add_loopwatch`), its metrics going to ``registry``
    (the global Prometheus registry by default).
    """
    # /docs and /redoc with Swagger UI's and ReDoc's assets served by the demo itself (from
    # the fastapi-offline package), not from a CDN: they work on a machine with no internet.
    app = FastAPIOffline(
        title="loopwatch demo",
        description=DESCRIPTION,
        lifespan=_lifespan,
        static_url=DOCS_ASSETS,
        redoc_url=None,
    )
    _add_redoc(app)
    app.state.settings = settings if settings is not None else Settings.from_env()
    app.include_router(routes.router)
    app.include_router(antipatterns.router)
    if instrument:
        add_loopwatch(app, registry=registry)
    return app
