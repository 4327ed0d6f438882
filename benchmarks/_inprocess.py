"""Driving an ASGI app in process: lifespan, and many GET requests as concurrent tasks.

No sockets and no server: only the app's (and its middleware's) own work differs between
variants. Like uvicorn, each request runs as its own task (``driver="task"``), so the loop
runs a few callbacks per request and loop-level hooks (loopwatch's step timing) run as they
would under a server. ``driver="inline"`` awaits the app inside long-lived worker tasks
instead: a request then never yields to the loop (receive and send return at once), which
hides the per-step cost; it is kept to compare with earlier figures.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

import uvloop

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


class Lifespan:
    """Runs an ASGI app's lifespan: startup on enter, shutdown on exit."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> Lifespan:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": {}}
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


_BODY = {"type": "http.request", "body": b"", "more_body": False}


def _scope(path: str) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
        "root_path": "", "query_string": b"", "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80),
    }


async def drive(app: Any, n: int, concurrency: int, path: Callable[[int], str],
                driver: str = "task", status: dict[int, int] | None = None,
                ) -> tuple[float, float]:
    """Seconds per request for ``n`` GETs, ``concurrency`` in flight at a time: wall-clock
    time, and CPU time of the whole process (all its threads, so loopwatch's watchdog is
    included; time the machine gave to other processes is not)."""

    async def receive() -> dict[str, Any]:
        return _BODY

    async def one(i: int) -> None:
        async def send(message: dict[str, Any]) -> None:
            if status is not None and message["type"] == "http.response.start":
                code = message["status"]
                status[code] = status.get(code, 0) + 1

        await app(_scope(path(i)), receive, send)

    create_task = asyncio.get_running_loop().create_task

    if driver == "task":
        async def worker(start: int) -> None:
            for i in range(start, n, concurrency):
                await create_task(one(i))
    elif driver == "inline":
        async def worker(start: int) -> None:
            for i in range(start, n, concurrency):
                await one(i)
    else:
        raise ValueError(driver)

    t, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return (time.perf_counter() - t) / n, (time.process_time() - cpu) / n


def item_path(i: int) -> str:
    return f"/items/{i}"


def run_app(loop_kind: str, factory: Callable[[], Any], n: int, concurrency: int,
            path: Callable[[int], str] = item_path, driver: str = "task",
            warmup: int = 500) -> tuple[float, float]:
    """Build the app, start it, warm it up, time ``n`` requests; seconds per request
    (wall-clock, process CPU).

    Everything earlier rounds left behind is frozen out of the garbage collector first, so a
    full collection of that cannot land in one variant's timing and not another's.
    """

    async def main() -> tuple[float, float]:
        app = factory()
        async with Lifespan(app):
            await drive(app, min(n, warmup), concurrency, path, driver)
            return await drive(app, n, concurrency, path, driver)

    gc.collect()
    gc.freeze()
    try:
        with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
            return runner.run(main())
    finally:
        gc.unfreeze()
