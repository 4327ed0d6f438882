"""The pure ASGI middleware: per-request blocking time, HTTP metrics, monitor lifecycle."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from ._accel import speedups
from ._attribution import Owner, current_owner
from ._config import Config
from ._metrics import LoopWatchMetrics, RequestSeries, metrics_for
from ._monitor import Monitor, get_monitor
from ._routes import method_label, route_label

__all__ = ["LoopWatchMiddleware"]

logger = logging.getLogger("loopwatch")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_clock = time.perf_counter
_running_loop = asyncio.get_running_loop
_loop_or_none = asyncio.events._get_running_loop
_set_owner = current_owner.set
_reset_owner = current_owner.reset


# Monitors that middlewares started or joined: monitor -> (whether a middleware started it,
# the middlewares using it). Apps served on one loop share its monitor; it stops with the last.
_shared: dict[Monitor, tuple[bool, list[Any]]] = {}


class _RequestOwner(Owner):
    """The loop time of one request; its route is read from the scope once routed.

    Its ``send_wrapper`` is the request's ``send`` (a plain method returning the server's
    awaitable: no coroutine of our own per message), which notes the status and the end of
    the body. ``loopwatch._speedups.RequestOwner`` is its C twin, which is itself the send.
    """

    __slots__ = ("ended", "root_path", "scope", "send", "status")
    scope: Scope
    root_path: str
    send: Send
    status: int
    ended: float

    def labels(self) -> tuple[str | None, str | None]:
        if self.route is not None:  # labelled when it finished
            return self.method, self.route
        return method_label(self.scope["method"]), route_label(self.scope, self.root_path)

    def send_wrapper(self, message: Message) -> Awaitable[None]:
        send = self.send
        if send is None:
            raise RuntimeError("ASGI send called after the application returned (loopwatch "
                               "has released the request)")
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif not message.get("more_body", False):
            self.ended = _clock()
        return send(message)

    def release(self, method: str, route: str) -> None:
        """Keep the labels, let go of the request: contexts copied during the request (a
        keep-alive timer the server starts as the body goes out) keep the owner alive for
        seconds, and with it, had it kept them, the scope and the server's send."""
        self.method = method
        self.route = route
        self.scope = None  # type: ignore[assignment]
        self.send = None  # type: ignore[assignment]
        self.root_path = None  # type: ignore[assignment]


def _py_new_owner(scope: Scope, root_path: str, send: Send) -> _RequestOwner:
    # _RequestOwner(...) without a Python __init__: this runs for every request.
    owner = object.__new__(_RequestOwner)
    owner.busy = 0.0
    owner.scope = scope
    owner.root_path = root_path
    owner.send = send
    owner.status = 0
    owner.ended = 0.0
    owner.method = None
    owner.route = None
    return owner


_new_owner: Callable[[Scope, str, Send], Any] = (
    _py_new_owner if speedups is None else speedups.new_owner
)
#: Whether the owner itself is the request's send (C), or its send_wrapper (pure Python).
_OWNER_IS_SEND = speedups is not None


def _py_finish(
    owner: _RequestOwner, monitor: Monitor | None, start: float,
    cache: dict[tuple[str, int], tuple[Any, Any, str, str]], scope: Scope, root_path: str,
) -> tuple[int, float, float] | None:
    """A request's last moment, in its last step: its loop time, recorded in the running
    totals ``cache`` holds for its (method, id(route)). None when recorded, else (status,
    duration, blocking) for the caller to record. ``_speedups.finish`` is its C twin."""
    now = _clock()
    # Charge the step still running too (a handler that blocks and returns without another
    # await would otherwise be charged nothing; nor would background tasks run after the
    # body was sent, in the same step).
    blocking = monitor.note_finished(owner, now) if monitor is not None else owner.busy
    status = owner.status or 500
    duration = (owner.ended or now) - start
    route = scope.get("route")
    if scope.get("root_path", "") == root_path:
        entry = cache.get((scope["method"], id(route)))
        if entry is not None and entry[0] is route:
            entry[1].add(status, duration, blocking)
            owner.release(entry[2], entry[3])
            return None
    return status, duration, blocking


