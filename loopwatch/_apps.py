"""ASGI apps to mount: the Prometheus exposition and the recent block events as JSON."""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import os
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder

from ._accel import HOT_PATH
from ._events import BlockEvent
from ._metrics import flush_all
from ._monitor import get_monitor
from ._offloop import Busy, Pieces, in_thread, pieces, respond, stream

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


def _render(registry: CollectorRegistry | None, accept: str, accept_gzip: bool,
            ) -> tuple[Pieces, str, bool]:
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
        return pieces([gzip.compress(body, compresslevel=6)]), content_type, True
    return pieces([body]), content_type, False


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
            await respond(send, 405, b"Method Not Allowed\n",
                          [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain")])
            return
        headers = _headers(scope)
        accept = headers.get(b"accept", b"").decode("latin-1")
        accept_gzip = "gzip" in headers.get(b"accept-encoding", b"").decode("latin-1")
        flush_all()  # requests finished since the last probe
        try:
            body, content_type, gzipped = await in_thread(_render, registry, accept,
                                                          accept_gzip)
        except Busy:
            await respond(send, 503, b"Busy: too many scrapes at once\n",
                          [(b"retry-after", b"1"), (b"content-type", b"text/plain")])
            return
        out = [(b"content-type", content_type.encode("latin-1")), (b"vary", b"Accept-Encoding")]
        if gzipped:
            out.append((b"content-encoding", b"gzip"))
        await respond(send, 200, body, out, method == "HEAD")


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
    fewer. The response is made on the loop as it goes out, event by event, in steps of about
    a millisecond: it never holds the loop, never holds the whole document in memory, and
    its size is bounded by ``limit`` events of at most ``stack_depth`` frames each.
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
        if scope.get("method") not in ("GET", "HEAD"):
            await respond(send, 405, b'{"detail":"Method Not Allowed"}',
                          [(b"allow", b"GET, HEAD"), json_type])
            return
        n = default_limit
        raw_query = scope.get("query_string", b"")
        query = raw_query.decode("latin-1") if isinstance(raw_query, bytes) else ""
        for part in query.split("&"):
            name, _, value = part.partition("=")
            if name == "limit":
                if not (value.isascii() and value.isdigit() and len(value) <= 4) \
                        or not 1 <= int(value) <= 1000:
                    body = json.dumps({"detail": f"invalid limit={value!r}; allowed: an "
                                                 "integer from 1 to 1000"}).encode()
                    await respond(send, 422, body, [json_type])
                    return
                n = int(value)
        monitor = get_monitor()
        hot_path = HOT_PATH
        events: list[BlockEvent] = []
        if monitor is None:
            head: dict[str, Any] = {"monitoring": False, "hot_path": hot_path}
        else:
            # On the loop only the snapshot: n references, newest last (events are frozen).
            events = list(itertools.islice(reversed(monitor.blocks), n))[::-1]
            head = {
                "monitoring": monitor.active,
                "hot_path": hot_path,
                "block_threshold": monitor.config.block_threshold,
                "block_count": monitor.block_count,
            }
        await stream(send, 200, _events_parts(head, events),
                     [json_type, (b"cache-control", b"no-store")], scope.get("method") == "HEAD")


def _events_parts(head: dict[str, Any], events: Sequence[BlockEvent]) -> Iterator[str]:
    """``{**head, "events": [...]}`` as JSON, in parts: one small ``json.dumps`` per event
    (under a millisecond at the largest ``stack_depth``)."""
    top = json.dumps(head)
    yield top[:-1] + ', "events": ['
    for i, event in enumerate(events):
        yield (", " if i else "") + json.dumps(event.as_dict())
    yield "]}"
