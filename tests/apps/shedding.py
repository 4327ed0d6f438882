"""An app with lag-aware admission and a CPU hog on its own loop, for tests/test_admission.py:
``uvicorn tests.apps.shedding:app`` (``SHED=0``: the same app without admission)."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

import loopwatch

WINDOW = 0.5
#: (wall-clock time, message) of every admission change the middleware logged.
changes: list[tuple[float, str]] = []
hogs: list[tuple[float, float]] = []  # (start, end), wall clock
_tasks: set[asyncio.Task[None]] = set()


class _Changes(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "shedding" in message or "serving every request" in message:
            changes.append((time.time(), message))


logging.getLogger("loopwatch").addHandler(_Changes())


async def fast(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def health(request: Request) -> PlainTextResponse:
    return PlainTextResponse("healthy")


async def hog(request: Request) -> JSONResponse:
    """Hold the loop in ``chunk``-second pieces of pure CPU for ``seconds`` (a task)."""
    seconds = float(request.query_params.get("seconds", "1.5"))
    chunk = float(request.query_params.get("chunk", "0.08"))

    async def run() -> None:
        start = time.time()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            stop = time.perf_counter() + chunk
            while time.perf_counter() < stop:
                pass
            await asyncio.sleep(0)
        hogs.append((start, time.time()))

    task = asyncio.get_running_loop().create_task(run())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return JSONResponse({"started": time.time()})


async def report(request: Request) -> JSONResponse:
    return JSONResponse({"changes": changes, "hogs": hogs})


app = Starlette(routes=[
    Route("/fast", fast), Route("/health", health), Route("/hog", hog),
    Route("/report", report), Route("/metrics", loopwatch.metrics_app()),
])
admission = None
if os.environ.get("SHED", "1") == "1":
    admission = loopwatch.Admission(max_lag=0.04, window=WINDOW,
                                    exclude_paths=("/health", "/report"))
app.add_middleware(loopwatch.LoopWatchMiddleware, admission=admission, log_blocks=False)
