"""The apps the benchmarks measure: one FastAPI route, bare and with each middleware.

Each factory builds a fresh app (its own Prometheus registry where the library allows one),
so in-process rounds do not share state, and uvicorn can serve any of them with
``uvicorn benchmarks.bench_apps:<factory> --factory`` (from the repository root).

``accuracy()`` is the app of the accuracy benchmark: blocking and non-blocking routes whose
blocking calls record what really happened (route, wall-clock start and end, line), so
block events can be checked against the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import loopwatch

__all__ = ["VARIANTS", "ABLATIONS", "accuracy"]


def _route(app: FastAPI, awaits: bool = False) -> FastAPI:
    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        return {"item_id": item_id, "name": "widget", "price": 9.99}

    if awaits:
        @app.get("/awaits/{k}")
        async def awaiting(k: int) -> dict[str, int]:
            for _ in range(k):
                await asyncio.sleep(0)
            return {"awaits": k}

    return app


def bare(awaits: bool = False) -> FastAPI:
    return _route(FastAPI(), awaits)


def with_loopwatch(awaits: bool = False, **options: Any) -> FastAPI:
    """Everything on: the middleware, the monitor (hook, probe, watchdog), the metrics.

    No ``/metrics`` route, as for the competitors: a mount placed before the measured route
    would cost every request a regex match that has nothing to do with the middleware.
    """
    app = FastAPI()
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=CollectorRegistry(), **options)
    return _route(app, awaits)


def with_instrumentator(awaits: bool = False) -> FastAPI:
    from prometheus_fastapi_instrumentator import Instrumentator

    app = _route(FastAPI(), awaits)
    Instrumentator(registry=CollectorRegistry()).instrument(app)
    return app


def with_starlette_exporter(awaits: bool = False) -> FastAPI:
    from starlette_exporter import PrometheusMiddleware

    app = FastAPI()
    # A fresh app_name per app: its metrics live in the global registry, once per name.
    app.add_middleware(PrometheusMiddleware, group_paths=True,
                       app_name=f"bench{time.monotonic_ns()}")
    return _route(app, awaits)


VARIANTS: dict[str, Callable[..., FastAPI]] = {
    "bare": bare,
    "loopwatch": with_loopwatch,
    "instrumentator": with_instrumentator,
    "starlette-exporter": with_starlette_exporter,
}


# -- ablations: where loopwatch's cost goes --------------------------------------------

def monitor_only(awaits: bool = False) -> FastAPI:
    """The loop monitor alone (hook, probe, watchdog), no middleware."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        monitor = loopwatch.Monitor(config=loopwatch.Config.from_env()).start()
        try:
            yield
        finally:
            monitor.stop()

    return _route(FastAPI(lifespan=lifespan), awaits)


def loopwatch_no_watchdog(awaits: bool = False) -> FastAPI:
    return with_loopwatch(awaits, sample_stacks=False)


def loopwatch_otel(awaits: bool = False) -> FastAPI:
    """Everything on, and the same measurements sent through the OpenTelemetry SDK too (an
    in-memory reader: what the SDK's aggregation costs, without an exporter's network)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return with_loopwatch(awaits, meter_provider=provider)


def loopwatch_otel_noop(awaits: bool = False) -> FastAPI:
    """As loopwatch_otel with the OpenTelemetry API's no-op provider: loopwatch's own part
    of the export (keeping each request, the batches), without the SDK's work."""
    from opentelemetry.metrics import NoOpMeterProvider

    return with_loopwatch(awaits, meter_provider=NoOpMeterProvider())


