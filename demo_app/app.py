"""The demo application: the article's FastAPI backend, watched by loopwatch."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI

from . import antipatterns, routes
from .config import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["add_loopwatch", "create_app", "make_client"]

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
    return httpx.AsyncClient(
        base_url=settings.upstream_url,
        timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
        limits=httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_keepalive_connections,
        ),
    )


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Create the shared client at start-up; close it, and its connections, at shutdown."""
    async with make_client(app.state.settings) as client:
        app.state.http_client = client
        yield


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
    app = FastAPI(title="loopwatch demo", description=DESCRIPTION, lifespan=_lifespan)
    app.state.settings = settings if settings is not None else Settings.from_env()
    app.include_router(routes.router)
    app.include_router(antipatterns.router)
    if instrument:
        add_loopwatch(app, registry=registry)
    return app
