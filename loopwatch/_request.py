"""One HTTP request's owner and its record: the per-request path.

The middleware makes a :class:`RequestOwner` per request and puts it in the request's
context; the step hooks (:mod:`._hooks`) charge every step that runs in that context to it,
so the request's blocking time includes its ``gather`` children and background tasks. Its
``send`` is the request's ASGI send: it notes the status and the end of the body. When the
request ends, :func:`finish` adds it to the running :class:`Totals` of its (method, route),
which :mod:`._metrics` folds into the Prometheus metrics in batches.

This module is plain Python and the one definition of that path. Where the extension was
built, the same source compiled by Cython (as ``loopwatch._crequest``, typed by
``_request.pxd``) runs instead (:mod:`._accel`); the suite runs on both.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from bisect import bisect_left
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ._attribution import current_owner
from ._waiting import running_wait
from ._routes import RouteIndex, method_label
from ._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    import weakref

    from ._monitor import Monitor

__all__ = ["RAW_LIMIT", "RequestOwner", "RequestPath", "Totals", "finish", "keep_raw", "new_owner",
           "release_owner"]

_clock = time.perf_counter
_running_loop = asyncio.get_running_loop
_set_owner = current_owner.set
_reset_owner = current_owner.reset

#: Requests kept for an exporter between two drains (:func:`keep_raw`), at most, per totals.
RAW_LIMIT = 100_000

#: (endpoint, totals, method label, route label), by (raw method, id(endpoint)).
Cache = dict[tuple[str, int], tuple[Any, Any, str, str]]


class RequestPath:
    """The base of :class:`~loopwatch.LoopWatchMiddleware`: its ASGI ``__call__``, which
    measures each HTTP request and hands everything else to the middleware
    (``_not_http``); the middleware starts the monitor (``_start``) and records a request
    the cache did not know (``_record_first``)."""

    __slots__ = ("__dict__", "__weakref__", "_config_error", "_excluded_prefixes", "_fast",
                 "_in_flight", "_loop", "_routes", "_shedding", "app", "exclude_paths",
                 "monitor")
    app: ASGIApp
    monitor: Monitor | None
    _loop: weakref.ref[asyncio.AbstractEventLoop] | None
    _config_error: Exception | None
    _routes: RouteIndex
    _in_flight: set[RequestOwner]
    _fast: Cache
    exclude_paths: frozenset[str]
    _excluded_prefixes: tuple[str, ...]
    #: Whether new requests are shed (the middleware's admission=, see _admission).
    _shedding: bool

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app (the middleware's ``__call__``)."""
        if scope["type"] != "http" or self._config_error is not None:
            await self._not_http(scope, receive, send)  # type: ignore[attr-defined]
            return
        loop = self._loop
        monitor = self.monitor
        if loop is None or loop() is not _running_loop() or not monitor.active:  # type: ignore[union-attr]
            # First request without lifespan, or the app now runs on another loop (a new
            # server of the same app object, as test suites do).
            self._routes.enter(scope)
            self._start()  # type: ignore[attr-defined]
        path = scope.get("path")
        if type(path) is str and (
                path in self.exclude_paths or path.startswith(self._excluded_prefixes)):
            await self.app(scope, receive, send)
            return
        if self._shedding and await self._shed(scope, send):  # type: ignore[attr-defined]
            return
        owner = new_owner(scope, self._routes, send)
        token = _set_owner(owner)
        in_flight = self._in_flight
        in_flight.add(owner)
        start = _clock()
        try:
            await self.app(scope, receive, owner)  # the owner is the request's send
        except BaseException:
            if not owner.status:
                owner.status = 500
            raise
        finally:
            in_flight.discard(owner)
            try:
                missed = finish(owner, self.monitor, start, self._fast, scope)
                if missed is not None:  # the first request of its (method, endpoint)
                    self._record_first(owner, scope, missed)  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - never break the app we watch
                self._internal_error("recording a request")  # type: ignore[attr-defined]
            try:
                _reset_owner(token)
            except ValueError:  # the coroutine was closed from another context
                self._internal_error("recording a request")  # type: ignore[attr-defined]


