"""ASGI apps to mount: the Prometheus exposition and the recent block events as JSON."""

from __future__ import annotations

import asyncio
import glob
import gzip
import json
import os
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ._accel import speedups
from ._metrics import flush_all
from ._monitor import get_monitor

__all__ = ["events_app", "metrics_app"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_GZIP_MIN_BYTES = 1024


def _headers(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", ())}


async def _not_http(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        # Mounted apps do not get lifespan from Starlette, but a bare server may send it.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1003})


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]],
                   head_only: bool) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else body})


def _forget_dead_workers(directory: str) -> None:
    """Drop the live gauges of worker processes that are gone (uvicorn's supervisor, unlike
    gunicorn's ``child_exit`` hook, never calls ``mark_process_dead``): their counters and
    histograms stay, their in-progress and thread-pool gauges must not."""
    from prometheus_client import multiprocess

    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        try:
            pid = int(os.path.basename(path).rsplit("_", 1)[1][:-3])
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
            except OSError:  # another worker's scrape removed the files first
                pass
        except (ValueError, PermissionError, OSError):
            continue


async def _render_in_thread(*args: Any) -> tuple[bytes, str, bool]:
    """``_render(*args)`` in a thread of its own, never in the loop's default executor: a
    scrape must not queue behind the application's ``run_in_executor`` work (metrics are most
    needed when the app is saturated). A thread per scrape costs ~0.1 ms, leaves no thread
    behind between scrapes and is fork-safe."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[bytes, str, bool]] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def work() -> None:
        try:
            result, error = _render(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop was closed meanwhile: nobody is waiting
            pass

    threading.Thread(target=work, name="loopwatch-render", daemon=True).start()
    return await future


def _render(registry: CollectorRegistry | None, accept: str, accept_gzip: bool,
            ) -> tuple[bytes, str, bool]:
    if registry is None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            _forget_dead_workers(os.environ["PROMETHEUS_MULTIPROC_DIR"])
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry)
    if accept_gzip and len(body) >= _GZIP_MIN_BYTES:
        return gzip.compress(body, compresslevel=6), content_type, True
    return body, content_type, False


class _MetricsApp:
    """The ASGI app returned by :func:`metrics_app` (a class, so that Starlette's
    ``add_route`` treats it as an ASGI app rather than a request handler)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        registry = self.registry
        if scope["type"] != "http":
            await _not_http(scope, receive, send)
            return
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"Method Not Allowed\n",
                           [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain")], False)
            return
        headers = _headers(scope)
        accept = headers.get(b"accept", b"").decode("latin-1")
        accept_gzip = "gzip" in headers.get(b"accept-encoding", b"").decode("latin-1")
        flush_all()  # requests finished since the last probe
        body, content_type, gzipped = await _render_in_thread(registry, accept, accept_gzip)
        out = [(b"content-type", content_type.encode("latin-1")), (b"vary", b"Accept-Encoding")]
        if gzipped:
            out.append((b"content-encoding", b"gzip"))
        await _respond(send, 200, body, out, method == "HEAD")


def metrics_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app that serves the Prometheus exposition of ``registry``.

    The exposition is rendered in a worker thread, never on the event loop: a scrape of a
    large registry would otherwise be a block of its own. With ``PROMETHEUS_MULTIPROC_DIR``
    set and no explicit registry, it aggregates every worker's metrics. It honours
    ``Accept`` (OpenMetrics) and ``Accept-Encoding: gzip``. Serve it with
    ``app.add_route("/metrics", metrics_app())`` (exactly ``/metrics``) or
    ``app.mount("/metrics", metrics_app())`` (``/metrics/``; ``/metrics`` redirects).
    """
    return _MetricsApp(registry)


def events_app(limit: int = 100) -> ASGIApp:
    """An ASGI app that serves the most recent block events of the running loop as JSON.

    ``{"events": [...], "block_count": N, ...}``, newest last; each event has its time,
    method, route, duration, stack frames (file, line, function) and hint — never query
    strings, headers, cookies, bodies or local variables. ``?limit=N`` (1–1000) returns
    fewer.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise ValueError(f"loopwatch: invalid limit={limit!r}; allowed: an integer from 1 to 1000")
    return _EventsApp(limit)


class _EventsApp:
    """The ASGI app returned by :func:`events_app`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        default_limit = self.limit
        if scope["type"] != "http":
            await _not_http(scope, receive, send)
            return
        json_type = (b"content-type", b"application/json")
        if scope["method"] not in ("GET", "HEAD"):
            await _respond(send, 405, b'{"detail":"Method Not Allowed"}',
                           [(b"allow", b"GET, HEAD"), json_type], False)
            return
        n = default_limit
        query = scope.get("query_string", b"").decode("latin-1")
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "limit":
                if not (value.isascii() and value.isdigit() and len(value) <= 4) \
                        or not 1 <= int(value) <= 1000:
                    body = json.dumps({"detail": f"invalid limit={value!r}; allowed: an "
                                                 "integer from 1 to 1000"}).encode()
                    await _respond(send, 422, body, [json_type], False)
                    return
                n = int(value)
        monitor = get_monitor()
        hot_path = "python" if speedups is None else "c"
        if monitor is None:
            payload: dict[str, Any] = {"monitoring": False, "hot_path": hot_path, "events": []}
        else:
            events = list(monitor.blocks)[-n:]
            payload = {
                "monitoring": monitor.active,
                "hot_path": hot_path,
                "block_threshold": monitor.config.block_threshold,
                "block_count": monitor.block_count,
                "events": [e.as_dict() for e in events],
            }
        body = json.dumps(payload).encode()
        await _respond(send, 200, body, [json_type, (b"cache-control", b"no-store")],
                       scope["method"] == "HEAD")
