"""A small FastAPI app exercising what the middleware must see; built with or without it."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fastapi import APIRouter, BackgroundTasks, FastAPI, WebSocket
from fastapi.responses import PlainTextResponse, RedirectResponse, StreamingResponse
from prometheus_client import CollectorRegistry

import loopwatch


measured: list[float] = []  # how long each block() really took (the OS may oversleep)


def block(seconds: float) -> None:
    t = time.perf_counter()
    time.sleep(seconds)  # SAMPLE-BLOCK-LINE
    measured.append(time.perf_counter() - t)


BLOCK_LINE = block.__code__.co_firstlineno + 2
background_done: list[str] = []


def build(registry: CollectorRegistry | None, *, instrument: bool = True, **options: Any) -> FastAPI:
    app = FastAPI()
    if instrument:
        app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry, **options)
        app.mount("/metrics", loopwatch.metrics_app(registry))
        app.mount("/loopwatch/events", loopwatch.events_app())

    @app.get("/a")
    async def route_a() -> dict[str, str]:
        block(0.2)
        return {"route": "a"}

    @app.get("/b")
    async def route_b() -> dict[str, str]:
        await asyncio.sleep(0.2)
        return {"route": "b"}

    @app.get("/fanout")
    async def fanout() -> dict[str, int]:
        async def child() -> None:
            await asyncio.sleep(0)
            block(0.05)

        await asyncio.gather(child(), child(), child())
        return {"children": 3}

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> Any:
            for i in range(5):
                yield f"chunk-{i}\n".encode()
                await asyncio.sleep(0.01)

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/slowstream")
    async def slowstream() -> StreamingResponse:
        async def chunks() -> Any:
            for _ in range(100):
                yield b"x" * 1024
                await asyncio.sleep(0.02)

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/redirect")
    async def redirect() -> RedirectResponse:
        return RedirectResponse("/items/1")

    @app.get("/text")
    async def text() -> PlainTextResponse:
        return PlainTextResponse("hello", headers={"x-custom": "1"})

    @app.get("/background")
    async def background(tasks: BackgroundTasks) -> dict[str, bool]:
        def job() -> None:
            background_done.append("job")

        async def blocking_job() -> None:
            block(0.05)

        tasks.add_task(job)
        tasks.add_task(blocking_job)
        return {"scheduled": True}

    @app.get("/background-now")
    async def background_now(tasks: BackgroundTasks) -> dict[str, bool]:
        async def blocking_job() -> None:
            block(0.05)

        # The only task, async: it runs right after the body is sent, in the same step.
        tasks.add_task(blocking_job)
        return {"scheduled": True}

    @app.get("/sync")
    def sync_route() -> dict[str, int]:
        time.sleep(0.05)
        return {"pid": os.getpid()}

    @app.get("/measured")
    async def get_measured() -> dict[str, list[float]]:
        return {"measured": measured}

    @app.get("/pid")
    async def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            if text == "bye":
                await websocket.close()
                return
            await websocket.send_text(f"echo:{text}")

    router = APIRouter(prefix="/api/v1")

    @router.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        return {"user_id": user_id}

    app.include_router(router)
    return app


# For `uvicorn tests.apps.sample:app --workers 2` (multiprocess mode: global registry).
app = build(None)
