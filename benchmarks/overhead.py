"""Per-request overhead of loopwatch vs the well-known Prometheus middlewares, in process.

Four variants of the same FastAPI app and route (a small JSON object): bare,
loopwatch (middleware + loop monitor, everything on), prometheus-fastapi-instrumentator and
starlette-exporter. Each is driven in-process through a minimal ASGI driver, requests as
concurrent tasks so that loop-level hooks run as they would under a server. Alternating
rounds, medians, ratios to bare, on asyncio and uvloop.

    python benchmarks/overhead.py [--requests 4000] [--rounds 9] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import uvloop  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

import loopwatch  # noqa: E402

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _route(app: FastAPI) -> FastAPI:
    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        return {"item_id": item_id, "name": "widget", "price": 9.99}

    return app


def bare() -> FastAPI:
    return _route(FastAPI())


def with_loopwatch() -> FastAPI:
    app = FastAPI()
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=CollectorRegistry())
    return _route(app)


def with_instrumentator() -> FastAPI:
    from prometheus_fastapi_instrumentator import Instrumentator

    app = _route(FastAPI())
    Instrumentator(registry=CollectorRegistry()).instrument(app)
    return app


def with_starlette_exporter() -> FastAPI:
    from starlette_exporter import PrometheusMiddleware

    app = FastAPI()
    app.add_middleware(PrometheusMiddleware, group_paths=True,
                       app_name=f"bench{time.monotonic_ns()}")
    return _route(app)


VARIANTS: dict[str, Callable[[], FastAPI]] = {
    "bare": bare,
    "loopwatch": with_loopwatch,
    "instrumentator": with_instrumentator,
    "starlette-exporter": with_starlette_exporter,
}


class Lifespan:
    """Runs an ASGI app's lifespan: startup before the rounds, shutdown after."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self.inbox.get, self.outbox.put))
        await self.inbox.put({"type": "lifespan.startup"})
        message = await self.outbox.get()
        assert message["type"] == "lifespan.startup.complete", message
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        await self.outbox.get()
        assert self.task is not None
        await self.task


async def drive(app: Any, n: int, concurrency: int) -> float:
    """Seconds per request for n GET requests, `concurrency` in flight at a time."""
    body = {"type": "http.request", "body": b"", "more_body": False}

    async def one(i: int) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": f"/items/{i}", "raw_path": b"",
            "root_path": "", "query_string": b"", "headers": [(b"host", b"bench")],
            "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80),
        }

        async def receive() -> dict[str, Any]:
            return body

        async def send(message: dict[str, Any]) -> None:
            pass

        await app(scope, receive, send)

    async def worker(start: int) -> None:
        for i in range(start, n, concurrency):
            await one(i)

    t = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return (time.perf_counter() - t) / n


def run_variant(loop_kind: str, name: str, n: int, concurrency: int) -> float:
    async def main() -> float:
        app = VARIANTS[name]()
        async with Lifespan(app):
            await drive(app, min(n, 500), concurrency)  # warm up
            # Earlier rounds leave apps and registries behind; frozen, they cannot make a
            # full garbage collection land in one variant's timing and not another's.
            gc.collect()
            gc.freeze()
            try:
                return await drive(app, n, concurrency)
            finally:
                gc.unfreeze()

    with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
        return runner.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    print(f"In-process per-request cost, {args.requests} requests x {args.rounds} alternating "
          f"rounds, {args.concurrency} concurrent; medians (µs) and ratio to bare\n")
    for loop_kind in args.loops.split(","):
        samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        names = list(VARIANTS)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                samples[name].append(run_variant(loop_kind, name, args.requests, args.concurrency))
        base = statistics.median(samples["bare"])
        print(f"{loop_kind}:")
        print(f"  {'variant':20} {'µs/request':>11} {'vs bare':>8} {'added µs':>9}")
        for name in names:
            med = statistics.median(samples[name])
            results[f"{loop_kind}/{name}"] = {
                "us_per_request": med * 1e6, "ratio": med / base,
                "samples_us": [x * 1e6 for x in samples[name]],
            }
            print(f"  {name:20} {med * 1e6:11.1f} {med / base:8.3f} {(med - base) * 1e6:+9.1f}")
        lw = statistics.median(samples["loopwatch"]) - base
        lightest = min(statistics.median(samples[n]) for n in ("instrumentator",
                                                               "starlette-exporter")) - base
        print(f"  loopwatch overhead / lightest competitor's overhead: {lw / lightest:.3f}\n")
        results[f"{loop_kind}/loopwatch_vs_lightest"] = lw / lightest
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