_finish: Callable[..., tuple[int, float, float] | None] = (
    _py_finish if speedups is None else speedups.finish
)
_release: Callable[[Any, str, str], None] = (
    _RequestOwner.release if speedups is None else speedups.release
)
#: Entries of a middleware's (raw method, id(route)) -> (route, series) cache, at most.
_FAST_LIMIT = 10_000

if TYPE_CHECKING or speedups is None:
    _Base = object
else:
    #: With the C extension, ``_serve`` is a slot that ``__call__`` (an AsgiEntry) reads
    #: directly, not an instance attribute looked up for every request.
    _Base = speedups.ServeSlot


class LoopWatchMiddleware(_Base):
    """Measures every HTTP request's event-loop blocking time and exports loop health.

    ``app.add_middleware(loopwatch.LoopWatchMiddleware)`` is all it takes. The loop monitor
    starts on lifespan startup (or on the first request when the server runs without
    lifespan) and stops on shutdown; an already running monitor on the loop is shared.

    Options: ``registry`` (a prometheus ``CollectorRegistry``, default the global one),
    ``exclude_paths`` (paths that are neither measured nor counted; default ``/metrics``),
    and any :class:`~loopwatch.Config` option such as ``block_threshold``. Unset options
    are read from ``LOOPWATCH_*`` environment variables, and all are validated here.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        registry: CollectorRegistry | None = None,
        exclude_paths: Iterable[str] = ("/metrics",),
        config: Config | None = None,
        **options: Any,
    ) -> None:
        self.app = app
        if config is not None and options:
            raise ValueError("loopwatch: pass either config= or options, not both")
        #: A bad option or LOOPWATCH_* variable, reported when the app starts (see _call).
        self._config_error: ValueError | None = None
        try:
            self.config = config if config is not None else Config.from_env(**options)
        except ValueError as exc:
            if _loop_or_none() is None:
                raise  # created at import time: fail right here
            # Starlette builds its middleware lazily, inside the first ASGI call (lifespan
            # startup), where uvicorn's default lifespan="auto" takes an exception for
            # "lifespan unsupported" and goes on serving a 500 for every request: fail the
            # startup instead (_call).
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
        #: Request totals by label, and a cache by (raw method, id(route)) in front of it
        #: (of the route object, the series' running totals and its two labels).
        self._by_label: dict[tuple[str, str], RequestSeries] = {}
        self._fast: dict[tuple[str, int], tuple[Any, Any, str, str]] = {}
        #: Request owners in flight (with the C extension an InFlight: the C owners linked
        #: through their own fields, no hashing per request).
        self._in_flight: Any = set() if speedups is None else speedups.InFlight()
        self._limiter: Any = None
        self._errors_logged = False
        #: The C request path while the monitor runs (None: every call goes to _call).
        self._serve: Any = None

    # -- ASGI -----------------------------------------------------------------------------

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app (see ``__call__`` below for the C request path in front of it)."""
        kind = scope["type"]
        if self._config_error is not None:
            await self._refuse(kind, receive, send)
            return
        if kind != "http":
            if kind == "lifespan":
                try:
                    await self.app(scope, self._lifespan_receive(receive),
                                   self._lifespan_send(send))
                finally:
                    self._stop()  # also when the app's own startup failed
                return
            monitor = self.monitor
            if monitor is None or not monitor.active or monitor.loop is not _running_loop():
                self._start()
            await self.app(scope, receive, send)
            return
        monitor = self.monitor
        if monitor is None or not monitor.active or monitor.loop is not _running_loop():
            # First request without lifespan, or the app now runs on another loop (a new
            # server of the same app object, as test suites do).
            self._start()
        path = scope["path"]
        if path in self.exclude_paths or path.startswith(self._excluded_prefixes):
            await self.app(scope, receive, send)
            return

        root_path = scope.get("root_path", "")
        owner = _new_owner(scope, root_path, send)
        token = _set_owner(owner)
        in_flight = self._in_flight
        in_flight.add(owner)
        start = _clock()
        try:
            await self.app(scope, receive, owner if _OWNER_IS_SEND else owner.send_wrapper)
        except BaseException:
            if not owner.status:
                owner.status = 500
            raise
        finally:
            in_flight.discard(owner)
            try:
                missed = _finish(owner, self.monitor, start, self._fast, scope, root_path)
                if missed is not None:  # the first request of its (method, route)
                    self._record_first(owner, scope, root_path, missed)
            except Exception:  # noqa: BLE001 - never break the app we watch
                self._internal_error("recording a request")
            try:
                _reset_owner(token)
            except ValueError:  # the coroutine was closed from another context
                self._internal_error("recording a request")

    # The ASGI app. Pure Python: the coroutine above. With the C extension, an entry that
    # hands each request to the C request path (``self._serve``, a ``RequestPath``) while the
    # monitor runs: a measured HTTP request is then one C object that does what _call does,
    # without a coroutine and a Python frame of its own; anything else goes to _call. To
    # inspect (so to uvicorn, Starlette, hypercorn, asgiref) it is _call, an async def.
    __call__ = _call if speedups is None else speedups.AsgiEntry(_call)

    def _record_first(self, owner: Any, scope: Scope, root_path: str,
                      missed: tuple[int, float, float]) -> None:
        """Record the first request of a (method, route), which the cache did not know."""
        series = self._series_for(scope, root_path)
        series.add(*missed)
        _release(owner, series.method, series.route)

    def _series_for(self, scope: Scope, root_path: str) -> RequestSeries:
        """The running totals for a request's labels (and a cache entry for next time)."""
        method = method_label(scope["method"])
        route = route_label(scope, root_path)
        series = self._by_label.get((method, route))
        if series is None:
            series = self._by_label[(method, route)] = self.metrics.new_series(method, route)
        raw = scope["method"]
        # Cached only for standard methods: a client inventing methods cannot grow the cache.
        if (raw == method and scope.get("root_path", "") == root_path
                and len(self._fast) < _FAST_LIMIT):
            matched = scope.get("route")
            self._fast[(raw, id(matched))] = (matched, series.totals, method, route)
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
        if self.monitor is not None:
            if self.monitor.active and self.monitor.loop is loop:
                return
            self._stop()  # left behind by a server that ran without lifespan
        try:
            monitor = get_monitor(loop)
            if monitor is None:
                monitor = Monitor(loop, config=self.config).start()
                _shared[monitor] = (True, [])
            _shared.setdefault(monitor, (False, []))[1].append(self)
            monitor.add_sink(self.metrics)
            monitor.add_sink(self)
            self.monitor = monitor
            self._limiter = _default_thread_limiter()
            if speedups is not None and isinstance(monitor, speedups.StepState):
                self._serve = speedups.RequestPath(
                    self, self.app, monitor, self.exclude_paths, self._excluded_prefixes,
                    self._fast, self._in_flight,
                )
        except Exception:  # noqa: BLE001
            self._internal_error("starting the loop monitor")

    def _stop(self) -> None:
        """Stop using the monitor; the last middleware to leave it stops it, if a middleware
        started it (apps served on one loop share its monitor)."""
        monitor = self.monitor
        if monitor is None:
            return
        self.monitor = None
        self._serve = None
        try:
            started, users = _shared.get(monitor, (False, []))
            if self in users:
                users.remove(self)
            monitor.remove_sink(self)
            if not any(user.metrics is self.metrics for user in users):
                monitor.remove_sink(self.metrics)
            if not users:
                _shared.pop(monitor, None)
                if started:
                    monitor.stop()
        except Exception:  # noqa: BLE001
            self._internal_error("stopping the loop monitor")

    # -- once a second, on the loop (monitor sink) ------------------------------------------

    def on_tick(self) -> None:
        counts: dict[tuple[str | None, str | None], int] = {}
        for owner in self._in_flight:
            key = owner.labels()
            counts[key] = counts.get(key, 0) + 1
        self.metrics.set_in_progress(counts)
        limiter = self._limiter
        if limiter is not None:
            self.metrics.set_threadpool(
                limiter.borrowed_tokens, limiter.total_tokens,
                limiter.statistics().tasks_waiting,
            )

    def _internal_error(self, where: str) -> None:
        try:
            self.metrics.on_internal_error()
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

