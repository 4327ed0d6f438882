"""Memory: resident set size while loopwatch watches 1,000,000 requests to 10,000 unknown paths.

The FastAPI app of bench_apps with LoopWatchMiddleware (everything on) is driven in process on
asyncio, each request its own task (so the monitor's probe runs and flushes the batched
observations as under a server), 50 in flight. Every request goes to one of 10,000 distinct
paths that match no route (``/unknown/<n>``, answered 404): a raw-path label or a per-path
cache would grow with them. RSS (from /proc/self/statm) is sampled after the first 10,000
requests and then every 100,000; the growth after the first 10,000 must stay under 5 MiB.
At the end: how many label sets the metrics hold, and the size of the exposition.

    python -m benchmarks.memory [--requests 1000000] [--every 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from typing import Any

from ._common import command_line, log, write_result
from ._inprocess import LOOPS, Lifespan, drive
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest

import loopwatch

_PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def middleware_of(app: Any) -> Any:
    """The LoopWatchMiddleware in a started Starlette app's middleware stack."""
    layer = app.middleware_stack
    while not isinstance(layer, loopwatch.LoopWatchMiddleware):
        layer = layer.app
    return layer


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000, help="RSS sample interval")
    parser.add_argument("--first", type=int, default=10_000, help="the baseline sample")
    parser.add_argument("--paths", type=int, default=10_000, help="distinct unknown paths")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--loop", default="asyncio", choices=list(LOOPS))
    args = parser.parse_args(argv)

    registry = CollectorRegistry()
    app = FastAPI()
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        return {"item_id": item_id}

    paths = [f"/unknown/{i}" for i in range(args.paths)]
    status: dict[int, int] = {}
    samples: list[dict[str, Any]] = []

    async def run() -> None:
        async with Lifespan(app):
            done = 0
            t0 = time.perf_counter()
            marks = [args.first] + list(range(args.every, args.requests + 1, args.every))
            for mark in sorted(set(marks)):
                n = mark - done
                await drive(app, n, args.concurrency, lambda i, d=done: paths[(d + i) % len(paths)],
                            status=status)
                done = mark
                await asyncio.sleep(0.1)  # a probe: the batched observations are flushed
                samples.append({"requests": done, "rss": rss(),
                                "seconds": time.perf_counter() - t0})
                log(f"  {done:>9,} requests  RSS {samples[-1]['rss'] / MIB:7.2f} MiB  "
                    f"({samples[-1]['seconds']:.0f} s)")

    gc.collect()
    start_rss = rss()
    log(f"{args.requests:,} requests over {args.paths:,} unknown paths, loopwatch on "
        f"{args.loop}; RSS before: {start_rss / MIB:.2f} MiB")
    with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
        runner.run(run())
    base = samples[0]["rss"]
    growth = samples[-1]["rss"] - base
    peak_growth = max(s["rss"] for s in samples) - base
    exposition = generate_latest(registry)
    metrics = loopwatch._metrics.metrics_for(registry)
    result = {
        "config": vars(args),
        "rss_before": start_rss,
        "samples": samples,
        "growth_after_first_bytes": growth,
        "peak_growth_after_first_bytes": peak_growth,
        "status_counts": {str(k): v for k, v in status.items()},
        "label_sets": {
            "request_duration": len(metrics._request_children),
            "requests_total": len(metrics._count_children),
        },
        # The middleware's label cache, by (method, endpoint): one per routed endpoint, none
        # for unknown paths.
        "route_cache_entries": len(middleware_of(app)._fast),
        "exposition_bytes": len(exposition),
    }
    log(f"growth after the first {args.first:,} requests: {growth / MIB:+.2f} MiB (peak "
        f"{peak_growth / MIB:+.2f} MiB); label sets {result['label_sets']}, exposition "
        f"{len(exposition):,} bytes; responses {status}")
    path = write_result("memory", result, command_line())
    log(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
