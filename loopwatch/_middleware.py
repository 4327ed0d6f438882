"""The pure ASGI middleware: per-request blocking time, HTTP metrics, monitor lifecycle.

A block's way to the metrics, from here: each request runs under a
:class:`~loopwatch._request.RequestOwner` in its context; the step hooks (:mod:`._hooks`) charge
every step to it; the monitor (:mod:`._monitor`) names it in a block's event; when the request
ends, its totals go to :mod:`._metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from ._admission import Admission, Shedder
from ._config import Config, ConfigOptions
from ._metrics import LoopWatchMetrics, RequestSeries, metrics_for
from ._monitor import Monitor
from ._otel import OtelMetrics
from ._accel import request
from ._request import RequestOwner
from ._routes import RouteIndex, method_label
from ._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["LoopWatchMiddleware"]

logger = logging.getLogger("loopwatch")

_running_loop = asyncio.get_running_loop
_loop_or_none = asyncio.events._get_running_loop
#: Entries of a middleware's (raw method, id(endpoint)) -> (endpoint, series) cache, at most.
_FAST_LIMIT = 10_000


class LoopWatchMiddleware(request.RequestPath):  # type: ignore[misc]
    """Measures every HTTP request's event-loop blocking time and exports loop health.

    ``app.add_middleware(loopwatch.LoopWatchMiddleware)`` is all it takes. The loop monitor
    starts on lifespan startup (or on the first request when the server runs without
    lifespan) and stops on shutdown; an already running monitor on the loop is shared.

    Options: ``registry`` (a prometheus ``CollectorRegistry``, default the global one),
    ``meter_provider`` (an OpenTelemetry ``MeterProvider``: the same measurements sent
    through it too; ``pip install "loopwatch[otel]"``), ``exclude_paths`` (paths that are
    neither measured nor counted; default ``/metrics``), ``admission`` (a
    :class:`~loopwatch.Admission`: new requests get 503 while the loop is overloaded; off by
    default), and any :class:`~loopwatch.Config` option such as ``block_threshold``. Unset
    options are read from ``LOOPWATCH_*`` environment variables, and all are validated here.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: CollectorRegistry | None = None,
        meter_provider: Any = None,
        exclude_paths: Iterable[str] = ("/metrics",),
        config: Config | None = None,
        admission: Admission | None = None,
        **options: Unpack[ConfigOptions],
    ) -> None:
        self.app = app
        if config is not None and options:
            raise ValueError("loopwatch: pass either config= or options, not both")
        #: A bad option, meter provider or LOOPWATCH_* variable, reported when the app
        #: starts (_refuse).
        self._config_error: Exception | None = None
        #: The OpenTelemetry instruments, when a meter provider was given.
        self.otel: OtelMetrics | None = None
        try:
            self.config = config if config is not None else Config.from_env(**options)
            if meter_provider is not None:
                self.otel = OtelMetrics(meter_provider)
        except (ValueError, TypeError, ImportError) as exc:
            if _loop_or_none() is None:
                raise  # created at import time: fail right here
            # Starlette builds its middleware lazily, inside the first ASGI call (lifespan
            # startup), where uvicorn's default lifespan="auto" takes an exception for
            # "lifespan unsupported" and goes on serving a 500 for every request: fail the
            # startup instead (_refuse).
            self._config_error = exc
            self.config = Config()
        if isinstance(exclude_paths, str):
            raise ValueError(
                f"loopwatch: invalid exclude_paths={exclude_paths!r}; allowed: an iterable "
                "of paths such as ('/metrics', '/health')"
            )
        self.exclude_paths = frozenset(exclude_paths)
        for path in self.exclude_paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(
                    f"loopwatch: invalid exclude_paths entry {path!r}; allowed: paths "
                    "starting with '/'"
                )
        # "/metrics" also excludes what is mounted under it ("/metrics/").
        self._excluded_prefixes = tuple(p.rstrip("/") + "/" for p in self.exclude_paths)
        self.metrics: LoopWatchMetrics = metrics_for(registry)
        self.monitor: Monitor | None = None
        #: The route templates of the app, by endpoint (the source of every route label).
        self._routes = RouteIndex(app)
        #: Request totals by label, and a cache by (raw method, id(endpoint)) in front of it
        #: (of the endpoint, the series' running totals and its two labels), for endpoints
        #: whose label the endpoint alone decides.
        self._by_label: dict[tuple[str, str], RequestSeries] = {}
        self._fast: dict[tuple[str, int], tuple[Any, Any, str, str]] = {}
        #: The series this middleware made: folded one last time and forgotten by the
        #: metrics when it stops, or when it is garbage (an app that never stopped).
        self._owned: list[RequestSeries] = []
        weakref.finalize(self, self.metrics.retire, self._owned).atexit = False
        if self.otel is not None:
            weakref.finalize(self, self.otel.detach, self._owned).atexit = False
        #: Request owners in flight (for the in-progress gauge).
        self._in_flight: set[RequestOwner] = set()
        #: The loop the monitor watches, weakly (a closed loop is let go).
        self._loop: weakref.ref[asyncio.AbstractEventLoop] | None = None
        self._limiter: Any = None
        self._errors_logged = False
        if admission is not None and not isinstance(admission, Admission):
            raise ValueError(f"loopwatch: invalid admission={admission!r}; allowed: None or "
                             "loopwatch.Admission(max_lag=..., max_utilization=...)")
        #: The admission state (a monitor sink), and the flag each request reads.
        self._shedder = None if admission is None else Shedder(admission, self._on_shedding)
        self._shedding = False

    # -- ASGI -----------------------------------------------------------------------------

    # The ASGI app: RequestPath's, the per-request path (see _request), compiled where it was
    # built; to inspection (uvicorn, Starlette) an async def.
    __call__ = request.RequestPath._serve

    async def _not_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Lifespan (which starts and stops the monitor), WebSocket, anything else: passed
        through, unmeasured."""
        kind = scope["type"]
        self._routes.enter(scope)  # the app's routes, found on its first call
        if self._config_error is not None:
            await self._refuse(kind, receive, send)
            return
        if kind == "lifespan":
            try:
                await self.app(scope, self._lifespan_receive(receive), self._lifespan_send(send))
            finally:
                self._stop()  # also when the app's own startup failed
            return
        loop, monitor = self._loop, self.monitor
        if loop is None or loop() is not _running_loop() or not monitor.active:  # type: ignore[union-attr]
            self._start()
        await self.app(scope, receive, send)

    def _record_first(self, owner: RequestOwner, scope: Scope,
                      missed: tuple[int, float, float, float]) -> None:
        """Record a request the cache did not know (the first of its method and endpoint, or
        one whose label its endpoint alone does not decide)."""
        series = self._series_for(scope)
        series.add(*missed)
        if series.totals.raw is not None:
            request.keep_raw(series.totals, *missed, scope.get("scheme"))
        owner.release(series.method, series.route)

    def _series_for(self, scope: Scope) -> RequestSeries:
        """The running totals for a request's labels (and a cache entry for next time)."""
        raw = scope.get("method")
        method = method_label(raw)
        route, decided = self._routes.label(scope)
        series = self._by_label.get((method, route))
        if series is None:
            series = self._by_label[(method, route)] = self.metrics.new_series(method, route)
            self._owned.append(series)
            if self.otel is not None:
                self.otel.attach(series)
        # Cached only for standard methods (a client inventing methods cannot grow the cache)
        # and endpoints whose label is theirs alone.
        endpoint = scope.get("endpoint")
        if decided and raw == method and endpoint is not None and len(self._fast) < _FAST_LIMIT:
            self._fast[(raw, id(endpoint))] = (endpoint, series.totals, method, route)
        return series

    # -- lifespan -------------------------------------------------------------------------

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._start()
            return message

        return wrapped

    def _lifespan_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self._stop()
            await send(message)

        return wrapped

    async def _refuse(self, kind: str, receive: Receive, send: Send) -> None:
        error = self._config_error
        assert error is not None
        if kind == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                logger.error("%s", error)
                await send({"type": "lifespan.startup.failed", "message": str(error)})
                return
        raise error

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        monitor = self.monitor
        if monitor is not None:
            if monitor.active and monitor.loop is loop:
                self._loop = weakref.ref(loop)
                return
            self._stop()  # left behind by a server that ran without lifespan
        try:
            # Apps served on one loop share its monitor; one a middleware started stops with
            # the last middleware that uses it.
            monitor = Monitor._shared(loop, self.config, self)
            monitor.add_sink(self.metrics)
            if self.otel is not None:
                monitor.add_sink(self.otel)
            monitor.add_sink(self)
            if self._shedder is not None:
                monitor.add_sink(self._shedder)
            self.monitor = monitor
            self._loop = weakref.ref(loop)
            self._limiter = _default_thread_limiter()
        except Exception:  # noqa: BLE001
            self._internal_error("starting the loop monitor")

    def _stop(self) -> None:
        """Stop using the monitor; the last middleware to leave it stops it, if a middleware
        started it (apps served on one loop share its monitor)."""
        monitor = self.monitor
        if monitor is None:
            return
        self.monitor = None
        self._loop = None
        try:
            monitor.remove_sink(self)
            if self._shedder is not None:
                monitor.remove_sink(self._shedder)
                self._shedder.reset()
            if self.otel is not None:
                monitor.remove_sink(self.otel)
            others = [user for user in monitor._users if user is not self]
            if not any(getattr(user, "metrics", None) is self.metrics for user in others):
                monitor.remove_sink(self.metrics)
            monitor._leave(self)
        except Exception:  # noqa: BLE001
            self._internal_error("stopping the loop monitor")
        # What this run recorded is folded into the metrics now; a next run (a new server of
        # the same app) starts new series.
        self.metrics.retire(self._owned)
        if self.otel is not None:
            self.otel.detach(self._owned)
        self._owned.clear()
        self._by_label.clear()
        self._fast.clear()

    # -- admission ---------------------------------------------------------------------------

    def _on_shedding(self, shedding: bool, reason: str) -> None:
        self._shedding = shedding
        self.metrics.shedding.set(1 if shedding else 0)
        if shedding:
            logger.warning("loopwatch: shedding new requests with 503 (%s); served still: %s",
                           reason, ", ".join(sorted(self._always_served())) or "nothing")
        else:
            logger.warning("loopwatch: serving every request again (%s)", reason)

    def _always_served(self) -> frozenset[str]:
        assert self._shedder is not None
        return self.exclude_paths | self._shedder.admission.exclude_paths

    async def _shed(self, scope: Scope, send: Send) -> bool:
        """While shedding: answer a new request ``503`` with ``Retry-After`` (True), unless
        its path is always served (False: it goes on as usual)."""
        shedder = self._shedder
        if shedder is None or scope.get("path") in shedder.admission.exclude_paths:
            return False
        retry = str(shedder.admission.retry_after)
        try:
            path = scope.get("path")
            route = self._routes.template_of(path if isinstance(path, str) else "")
            self.metrics.requests_shed.labels(method_label(scope.get("method")), route).inc()
        except Exception:  # noqa: BLE001 - never break the app we watch
            self._internal_error("counting a shed request")
        body = (f"Service overloaded: the event loop is behind; retry after {retry} s\n"
                .encode())
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", retry.encode()),
        ]})
        await send({"type": "http.response.body", "body": body})
        return True

    # -- once a second, on the loop (monitor sink) ------------------------------------------

    def on_tick(self) -> None:
        if self._routes.refresh():
            # Routes were added or removed: labels cached by endpoint may no longer hold.
            self._fast.clear()
        counts: dict[tuple[str | None, str | None], int] = {}
        for owner in self._in_flight:
            key = owner.labels()
            counts[key] = counts.get(key, 0) + 1
        self.metrics.set_in_progress(counts)
        otel = self.otel
        if otel is not None:
            otel.set_in_progress(self._in_flight)
        limiter = self._limiter
        if limiter is not None:
            pool = (limiter.borrowed_tokens, limiter.total_tokens,
                    limiter.statistics().tasks_waiting)
            self.metrics.set_threadpool(*pool)
            if otel is not None:
                otel.set_threadpool(*pool)

    def _internal_error(self, where: str) -> None:
        try:
            self.metrics.on_internal_error()
            if self.otel is not None:
                self.otel.on_internal_error()
        except Exception:  # noqa: BLE001
            pass
        if not self._errors_logged:
            self._errors_logged = True
            logger.exception("loopwatch internal error while %s (further ones are only counted)",
                             where)


def _default_thread_limiter() -> Any:
    """AnyIO's default thread limiter (sync routes, to_thread), if AnyIO is in use."""
    try:
        import anyio.to_thread
    except ImportError:
        return None
    try:
        return anyio.to_thread.current_default_thread_limiter()
    except Exception:  # noqa: BLE001 - not inside an AnyIO-compatible context
        return None

