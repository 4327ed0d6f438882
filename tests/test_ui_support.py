"""The app the live page's tests serve, with blocks at known lines (no tests of its own).

Each blocking route calls ``time.sleep`` on a line of its own: a C call that releases the
GIL, so the watchdog samples the route's own frame at exactly that line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch import BlockEvent, Frame

T = TypeVar("T")

SHORT = 0.15  # seconds /short blocks: above the 0.1 s threshold
LONG = 0.4    # seconds /long blocks: the hottest


async def short_block() -> dict[str, str]:
    time.sleep(SHORT)  # SHORT-LINE
    return {"slept": "short"}


async def long_block() -> dict[str, str]:
    time.sleep(LONG)  # LONG-LINE
    return {"slept": "long"}


async def quick(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


SHORT_LINE = short_block.__code__.co_firstlineno + 1
LONG_LINE = long_block.__code__.co_firstlineno + 1
FILE = __file__


def build(registry: CollectorRegistry | None, ui: dict[str, Any] | None = None,
          **middleware_options: Any) -> FastAPI:
    """A FastAPI app watched by loopwatch, its live page (``ui_app(**ui)``) mounted at
    ``/loopwatch``."""
    app = FastAPI()
    middleware_options.setdefault("log_blocks", False)
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry, **middleware_options)
    app.mount("/loopwatch", loopwatch.ui_app(registry=registry, **(ui or {})))
    app.add_api_route("/short", short_block)
    app.add_api_route("/long", long_block)
    app.add_api_route("/items/{item_id}", quick)
    return app


def default_registry_app() -> FastAPI:
    """:func:`build` on the global registry: what ``uvicorn --workers N --factory`` serves
    with ``PROMETHEUS_MULTIPROC_DIR`` set."""
    return build(None)


def on_loop(server: Any, function: Callable[[], T]) -> T:
    """``function()`` run on the server's event loop thread, its result returned here."""
    async def call() -> T:
        return function()

    return asyncio.run_coroutine_threadsafe(call(), server.loop).result(timeout=30)


def monitor_of(server: Any) -> Any:
    monitor = loopwatch.get_monitor(server.loop)
    assert monitor is not None, "the middleware did not start a monitor"
    return monitor


def synthetic_stacks(kinds: int, depth: int) -> list[tuple[Frame, ...]]:
    """``kinds`` distinct stacks of ``depth`` frames (innermost first), as the watchdog
    would sample them: a server, a framework and your code."""
    stacks = []
    for k in range(kinds):
        frames = [Frame(f"/srv/app/module{k}.py", 10 + k, f"handler_{k}")]
        frames += [Frame(f"/srv/app/helpers{d % 7}.py", d + 1, f"helper_{d}")
                   for d in range(depth - 1)]
        stacks.append(tuple(frames))
    return stacks


def fill_ring(server: Any, count: int, stacks: list[tuple[Frame, ...]]) -> None:
    """Put ``count`` block events into the monitor's ring, as if they had happened (the
    real thing would take ``count`` tenths of a second each)."""
    now = time.time()
    events = [
        BlockEvent(time=now - (count - i) * 0.001, duration=0.1 + (i % 10) / 100,
                   task=f"Task-{i}", frames=stacks[i % len(stacks)], method="GET",
                   route=f"/synthetic/{i % 20}", hint="time.sleep() blocks the event loop")
        for i in range(count)
    ]

    def put() -> None:
        monitor = monitor_of(server)
        monitor.blocks.extend(events)
        monitor.block_count += count

    on_loop(server, put)