class RequestOwner:
    """The loop time of one request (an owner, as :class:`~loopwatch.Owner` is); its route
    is read from the scope once routed."""

    __slots__ = ("__weakref__", "busy", "delayed", "ended", "last_end", "method",
                 "others_mark", "route", "routes", "scope", "server_send", "status",
                 "timer_end")
    busy: float
    delayed: float
    last_end: float
    others_mark: float
    method: str | None
    route: str | None
    scope: Scope
    routes: RouteIndex
    server_send: Send
    status: int
    ended: float
    timer_end: float

    def labels(self) -> tuple[str | None, str | None]:
        """(method, route) for block events and the in-progress gauge."""
        if self.route is not None:  # labelled when it finished
            return self.method, self.route
        return method_label(self.scope.get("method")), self.routes.label(self.scope)[0]

    def __call__(self, message: Message) -> Awaitable[None]:
        """The request's ASGI send: notes the status and when the last body went, and
        returns the server's awaitable (no coroutine of our own per message)."""
        send = self.server_send
        if send is None:
            raise RuntimeError("ASGI send called after the application returned (loopwatch "
                               "has released the request)")
        if type(message) is dict:
            _is_last(self, message)
        return send(message)

    def release(self, method: str, route: str) -> None:
        """Keep the labels, let go of the request (see :func:`release_owner`)."""
        release_owner(self, method, route)

    def __repr__(self) -> str:
        return (f"<RequestOwner {self.method} {self.route} busy={self.busy:.6f} "
                f"delayed={self.delayed:.6f}>")


def _is_last(owner: RequestOwner, message: dict[str, Any]) -> bool:
    """Whether ``message`` is the response's last body (noting when it went); the status of
    a response's start.

    The server's send of the last body runs with the request in the context, as all of the
    request's code does: what the server schedules there copies it (uvicorn's keep-alive
    timer; the next request of a pipelined connection, whose task starts there). Those
    callbacks are charged to the request after it was recorded (counted nowhere), and a block
    in them would name its route; the owner they keep alive holds only its two labels (the
    request is released when it ends), a couple per connection at most."""
    kind = message.get("type")
    if kind == "http.response.start":
        status = message.get("status")
        owner.status = status if type(status) is int else 0
        return False
    if kind == "http.response.body" and not message.get("more_body", False):
        owner.ended = _clock()
        return True
    return False


def new_owner(scope: Scope, routes: RouteIndex, send: Send) -> RequestOwner:
    """A request's owner, in the state a request starts in."""
    owner = RequestOwner.__new__(RequestOwner)
    owner.busy = 0.0
    owner.delayed = 0.0
    owner.last_end = 0.0
    owner.others_mark = 0.0
    owner.scope = scope
    owner.routes = routes
    owner.server_send = send
    owner.status = 0
    owner.ended = 0.0
    owner.timer_end = 0.0
    owner.method = None
    owner.route = None
    return owner


def release_owner(owner: RequestOwner, method: str, route: str) -> None:
    """Keep the labels, let go of the request: contexts copied during the request keep
    the owner alive for seconds, and with it, had it kept them, the scope and the server's
    send."""
    owner.method = method
    owner.route = route
    owner.scope = None  # type: ignore[assignment]
    owner.server_send = None  # type: ignore[assignment]
    owner.routes = None  # type: ignore[assignment]


def finish(owner: RequestOwner, monitor: Monitor | None, start: float, cache: Cache,
           scope: Scope) -> tuple[int, float, float, float] | None:
    """A request's last moment, in its last step: its status, duration, loop time and delay
    from others, added to the totals ``cache`` holds for its (method, endpoint). None when
    recorded; else (status, duration, blocking, delayed), for the caller to record."""
    now = _clock()
    blocking = owner.busy
    delayed = owner.delayed
    if monitor is not None:
        # Charge the step still running too (a handler that blocks and returns without
        # another await would otherwise be charged nothing; nor would background tasks run
        # after the body was sent, in the same step), and remember the owner: should the
        # step turn out to be a block, its event names the request.
        step_start = monitor.step_start
        if step_start:
            monitor._closing = (step_start, owner)
            blocking += now - step_start
            delayed += running_wait(monitor, owner, step_start)
    status = owner.status or 500
    ended = owner.ended
    duration = (ended if ended else now) - start
    # Only requests that went through no mount: a mounted request's label depends on where
    # it went, not on its endpoint alone (RouteIndex.label).
    # A scope that is no dict (ASGI says it is one) is recorded by the caller.
    if type(scope) is dict:
        fields = scope  # a dict: looked up as one where compiled
        if not fields.get("root_path"):
            endpoint = fields.get("endpoint")
            entry = cache.get((fields.get("method"), id(endpoint)))  # type: ignore[arg-type]
            if entry is not None and entry[0] is endpoint:
                totals = entry[1]
                totals.add(status, duration, blocking, delayed)
                if totals.raw is not None:  # exported through OpenTelemetry too
                    keep_raw(totals, status, duration, blocking, delayed, fields.get("scheme"))
                release_owner(owner, entry[2], entry[3])
                return None
    return status, duration, blocking, delayed


