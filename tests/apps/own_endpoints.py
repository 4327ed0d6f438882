"""loopwatch's own endpoints at their largest, for tests/test_own_endpoints.py:
``uvicorn tests.apps.own_endpoints:app``.

``/metrics`` exposes 20,000 series; ``POST /fill`` fills the ring with 1,000 block events as
large as the settings allow (made at import, off the loop), so that ``/loopwatch/events``
serves its largest response; ``/steps`` lists what loopwatch caught holding the loop for
``STEP_LIMIT`` or more.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

import loopwatch
from loopwatch._events import BlockEvent, Frame

STEP_LIMIT = 0.01
OWN_ROUTES = ("/loopwatch/events", "/metrics/{path}")
#: Blocks of the garbage collector and of the process standing still (tested on their own).
NOT_THE_CODES = ("<gc>", "<paused>")

registry = CollectorRegistry()
_big = Counter("big_total", "many series", ["label"], registry=registry)
for _i in range(20_000):
    _big.labels(f"value-{_i:05d}-" + "x" * 40).inc()


def biggest_event(i: int) -> BlockEvent:
    """An event as large as the settings allow: 100 frames, long paths and names."""
    frames = tuple(
        Frame(f"/srv/{'deep/' * 90}module_{n}.py", 100_000 + n, "Cls." + "f" * 200, "m")
        for n in range(100)
    )
    return BlockEvent(time=time.time(), duration=0.2, task=f"Task-{i}", frames=frames,
                      hint="h" * 200, method="GET", route="/r/{x}")


_largest = [biggest_event(i) for i in range(1000)]


def _monitor() -> loopwatch.Monitor:
    monitor = loopwatch.get_monitor()
    assert monitor is not None
    return monitor


async def fill(request: Request) -> JSONResponse:
    _monitor().blocks.extend(_largest)
    return JSONResponse({"filled": len(_largest)})


async def steps(request: Request) -> JSONResponse:
    """The blocks caught holding the loop for ``STEP_LIMIT`` or more, not counting the OS's
    time (runqueue waits, pauses) nor the garbage collector's (a collection of this process's
    heap, set off by whatever step allocated last, is reported on its own as ``<gc>`` when it
    takes nearly the whole block; within a longer one it is ``gc_seconds``): ``own``, steps of
    the own endpoints; ``untimed``, stalls of the loop seen only by its probe (the loop thread
    waiting for the GIL, say), but not the collector's or a pause's. Each as
    (route, duration, preempted, paused, gc_seconds)."""
    blocks = [e for e in _monitor().blocks
              if e.duration - e.preempted - e.paused - e.gc_seconds >= STEP_LIMIT]
    return JSONResponse({
        "own": [(e.route, e.duration, e.preempted, e.paused, e.gc_seconds)
                for e in blocks if e.route in OWN_ROUTES],
        "untimed": [(e.route, e.duration, e.preempted, e.paused, e.gc_seconds)
                    for e in blocks if not e.timed and e.route not in NOT_THE_CODES],
    })


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[
    Route("/loopwatch/events", loopwatch.events_app(limit=1000)),
    Mount("/metrics", loopwatch.metrics_app(registry)),
    Route("/fill", fill, methods=["POST"]),
    Route("/steps", steps),
    Route("/health", health),
])
app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry, ring_size=1000,
                   stack_depth=100, block_threshold=STEP_LIMIT, probe_interval=0.002,
                   log_blocks=False, exclude_paths=())

