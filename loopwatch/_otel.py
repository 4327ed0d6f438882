"""OpenTelemetry metrics: loopwatch's measurements through an OpenTelemetry ``MeterProvider``.

Used when a ``meter_provider`` is given to :class:`~loopwatch.LoopWatchMiddleware` or
:class:`~loopwatch.Monitor` (``pip install "loopwatch[otel]"``); the only module that imports
``opentelemetry``, and only then. The same measurements as the Prometheus metrics
(:mod:`._metrics`), under OpenTelemetry's names, units and attributes:

==========================================  =====================  ===========================
instrument                                  kind, unit             attributes
==========================================  =====================  ===========================
``loopwatch.event_loop.lag``                histogram, s           --
``loopwatch.event_loop.busy``               counter, s             --
``loopwatch.event_loop.block.duration``     histogram, s           the request's (below)
``loopwatch.request.blocking``              histogram, s           method, route
``loopwatch.request.delayed``               histogram, s           method, route
``http.server.request.duration``            histogram, s           method, route, status,
                                                                   scheme, ``error.type``
``http.server.active_requests``             up-down counter        method, scheme
``loopwatch.threadpool.threads.busy``       gauge, {thread}        --
``loopwatch.threadpool.threads.limit``      gauge, {thread}        --
``loopwatch.threadpool.tasks.waiting``      gauge, {task}          --
``loopwatch.internal_errors``               counter, {error}       --
==========================================  =====================  ===========================

Attributes follow the HTTP semantic conventions: ``http.request.method`` (``_OTHER`` for a
method a client invented), ``http.route`` (the template; left out when no route matched),
``http.response.status_code``, ``url.scheme`` and ``error.type`` (the status, for a 5xx). A
block outside any request has no attributes; one charged to a :class:`~loopwatch.Owner` of
another kind, to the collector (``<gc>``) or to a pause of the process (``<paused>``) has
``loopwatch.owner`` (and ``loopwatch.owner.kind``). All are bounded as the Prometheus labels
are. Histograms advise loopwatch's bucket bounds (a View of the application's may override
them).

The OpenTelemetry SDK takes one observation per ``record()`` call (about 7 µs each), and has
no way to hand it pre-aggregated buckets. So requests are not recorded on their own path: the
request path keeps each request's values (``Totals.raw``, a tuple appended), and every probe
of the monitor (at most 75 ms apart) records them in one batch, on the loop, off any
request's path; the cost per request is in docs/performance.md.
"""

from __future__ import annotations

import logging
from typing import Any

from ._events import BlockEvent
from ._metrics import BLOCK_BUCKETS, BLOCKING_BUCKETS, HTTP_BUCKETS, LAG_BUCKETS, RequestSeries
from ._routes import OTHER_METHOD, UNMATCHED

__all__ = ["OtelMetrics"]

logger = logging.getLogger("loopwatch")

_HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", OTHER_METHOD}
)

#: The schemes an ASGI server reports (a proxy header may claim anything else: left out).
_SCHEMES = frozenset({"http", "https"})

Attributes = dict[str, Any]


