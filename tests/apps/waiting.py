"""The "who waited" scenarios: requests that wait behind other code holding the loop.

``/fast`` sleeps 50 ms (an ``asyncio.sleep`` timer); ``/slow?after=N`` waits until ``N`` (default
``FAST``) sleeps have begun, sleeps 10 ms more, then holds the loop 200 ms with
``time.sleep``: every sleeper wakes late, by the end of the block minus its own timer's due
time. The app notes those moments (``timeline``) so a test can say what the delay should be.
``/slow?stall=MS`` also starts a thread that holds the GIL ``MS`` milliseconds right after the
block (a C extension's call in another thread): the loop's thread stands still after the
block, which looks like a pause of the loop, before the sleepers run.
``/fanout`` sleeps in three ``gather`` children, ``/background`` in a background task after
its response. ``/cuts`` holds the loop in small slices (``n`` of ``ms`` each, yielding between
them), ``/yields`` only yields ``n`` times: many of them at once load the loop without a
single block. ``/timeline`` gives the timeline as JSON, for a test whose server runs in a
process of its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

import loopwatch

FAST = 5
SLEEP = 0.05
BLOCK = 0.2


class Timeline:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        #: perf_counter() when each /fast started its sleep
        self.sleeps: list[float] = []
        #: (when its timer was due, when it woke) for each /fast, perf_counter()
        self.wakes: list[tuple[float, float]] = []
        self.block: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Timeline:
        """The timeline ``/timeline`` gave."""
        timeline = cls()
        timeline.sleeps = list(data["sleeps"])
        timeline.wakes = [(due, woke) for due, woke in data["wakes"]]
        timeline.block = (data["block"][0], data["block"][1])
        return timeline

    def expected_delay(self, sleeps: list[float] | None = None) -> float:
        """What the sleeps waited for /slow in all: each from its timer's due time to the end
        of the block."""
        end = self.block[1]
        return sum(max(0.0, end - (start + SLEEP)) for start in (
            self.sleeps if sleeps is None else sleeps))

    def woke_late(self) -> float:
        """What the sleeps waited in all, each from its timer's due time to its waking."""
        return sum(max(0.0, woke - due) for due, woke in self.wakes)


def hold_gil(seconds: float) -> None:
    """Sleep in C without releasing the GIL (``ctypes.PyDLL`` keeps it)."""
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def build(registry: CollectorRegistry, **options: Any) -> Starlette:
    timeline = Timeline()
    state: dict[str, Any] = {}

    def asleep() -> asyncio.Event:
        event = state.get("asleep")
        if event is None:
            event = state["asleep"] = asyncio.Event()
        return event

    async def sleep() -> None:
        start = time.perf_counter()
        timeline.sleeps.append(start)
        if len(timeline.sleeps) == state.get("after", FAST):
            asleep().set()
        await asyncio.sleep(SLEEP)
        timeline.wakes.append((start + SLEEP, time.perf_counter()))

    async def fast(request: Request) -> PlainTextResponse:
        await sleep()
        return PlainTextResponse("fast")

    async def fanout(request: Request) -> PlainTextResponse:
        await asyncio.gather(sleep(), sleep(), sleep())
        return PlainTextResponse("fanout")

    async def background(request: Request) -> PlainTextResponse:
        return PlainTextResponse("background", background=BackgroundTask(sleep))

    async def cuts(request: Request) -> PlainTextResponse:
        for _ in range(int(request.query_params.get("n", "20"))):
            spin(float(request.query_params.get("ms", "1")) / 1000)
            await asyncio.sleep(0)
        return PlainTextResponse("cuts")

    async def yields(request: Request) -> PlainTextResponse:
        for _ in range(int(request.query_params.get("n", "20"))):
            await asyncio.sleep(0)
        return PlainTextResponse("yields")

    async def slow(request: Request) -> PlainTextResponse:
        state["after"] = int(request.query_params.get("after", FAST))
        if len(timeline.sleeps) >= state["after"]:
            asleep().set()
        await asleep().wait()
        await asyncio.sleep(0.01)
        stall = float(request.query_params.get("stall", "0")) / 1000
        if stall:
            threading.Thread(target=lambda: (time.sleep(BLOCK + 0.001), hold_gil(stall)),
                             daemon=True).start()
        start = time.perf_counter()
        time.sleep(BLOCK)
        timeline.block = (start, time.perf_counter())
        return PlainTextResponse("slow")

    async def timeline_json(request: Request) -> JSONResponse:
        return JSONResponse({"sleeps": timeline.sleeps, "wakes": timeline.wakes,
                             "block": timeline.block})

    async def reset(request: Request) -> PlainTextResponse:
        timeline.reset()
        state.pop("asleep", None)
        state.pop("after", None)
        return PlainTextResponse("reset")

    app = Starlette(routes=[
        Route("/fast", fast), Route("/slow", slow), Route("/reset", reset),
        Route("/timeline", timeline_json),
        Route("/fanout", fanout), Route("/background", background), Route("/cuts", cuts),
        Route("/yields", yields),
        Mount("/metrics", loopwatch.metrics_app(registry)),
    ])
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry,
                       exclude_paths=["/reset", "/timeline"], **options)
    app.state.timeline = timeline
    return app


#: For ``uvicorn tests.apps.waiting:app`` (the server in a process of its own).
app = build(CollectorRegistry())