class PassThrough:
    """The cheapest pure ASGI middleware there is: the floor of any middleware's cost."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def passthrough(awaits: bool = False) -> FastAPI:
    app = FastAPI()
    app.add_middleware(PassThrough)
    return _route(app, awaits)


ABLATIONS: dict[str, Callable[..., FastAPI]] = {
    "pass-through-middleware": passthrough,
    "monitor-only": monitor_only,
    "loopwatch-no-watchdog": loopwatch_no_watchdog,
    "loopwatch-otel": loopwatch_otel,
    "loopwatch-otel-noop": loopwatch_otel_noop,
}


# uvicorn factories (uvicorn --factory benchmarks.bench_apps:<name>)
def uv_bare() -> FastAPI:
    return bare()


def uv_loopwatch() -> FastAPI:
    app = with_loopwatch()
    app.mount("/metrics", loopwatch.metrics_app())  # after the route: not on its path
    return app


def uv_instrumentator() -> FastAPI:
    return with_instrumentator()


def uv_starlette_exporter() -> FastAPI:
    return with_starlette_exporter()


UVICORN_FACTORIES = {
    "bare": "benchmarks.bench_apps:uv_bare",
    "loopwatch": "benchmarks.bench_apps:uv_loopwatch",
    "instrumentator": "benchmarks.bench_apps:uv_instrumentator",
    "starlette-exporter": "benchmarks.bench_apps:uv_starlette_exporter",
}


# -- the accuracy app --------------------------------------------------------------------

_truth: list[dict[str, Any]] = []
_truth_lock = threading.Lock()
LINES: dict[str, int] = {}


def _record(route: str, start: float, end: float, line: int) -> None:
    with _truth_lock:
        _truth.append({"route": route, "start": start, "end": end,
                       "line": f"{__file__}:{line}"})


def _busy(seconds: float) -> None:
    # CPU time, not wall time: on a loaded machine the OS may hold the thread off the CPU in
    # the middle, and loopwatch does not count that as the code's block (see README).
    deadline = time.thread_time() + seconds
    x = 0
    while time.thread_time() < deadline:
        x += 1


def _line_of(fn: Callable[..., Any], marker: str) -> int:
    source, first = inspect.getsourcelines(fn)
    for i, text in enumerate(source):
        if marker in text:
            return first + i
    raise LookupError(marker)


def accuracy() -> FastAPI:
    """Blocking and non-blocking routes; ``/truth`` lists every block that really happened.

    Options come from ``LOOPWATCH_*`` environment variables (block_threshold, ring_size).
    """
    app = FastAPI()
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=CollectorRegistry())
    app.mount("/metrics", loopwatch.metrics_app())
    app.mount("/loopwatch/events", loopwatch.events_app(limit=1000))

    @app.get("/block/sleep")
    async def block_sleep(ms: float) -> dict[str, float]:
        t0 = time.time()
        time.sleep(ms / 1000)  # BLOCK:sleep
        _record("/block/sleep", t0, time.time(), LINES["sleep"])
        return {"ms": ms}

    @app.get("/block/cpu")
    async def block_cpu(ms: float) -> dict[str, float]:
        t0 = time.time()
        _busy(ms / 1000)  # BLOCK:cpu
        _record("/block/cpu", t0, time.time(), LINES["cpu"])
        return {"ms": ms}

    @app.get("/block/after-await")
    async def block_after_await(ms: float) -> dict[str, float]:
        await asyncio.sleep(0.001)
        t0 = time.time()
        time.sleep(ms / 1000)  # BLOCK:after-await
        _record("/block/after-await", t0, time.time(), LINES["after-await"])
        return {"ms": ms}

    async def child(ms: float) -> None:
        await asyncio.sleep(0)
        t0 = time.time()
        time.sleep(ms / 1000)  # BLOCK:child
        _record("/block/gather-child", t0, time.time(), LINES["child"])

    @app.get("/block/gather-child")
    async def block_gather_child(ms: float) -> dict[str, float]:
        await asyncio.gather(child(ms), asyncio.sleep(0.001))
        return {"ms": ms}

    @app.get("/ok/json")
    async def ok_json() -> dict[str, Any]:
        return {"name": "widget", "tags": ["a", "b", "c"], "price": 9.99}

    @app.get("/ok/await")
    async def ok_await() -> dict[str, bool]:
        await asyncio.sleep(0.002)
        return {"ok": True}

    @app.get("/ok/fanout")
    async def ok_fanout() -> dict[str, int]:
        await asyncio.gather(*(asyncio.sleep(0.001) for _ in range(5)))
        return {"calls": 5}

    @app.get("/ok/thread")
    def ok_thread() -> dict[str, bool]:
        time.sleep(0.005)  # a plain def route: runs in the thread pool, never on the loop
        return {"ok": True}

    @app.get("/truth")
    async def truth() -> dict[str, Any]:
        with _truth_lock:
            return {"blocks": list(_truth), "lines": LINES, "pid": os.getpid()}

    @app.get("/truth/reset")
    async def truth_reset() -> dict[str, bool]:
        with _truth_lock:
            _truth.clear()
        return {"ok": True}

    _busy_lines = inspect.getsourcelines(_busy)
    LINES.update({
        "sleep": _line_of(block_sleep, "BLOCK:sleep"),
        "cpu": _line_of(block_cpu, "BLOCK:cpu"),
        # CPU-bound code is sampled where it runs: any line of _busy is the exact line.
        "cpu_body_first": _busy_lines[1],
        "cpu_body_last": _busy_lines[1] + len(_busy_lines[0]) - 1,
        "after-await": _line_of(block_after_await, "BLOCK:after-await"),
        "child": _line_of(child, "BLOCK:child"),
    })
    return app
