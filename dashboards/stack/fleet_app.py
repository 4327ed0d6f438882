"""The app every fleet instance runs: routes that block the event loop for a known time, fast
routes, a route that fails, and a sync route that occupies a worker thread, with
:class:`loopwatch.LoopWatchMiddleware` and :func:`loopwatch.metrics_app` at ``/metrics``.

Every request to ``/block?ms=N`` is exactly one block of N ms (``time.sleep`` on the loop), so
what a test injects is exactly what the metrics must count. Run it with uvicorn, one
``PROMETHEUS_MULTIPROC_DIR`` per instance::

    PROMETHEUS_MULTIPROC_DIR=/tmp/api-1 uvicorn dashboards.stack.fleet_app:app --workers 2

``FLEET_THREAD_LIMIT`` sets the size of AnyIO's default thread limiter (the pool that runs
the sync route) in each worker, so that a test can fill it with a few requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator

import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import loopwatch

__all__ = ["BLOCK_MAX_MS", "app"]

BLOCK_MAX_MS = 5000


def _ms(request: Request, name: str = "ms") -> float:
    raw = request.query_params.get(name, "0")
    if not raw.isdigit() or int(raw) > BLOCK_MAX_MS:
        raise ValueError(f"{name}={raw!r}; allowed: an integer from 0 to {BLOCK_MAX_MS}")
    return int(raw) / 1000


async def block(request: Request) -> Response:
    """Holds the event loop for ``?ms=`` milliseconds: one block, on purpose. With
    ``?then_ms=``, then awaits that long without blocking (the request stays in progress
    where the loop can see it)."""
    time.sleep(_ms(request))
    then = _ms(request, "then_ms")
    if then:
        await asyncio.sleep(then)
    return PlainTextResponse("blocked\n")


def sync_wait(request: Request) -> Response:
    """A sync endpoint: Starlette runs it in the thread pool, where it waits ``?ms=``."""
    time.sleep(_ms(request))
    return PlainTextResponse("waited\n")


async def fast(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def item(request: Request) -> Response:
    return JSONResponse({"item_id": request.path_params["item_id"]})


async def fail(request: Request) -> Response:
    return PlainTextResponse("failed on purpose\n", status_code=500)


async def pid(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid()})


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    limit = os.environ.get("FLEET_THREAD_LIMIT")
    if limit:
        anyio.to_thread.current_default_thread_limiter().total_tokens = int(limit)
    yield


app = Starlette(
    routes=[
        Route("/block", block),
        Route("/sync-wait", sync_wait),
        Route("/fast", fast),
        Route("/items/{item_id}", item),
        Route("/fail", fail),
        Route("/pid", pid),
        Route("/metrics", loopwatch.metrics_app()),
    ],
    lifespan=_lifespan,
)
app.add_middleware(loopwatch.LoopWatchMiddleware)
