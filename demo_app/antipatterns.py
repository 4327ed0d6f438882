"""What not to do in an ``async def`` route: one route per mistake from the article.

Each docstring says what goes wrong and the fix. The blocking call in each route sits
alone on its own line, which is the line loopwatch names in its block events. ``ms``
sets how long the route blocks, so tests and benchmarks can inject exact blocks.

The ``noqa`` comments silence ruff's ASYNC rules, which exist to catch exactly these
mistakes; here the mistakes are the point.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import requests
from fastapi import APIRouter

from .deps import AppSettings, BlockMs, Client, SimControl, UserId
from .errors import UPSTREAM_RESPONSES, upstream_errors
from .models import Block, CpuWork, Dashboard, FileRead, Weather
from .routes import dashboard

__all__ = ["router"]

router = APIRouter(prefix="/antipatterns", tags=["anti-patterns"])


@router.get("/requests-get", responses=UPSTREAM_RESPONSES)
async def requests_get(settings: AppSettings, sim: SimControl, ms: BlockMs = 500) -> Weather:
    """The article's weather example with ``requests.get`` inside ``async def``.

    Wrong: ``requests`` waits for the upstream's answer (``ms``, set on the simulator)
    on the event loop's thread, so no other request is served meanwhile; 100 users of a
    500 ms upstream are served one after another and the last waits about 50 s.
    Fix: ``await client.get(...)`` on the shared ``httpx.AsyncClient`` (``/weather``).

    Its upstream failures map to the same answers as the other routes' (404, 502, 504).
    """
    headers = {**sim, "x-sim-delay-ms": str(ms)}
    timeout = (settings.connect_timeout, settings.timeout)
    url = f"{settings.upstream_url}/weather"
    with upstream_errors("the weather"):
        response = requests.get(url, headers=headers, timeout=timeout)  # noqa: ASYNC210
        response.raise_for_status()
        return Weather.model_validate(response.json())


@router.get("/sleep")
async def sleep(ms: BlockMs = 200) -> Block:
    """``time.sleep`` inside ``async def``.

    Wrong: the whole event loop sleeps, not just this request.
    Fix: ``await asyncio.sleep(seconds)``.
    """
    time.sleep(ms / 1000)  # noqa: ASYNC251
    return Block(slept_ms=ms)


@router.get("/sequential/{user_id}", responses=UPSTREAM_RESPONSES)
async def sequential_dashboard(user_id: UserId, client: Client, sim: SimControl) -> Dashboard:
    """``/dashboard/{user_id}`` with one ``await`` after another.

    Wrong: nothing blocks the loop, but the three independent calls run one after the
    other, so the route takes the sum of their latencies (3 x 200 ms = 600 ms).
    Fix: start them together with ``asyncio.gather`` (``/dashboard/{user_id}``).
    """
    with upstream_errors(f"user {user_id}"):
        profile = await client.get(f"/users/{user_id}", headers=sim)
        orders = await client.get(f"/users/{user_id}/orders", params={"limit": 5}, headers=sim)
        notifications = await client.get(f"/users/{user_id}/notifications/count", headers=sim)
        for response in (profile, orders, notifications):
            response.raise_for_status()
        return dashboard(profile, orders, notifications)


@router.get("/sync-def")
def sync_def(ms: BlockMs = 200) -> Block:
    """A blocking call in a plain ``def`` route.

    FastAPI runs ``def`` routes in a thread pool, so the loop stays free — but each
    request holds one of the pool's threads (40 by default, shared with every other
    ``def`` route and dependency) for ``ms``. At 40 concurrent requests the pool is
    exhausted and further requests queue even though the loop is idle.
    Fix: an ``async def`` route that awaits (``await asyncio.sleep``, an async client).
    """
    time.sleep(ms / 1000)
    return Block(slept_ms=ms)


@router.get("/cpu")
async def cpu(ms: BlockMs = 200) -> CpuWork:
    """CPU-bound work (think password hashing or report rendering) inside ``async def``.

    Wrong: the loop computes for ``ms`` and serves nobody else meanwhile.
    Fix: ``await loop.run_in_executor(process_pool, work)``; a thread only helps when the
    work releases the GIL.
    """
    deadline = time.perf_counter() + ms / 1000
    digest = b"loopwatch"
    rounds = 0
    while time.perf_counter() < deadline:
        digest = hashlib.sha256(digest).digest()
        rounds += 1
    return CpuWork(rounds=rounds, digest=digest.hex())


def _slow_file(seconds: float) -> int:
    """A readable file descriptor whose bytes arrive after ``seconds``.

    Stands in for a file on a network filesystem or a cold disk: a pipe that a timer
    thread fills and closes once the time is up.
    """
    read_fd, write_fd = os.pipe()

    def deliver() -> None:
        with open(write_fd, "wb") as sink:
            sink.write(b"x" * 4096)

    threading.Timer(seconds, deliver).start()
    return read_fd


@router.get("/file-read")
async def file_read(ms: BlockMs = 200) -> FileRead:
    """``open().read()`` of a slow file inside ``async def``.

    Wrong: the read waits for the disk (here ``ms``) on the loop's thread.
    Fix: ``await anyio.Path(path).read_bytes()`` or ``aiofiles``, which read in a thread.
    """
    with open(_slow_file(ms / 1000), "rb") as source:  # noqa: ASYNC230
        data = source.read()
    return FileRead(bytes=len(data))
