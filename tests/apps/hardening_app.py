"""Apps for the hardening tests: a response corpus, a fault-injecting upstream, a plain app.

``build_corpus(registry, instrument=...)`` is the same FastAPI app with or without loopwatch,
so that the two can be compared byte for byte. ``FaultUpstream`` answers the demo's upstream
routes with faults the demo's own simulator does not have (a huge body, a body that trickles
in forever, a body shorter than its Content-Length). ``build_plain`` is a small Starlette app
for driving many requests in-process. The module-level ``app`` is for
``uvicorn tests.apps.hardening_app:app`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from starlette.websockets import WebSocketDisconnect

import loopwatch

_started: list[loopwatch.Monitor] = []

# The files the corpus serves: one fixed folder shared by every process that imports this
# module (servers in subprocesses, workers), written atomically once.
FILES = Path(tempfile.gettempdir()) / "loopwatch-hardening-files-v1"
BIG_FILE = FILES / "big.bin"
TEXT_FILE = FILES / "hello.txt"


def _write_once(path: Path, content: bytes) -> None:
    if not (path.exists() and path.stat().st_size == len(content)):
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_bytes(content)
        os.replace(partial, path)
    os.utime(path, (1_700_000_000, 1_700_000_000))  # stable Last-Modified and ETag


FILES.mkdir(exist_ok=True)
_write_once(BIG_FILE, bytes(range(256)) * 4096)  # 1 MiB, every byte value
_write_once(TEXT_FILE, b"hello, file\n" * 100)


class Item(BaseModel):
    name: str
    price: float
    tags: list[str] = []


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    yield {"started": "yes"}


def build_corpus(registry: CollectorRegistry | None, *, instrument: bool = True,
                 **options: Any) -> FastAPI:
    """Every kind of response the transparency tests compare."""
    app = FastAPI(lifespan=_lifespan)
    #: How each ``/disconnect`` stream ended, in order ("completed", "cancelled", ...):
    #: compared between the app with and without the middleware.
    stream_endings: list[str] = []
    app.state.stream_endings = stream_endings
    if instrument:
        app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry, **options)
        app.mount("/metrics", loopwatch.metrics_app(registry))
        app.mount("/loopwatch/events", loopwatch.events_app())
    app.mount("/static", StaticFiles(directory=FILES), name="static")

    @app.get("/json")
    async def json_route() -> dict[str, Any]:
        return {"unicode": "grüße ✓ 😀", "nested": {"list": list(range(50)), "none": None},
                "float": 1.5e-7}

    @app.get("/json/big")
    async def big_json() -> JSONResponse:
        return JSONResponse({"rows": [{"i": i, "s": "x" * 20} for i in range(20_000)]})

    @app.post("/items", status_code=201)
    async def create_item(item: Item) -> Item:
        return item

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(body, media_type=request.headers.get("content-type", "text/plain"))

    @app.get("/state")
    async def state(request: Request) -> dict[str, str]:
        return {"started": request.state.started}  # lifespan state passes through

    @app.get("/cookies")
    async def cookies() -> Response:
        response = PlainTextResponse("cookies")
        response.set_cookie("a", "1")
        response.set_cookie("b", "2", httponly=True)
        response.headers.append("x-multi", "one")
        response.headers.append("x-multi", "two")
        return response

    @app.get("/empty", status_code=204)
    async def empty() -> Response:
        return Response(status_code=204)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(20):
                yield f"chunk {i}\n".encode() * (i + 1)
                if i % 5 == 0:
                    await asyncio.sleep(0.001)
            yield b""  # an empty chunk in the middle of a stream

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/stream/fail")
    async def stream_fail() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first\n"
            await asyncio.sleep(0.001)
            raise RuntimeError("the stream broke after the headers were sent")

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/disconnect")
    async def disconnect() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            sent = 0
            try:
                for _ in range(2000):
                    yield b"y" * 4096
                    sent += 1
                    await asyncio.sleep(0.005)
                stream_endings.append("completed")
            except asyncio.CancelledError:
                stream_endings.append("cancelled" if sent else "cancelled before a chunk")
                raise
            except GeneratorExit:
                stream_endings.append("closed" if sent else "closed before a chunk")
                raise
            except BaseException as exc:  # noqa: BLE001
                stream_endings.append(type(exc).__name__)
                raise

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.get("/file")
    async def file() -> FileResponse:
        return FileResponse(BIG_FILE, media_type="application/octet-stream")

    @app.get("/file/text")
    async def text_file() -> FileResponse:
        return FileResponse(TEXT_FILE, filename="hello.txt")

    @app.get("/redirect/{code}")
    async def redirect(code: int) -> RedirectResponse:
        return RedirectResponse("/json?from=redirect", status_code=code)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/status/{code}")
    async def status(code: int) -> Response:
        return Response(f"status {code}\n", status_code=code)

    @app.get("/sleep")
    async def sleep(ms: int = 0) -> dict[str, int]:
        await asyncio.sleep(ms / 1000)
        return {"slept": ms}

    @app.get("/block")
    async def block(ms: int = 0) -> dict[str, int]:
        time.sleep(ms / 1000)  # noqa: ASYNC251 - blocking on purpose
        return {"blocked": ms}

    @app.get("/sync")
    def sync(ms: int = 0) -> dict[str, int]:
        time.sleep(ms / 1000)
        return {"slept": ms}

    @app.post("/login/{username}")
    async def login(username: str, request: Request) -> dict[str, bool]:
        body = await request.body()
        password = body.decode()  # a secret in a local variable while the loop blocks
        api_key = request.headers.get("x-api-key", "")
        time.sleep(0.15)  # noqa: ASYNC251 - blocking on purpose, with secrets in locals
        return {"ok": bool(password and api_key and username)}

    @app.get("/executor")
    async def executor(ms: int = 0) -> dict[str, int]:
        # Work handed to the loop's default executor, as many apps do for blocking calls.
        await asyncio.get_running_loop().run_in_executor(None, time.sleep, ms / 1000)
        return {"slept": ms}

    @app.get("/pid")
    async def pid() -> dict[str, int]:
        monitor = loopwatch.get_monitor()
        if monitor is not None and monitor not in _started:
            _started.append(monitor)  # checked at exit by _report_threads_at_exit
        return {"pid": os.getpid()}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept(subprotocol=None, headers=[(b"x-ws", b"1")])
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") == "close":
                    await websocket.close(code=4001, reason="asked to")
                    return
                if message.get("text") is not None:
                    await websocket.send_text("echo:" + message["text"])
                else:
                    await websocket.send_bytes(b"echo:" + message["bytes"])
        except WebSocketDisconnect:
            return

    @app.websocket("/ws/reject")
    async def ws_reject(websocket: WebSocket) -> None:
        await websocket.close(code=1008)  # before accept: the handshake is refused (403)

    return app


# -- an upstream with faults the demo's simulator does not have ------------------------------


class FaultUpstream:
    """An ASGI upstream for the demo whose every answer is the fault in ``mode``.

    * ``huge``: 200 with a valid JSON body of ``huge_bytes`` bytes, sent as fast as possible;
    * ``trickle``: 200 with a JSON body that arrives one byte every ``trickle_interval``
      seconds and never ends (until the client goes away);
    * ``short``: 200 that declares a Content-Length larger than the body it sends, then
      closes the connection;
    * ``ok``: a small valid answer.

    ``active`` counts the responses still being sent (so a test can see the demo let go).
    """

    def __init__(self, mode: str = "ok", *, huge_bytes: int = 64 * 1024 * 1024,
                 trickle_interval: float = 0.05) -> None:
        self.mode = mode
        self.huge_bytes = huge_bytes
        self.trickle_interval = trickle_interval
        self.active = 0
        self.served = 0
        #: Set to end every trickling body now (test teardown).
        self.released = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.served += 1
        self.active += 1
        try:
            await getattr(self, "_" + self.mode)(send)
        finally:
            self.active -= 1

    @staticmethod
    async def _start(send: Any, length: int | None = None) -> None:
        headers = [(b"content-type", b"application/json")]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _ok(self, send: Any) -> None:
        body = json.dumps({"id": 1, "name": "ok"}).encode()
        await self._start(send, len(body))
        await send({"type": "http.response.body", "body": body})

    async def _huge(self, send: Any) -> None:
        head, tail = b'{"id": 1, "pad": "', b'"}'
        chunk = b"x" * (1024 * 1024)
        n = max(1, (self.huge_bytes - len(head) - len(tail)) // len(chunk))
        await self._start(send, len(head) + n * len(chunk) + len(tail))
        await send({"type": "http.response.body", "body": head, "more_body": True})
        for _ in range(n):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": tail})

    async def _trickle(self, send: Any) -> None:
        await self._start(send)
        await send({"type": "http.response.body", "body": b'{"id": 1, "pad": "',
                    "more_body": True})
        for _ in range(100_000):  # bounded: 100,000 x trickle_interval
            if self.released:
                break
            await asyncio.sleep(self.trickle_interval)
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await send({"type": "http.response.body", "body": b'"}'})

    async def _short(self, send: Any) -> None:
        await self._start(send, 1000)
        await send({"type": "http.response.body", "body": b'{"id": 1', "more_body": True})
        raise RuntimeError("the upstream died mid-body")  # uvicorn closes the connection


# -- a plain Starlette app for driving 100,000 requests in-process ----------------------------


def build_plain(registry: CollectorRegistry, **options: Any) -> Any:
    """Starlette with every kind of route a label can come from: plain, with a typed
    parameter, a router under a Mount, a mounted raw ASGI app, a WebSocket; wrapped in the
    middleware (the returned app is the middleware, whose ``.app`` is the Starlette app)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse as Text
    from starlette.routing import Mount, Route, WebSocketRoute

    async def hello(request: Any) -> Text:
        return Text("hello")

    async def user(request: Any) -> Text:
        return Text(str(request.path_params["user_id"]))

    async def item(request: Any) -> Text:
        await asyncio.sleep(0)  # a real await: requests overlap
        return Text(request.path_params["name"], status_code=201 if request.method == "POST"
                    else 200)

    async def thing(request: Any) -> Text:
        return Text("thing")

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"raw"})

    async def ws(websocket: Any) -> None:
        await websocket.close()

    routes = [
        Route("/", hello),
        Route("/users/{user_id:int}", user),
        Route("/items/{name}", item, methods=["GET", "POST", "PUT"]),
        Mount("/api/v1", routes=[Route("/things/{thing_id}", thing)]),
        Mount("/raw", app=raw),
        WebSocketRoute("/ws", ws),
    ]
    app = Starlette(routes=routes)
    return loopwatch.LoopWatchMiddleware(app, registry=registry, **options)


# -- for `uvicorn tests.apps.hardening_app:app` in a subprocess -------------------------------


class _ShutdownReport:
    """Outermost ASGI wrapper: when the app has finished its lifespan shutdown (the
    middleware stopped its monitor on the way out), print the threads still alive to stderr.

    uvicorn re-raises SIGTERM after a graceful shutdown, so the process ends by the signal
    and atexit handlers never run: the report is made here instead.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def reporting_send(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                names = sorted(t.name for t in threading.enumerate()
                               if t is not threading.current_thread())
                print(f"HARDENING-EXIT threads={json.dumps(names)} monitor_stopped="
                      f"{all(not m.active for m in _started)}", file=sys.stderr, flush=True)
            await send(message)

        await self.app(scope, receive, reporting_send)


app: Any = build_corpus(None)
if os.environ.get("HARDENING_REPORT_EXIT"):
    app = _ShutdownReport(app)