def keep_raw(totals: Totals, status: int, duration: float, blocking: float, delayed: float,
             scheme: Any) -> None:
    """Keep one request's values for an exporter that takes each observation (OpenTelemetry,
    :mod:`._otel`), which drains ``totals.raw`` at every probe; at most ``RAW_LIMIT`` wait."""
    raw = totals.raw
    if raw is not None and len(raw) < RAW_LIMIT:
        raw.append((status, duration, blocking, delayed, scheme))


class Totals:
    """The running totals of one (method, route), written by one loop thread: bucket counts
    and sums of durations, blocking times and delays from others (the last two share their
    bounds), counts by status; and, while an exporter takes each observation, the requests
    since its last drain (``raw``, else None)."""

    __slots__ = ("_blocking", "_delayed", "_duration", "blocking_bounds", "blocking_counts",
                 "blocking_first", "blocking_sum", "count", "delayed_counts", "delayed_sum",
                 "duration_bounds", "duration_counts", "duration_first", "duration_sum", "raw",
                 "statuses")
    duration_bounds: tuple[float, ...]
    blocking_bounds: tuple[float, ...]
    #: The first bounds, where most requests land (a C double where compiled).
    duration_first: float
    blocking_first: float
    #: The bucket counts: arrays of 64-bit integers (written in place where compiled)...
    duration_counts: Any
    blocking_counts: Any
    delayed_counts: Any
    #: ... and the same arrays as Python objects, for snapshot().
    _duration: array[int]
    _blocking: array[int]
    _delayed: array[int]
    duration_sum: float
    blocking_sum: float
    delayed_sum: float
    statuses: dict[int, int]
    count: int
    #: (status, duration, blocking, delayed, scheme) of each request since the last drain.
    raw: list[tuple[int, float, float, float, Any]] | None

    def __init__(self, duration_bounds: tuple[float, ...],
                 blocking_bounds: tuple[float, ...]) -> None:
        self.duration_bounds = tuple(duration_bounds)
        self.blocking_bounds = tuple(blocking_bounds)
        self.duration_first = self.duration_bounds[0]
        self.blocking_first = self.blocking_bounds[0]
        self._duration = array("q", bytes(8 * (len(self.duration_bounds) + 1)))
        self._blocking = array("q", bytes(8 * (len(self.blocking_bounds) + 1)))
        self._delayed = array("q", bytes(8 * (len(self.blocking_bounds) + 1)))
        self.duration_counts = self._duration
        self.blocking_counts = self._blocking
        self.delayed_counts = self._delayed
        self.duration_sum = 0.0
        self.blocking_sum = 0.0
        self.delayed_sum = 0.0
        self.statuses = {}
        self.count = 0
        self.raw = None

    def add(self, status: int, duration: float, blocking: float, delayed: float) -> None:
        """Record one finished request (most land in the first buckets)."""
        i = 0 if duration <= self.duration_first else bisect_left(self.duration_bounds, duration)
        self.duration_counts[i] += 1
        self.duration_sum += duration
        i = 0 if blocking <= self.blocking_first else bisect_left(self.blocking_bounds, blocking)
        self.blocking_counts[i] += 1
        self.blocking_sum += blocking
        i = 0 if delayed <= self.blocking_first else bisect_left(self.blocking_bounds, delayed)
        self.delayed_counts[i] += 1
        self.delayed_sum += delayed
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.count += 1

    def snapshot(self) -> tuple[list[int], list[int], list[int], float, float, float,
                                dict[int, int], int]:
        """(duration, blocking and delay counts; their three sums; statuses; count).

        Read from another thread while the loop adds: each part is consistent in itself, and
        what one fold misses of another part the next fold hands over."""
        return (self._duration.tolist(), self._blocking.tolist(), self._delayed.tolist(),
                self.duration_sum, self.blocking_sum, self.delayed_sum, self.statuses.copy(),
                self.count)