class OtelMetrics:
    """loopwatch's instruments on one meter of ``meter_provider``: a monitor sink, and the
    exporter of the request series it is given (:meth:`attach`)."""

    def __init__(self, meter_provider: Any) -> None:
        try:
            from opentelemetry.metrics import Observation
        except ImportError as exc:
            raise ImportError(
                'loopwatch: meter_provider= needs OpenTelemetry; install it with '
                'pip install "loopwatch[otel]"'
            ) from exc
        if not callable(getattr(meter_provider, "get_meter", None)):
            raise TypeError(
                f"loopwatch: invalid meter_provider={meter_provider!r}; allowed: an "
                "OpenTelemetry MeterProvider (opentelemetry.sdk.metrics.MeterProvider)"
            )
        from . import __version__

        self._observation = Observation
        meter = meter_provider.get_meter("loopwatch", __version__)
        self.lag = meter.create_histogram(
            "loopwatch.event_loop.lag", unit="s",
            description="How late the event loop ran a probe callback that was due.",
            explicit_bucket_boundaries_advisory=LAG_BUCKETS,
        )
        self.busy = meter.create_counter(
            "loopwatch.event_loop.busy", unit="s",
            description="Time the event loop spent running callbacks and task steps.",
        )
        self.blocks = meter.create_histogram(
            "loopwatch.event_loop.block.duration", unit="s",
            description="Duration of each block: one callback or task step holding the loop "
                        "longer than the threshold.",
            explicit_bucket_boundaries_advisory=BLOCK_BUCKETS,
        )
        self.request_blocking = meter.create_histogram(
            "loopwatch.request.blocking", unit="s",
            description="Event-loop time held by each request's own code.",
            explicit_bucket_boundaries_advisory=BLOCKING_BUCKETS,
        )
        self.request_delayed = meter.create_histogram(
            "loopwatch.request.delayed", unit="s",
            description="Time each request's own steps were ready to run but other code "
                        "held the event loop, until its response was sent.",
            explicit_bucket_boundaries_advisory=BLOCKING_BUCKETS,
        )
        self.request_duration = meter.create_histogram(
            "http.server.request.duration", unit="s",
            description="Duration of HTTP server requests.",
            explicit_bucket_boundaries_advisory=HTTP_BUCKETS,
        )
        self.internal_errors = meter.create_counter(
            "loopwatch.internal_errors", unit="{error}",
            description="Failures inside loopwatch (each caught; the application was not "
                        "affected).",
        )
        self.internal_errors.add(0)  # exported from the start, as 0, for alerts on increase
        meter.create_observable_up_down_counter(
            "http.server.active_requests", callbacks=[self._observe_active], unit="{request}",
            description="Number of active HTTP server requests.",
        )
        for name, index, unit, description in (
            ("loopwatch.threadpool.threads.busy", 0, "{thread}",
             "Threads of the default AnyIO thread pool in use."),
            ("loopwatch.threadpool.threads.limit", 1, "{thread}",
             "Size of the default AnyIO thread pool."),
            ("loopwatch.threadpool.tasks.waiting", 2, "{task}",
             "Tasks waiting for a thread of the default AnyIO thread pool."),
        ):
            meter.create_observable_gauge(
                name, callbacks=[self._threadpool_callback(index)], unit=unit,
                description=description,
            )
        #: The request series exported: (series, requests drained so far).
        self._series: list[list[Any]] = []
        self._request_attributes: dict[tuple[str, str, int, Any], tuple[Attributes,
                                                                         Attributes]] = {}
        self._block_attributes: dict[tuple[str | None, str | None], Attributes] = {}
        #: Active requests by (method, scheme) as of the last tick; every key ever seen (an
        #: up-down counter's series goes back to 0, it does not vanish).
        self._active: dict[tuple[str, Any], int] = {}
        #: (busy, limit, waiting) of the thread pool as of the last tick, if there is one.
        self._threadpool: tuple[float, float, int] | None = None
        self._lost_logged = False

    # -- monitor sink (loop thread) ---------------------------------------------------------

    def on_probe(self, lag: float, busy_delta: float) -> None:
        self.lag.record(lag)
        if busy_delta > 0.0:
            self.busy.add(busy_delta)
        self.drain()

    def on_block(self, event: BlockEvent) -> None:
        key = (event.method, event.route)
        attributes = self._block_attributes.get(key)
        if attributes is None:
            attributes = self._block_attributes[key] = _owner_attributes(*key)
        self.blocks.record(event.duration, attributes)

    def on_internal_error(self) -> None:
        self.internal_errors.add(1)

    # -- requests -----------------------------------------------------------------------------

    def attach(self, series: RequestSeries) -> None:
        """Export the requests of ``series`` from now on (its totals keep each request)."""
        series.totals.raw = []
        self._series = [*self._series, [series, series.count]]

    def detach(self, series: list[RequestSeries]) -> None:
        """Record what ``series`` kept since the last drain, and stop exporting them."""
        self.drain()
        gone = {id(s) for s in series}
        for one in series:
            one.totals.raw = None
        self._series = [entry for entry in self._series if id(entry[0]) not in gone]

    def drain(self) -> None:
        """Record the requests the series kept since the last drain (on the loop thread, where
        they are added)."""
        for entry in self._series:
            series, seen = entry
            totals = series.totals
            raw = totals.raw
            count = totals.count
            if count == seen:
                continue
            totals.raw = []
            entry[1] = count
            if raw is None:
                continue
            lost = count - seen - len(raw)
            if lost > 0:
                self._lost(lost)
            record_duration = self.request_duration.record
            record_blocking = self.request_blocking.record
            record_delayed = self.request_delayed.record
            method, route = series.method, series.route
            cache = self._request_attributes
            for status, duration, blocking, delayed, scheme in raw:
                key = (method, route, status, scheme if scheme in _SCHEMES else None)
                pair = cache.get(key)
                if pair is None:
                    pair = cache[key] = _request_attributes(*key)
                    self._note_active_key((method, key[3]))
                record_duration(duration, pair[0])
                record_blocking(blocking, pair[1])
                record_delayed(delayed, pair[1])

    def _lost(self, n: int) -> None:
        """Requests counted but not kept: more than RAW_LIMIT between two drains (no probe
        ran: the monitor did not start). In the Prometheus metrics, not here."""
        self.internal_errors.add(n)
        if not self._lost_logged:
            self._lost_logged = True
            logger.warning("loopwatch: %d request(s) not exported through OpenTelemetry (no "
                           "monitor probe drained them in time); further ones are counted in "
                           "loopwatch.internal_errors", n)

    def set_in_progress(self, owners: Any) -> None:
        """Note the requests in flight (once a second, on the loop thread)."""
        counts = dict.fromkeys(self._active, 0)
        for owner in owners:
            scope = owner.scope
            if scope is None:
                continue
            method = owner.labels()[0] or OTHER_METHOD
            scheme = scope.get("scheme")
            key = (method, scheme if scheme in _SCHEMES else None)
            counts[key] = counts.get(key, 0) + 1
        self._active = counts

    def _note_active_key(self, key: tuple[str, Any]) -> None:
        """Export the active requests of a (method, scheme) once one was served (as 0 while
        none is in flight). Copied on write: the reader's thread iterates the dict."""
        if key not in self._active:
            self._active = {**self._active, key: 0}

    def set_threadpool(self, busy: float, limit: float, waiting: int) -> None:
        self._threadpool = (busy, limit, waiting)

    # -- observable instruments (the reader's thread) -------------------------------------

    def _observe_active(self, options: Any) -> list[Any]:
        observation = self._observation
        return [observation(n, _active_attributes(method, scheme))
                for (method, scheme), n in self._active.items()]

    def _threadpool_callback(self, index: int) -> Any:
        def observe(options: Any) -> list[Any]:
            values = self._threadpool
            return [] if values is None else [self._observation(values[index])]

        return observe


def _request_attributes(method: str, route: str, status: int,
                        scheme: Any) -> tuple[Attributes, Attributes]:
    """(attributes of the duration, of the blocking time) of a request's labels."""
    blocking: Attributes = {"http.request.method": method}
    if route != UNMATCHED:
        blocking["http.route"] = route
    duration = {**blocking, "http.response.status_code": status}
    if scheme in _SCHEMES:
        duration["url.scheme"] = scheme
    if status >= 500:
        duration["error.type"] = str(status)
    return duration, blocking


def _active_attributes(method: str, scheme: Any) -> Attributes:
    attributes: Attributes = {"http.request.method": method}
    if scheme in _SCHEMES:
        attributes["url.scheme"] = scheme
    return attributes


def _owner_attributes(method: str | None, route: str | None) -> Attributes:
    """A block's attributes: the request's, or the owner it was charged to."""
    if route is None:
        return {}
    if method in _HTTP_METHODS:
        if route == UNMATCHED:
            return {"http.request.method": method}
        return {"http.request.method": method, "http.route": route}
    attributes: Attributes = {"loopwatch.owner": route}
    if method is not None:
        attributes["loopwatch.owner.kind"] = method
    return attributes
