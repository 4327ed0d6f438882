"""The Prometheus metrics: built once per registry, label children bound once and reused.

The only module that imports prometheus_client. Metric names are a contract shared with the
dashboard, the alert rules and the docs. Everything is a counter, a histogram or a gauge
owned by this process, so prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)
works without a custom collector.

Per-request observations go into plain running totals per (method, route)
(:class:`RequestSeries`: two bisects and a few additions per request). They are folded into
the Prometheus metrics in batches — on every probe of the loop monitor (at most 75 ms apart)
and before every scrape — where each (method, route) costs a few lock operations however many
requests it had, instead of ~5 µs of ``observe()``/``inc()`` per request.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ._events import BlockEvent
from ._accel import request as _request

__all__ = ["LoopWatchMetrics", "flush_all", "metrics_for"]

#: OpenTelemetry's recommended HTTP server duration buckets.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BLOCK_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BLOCKING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)

NONE = "<none>"

_lock = threading.Lock()
_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, LoopWatchMetrics] = (
    weakref.WeakKeyDictionary()
)


def metrics_for(registry: CollectorRegistry | None = None) -> LoopWatchMetrics:
    """The metrics of ``registry`` (default: the global one), created on first use."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = _by_registry[registry] = LoopWatchMetrics(registry)
        return metrics


def flush_all() -> None:
    """Fold every registry's recorded requests into its metrics (before a scrape)."""
    with _lock:
        everything = list(_by_registry.values())
    for metrics in everything:
        metrics.flush()


class LoopWatchMetrics:
    """All loopwatch metrics of one registry, and a monitor sink that feeds them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # The registry is not kept: _by_registry's key would then never be let go.
        r = registry
        self.lag = Histogram(
            "loopwatch_event_loop_lag_seconds",
            "How late the event loop ran a probe callback that was due (every probe).",
            buckets=LAG_BUCKETS, registry=r,
        )
        self.busy = Counter(
            "loopwatch_event_loop_busy_seconds",
            "Seconds the event loop spent running callbacks and task steps; "
            "its rate is the loop's utilization.",
            registry=r,
        )
        self.blocks = Histogram(
            "loopwatch_event_loop_block_duration_seconds",
            "Duration of each block: one callback or task step holding the loop longer than "
            "the threshold.",
            ["method", "route"], buckets=BLOCK_BUCKETS, registry=r,
        )
        self.request_blocking = Histogram(
            "loopwatch_request_blocking_seconds",
            "Event-loop time held by each request's own code (its task steps, the tasks it "
            "spawned and its background tasks).",
            ["method", "route"], buckets=BLOCKING_BUCKETS, registry=r,
        )
        self.request_delayed = Histogram(
            "loopwatch_request_delayed_seconds",
            "Seconds each request's own steps were ready or due to run but waited because "
            "other code (another request, or code outside any request) held the event loop, "
            "until its response was sent.",
            ["method", "route"], buckets=BLOCKING_BUCKETS, registry=r,
        )
        self.request_duration = Histogram(
            "loopwatch_request_duration_seconds",
            "HTTP request duration, until the last byte of the response was handed to the "
            "server.",
            ["method", "route"], buckets=HTTP_BUCKETS, registry=r,
        )
        self.requests = Counter(
            "loopwatch_requests",
            "HTTP requests completed.",
            ["method", "route", "status"], registry=r,
        )
        self.in_progress = Gauge(
            "loopwatch_requests_in_progress",
            "HTTP requests in progress (refreshed every second).",
            ["method", "route"], registry=r, multiprocess_mode="livesum",
        )
        self.pool_busy = Gauge(
            "loopwatch_threadpool_threads_busy",
            "Threads of the default AnyIO thread pool (sync routes, to_thread) in use.",
            registry=r, multiprocess_mode="livesum",
        )
        self.pool_limit = Gauge(
            "loopwatch_threadpool_threads_limit",
            "Size of the default AnyIO thread pool.",
            registry=r, multiprocess_mode="livesum",
        )
        self.pool_waiting = Gauge(
            "loopwatch_threadpool_tasks_waiting",
            "Tasks waiting for a thread of the default AnyIO thread pool.",
            registry=r, multiprocess_mode="livesum",
        )
        self.requests_shed = Counter(
            "loopwatch_requests_shed",
            "HTTP requests answered 503 by loopwatch's admission (the loop was overloaded); "
            "the app never saw them.",
            ["method", "route"], registry=r,
        )
        self.shedding = Gauge(
            "loopwatch_shedding",
            "1 while loopwatch's admission sheds new requests, else 0.",
            registry=r, multiprocess_mode="max",
        )
        self.internal_errors = Counter(
            "loopwatch_internal_errors",
            "Failures inside loopwatch (each caught; the application was not affected).",
            registry=r,
        )
        self._observe_lag = self.lag.observe
        self._inc_busy = self.busy.inc
        self._request_children: dict[tuple[str, str], tuple[Any, Any, Any]] = {}
        self._count_children: dict[tuple[str, str, int], Any] = {}
        self._block_children: dict[tuple[str, str], Any] = {}
        self._in_progress_keys: set[tuple[str | None, str | None]] = set()
        #: Every middleware's running totals, folded into the metrics by flush().
        self._series: list[RequestSeries] = []
        self._flush_lock = threading.Lock()

    # -- monitor sink ---------------------------------------------------------------------

    def on_probe(self, lag: float, busy_delta: float) -> None:
        self._observe_lag(lag)
        if busy_delta > 0.0:
            self._inc_busy(busy_delta)
        self.flush()

    def on_block(self, event: BlockEvent) -> None:
        key = (event.method or NONE, event.route or NONE)
        child = self._block_children.get(key)
        if child is None:
            child = self._block_children[key] = self.blocks.labels(*key)
        child.observe(event.duration)

    def on_internal_error(self) -> None:
        self.internal_errors.inc()

    # -- requests -------------------------------------------------------------------------

    def new_series(self, method: str, route: str) -> RequestSeries:
        """Running totals for the requests of one (method, route), fed by one event loop.

        Each middleware asks for its own series (so two loops in two threads never write to
        one); :meth:`flush` folds them all into the Prometheus metrics.
        """
        key = (method, route)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.request_duration.labels(method, route),
                self.request_blocking.labels(method, route),
                self.request_delayed.labels(method, route),
            )
        series = RequestSeries(method, route, *children)
        with self._flush_lock:
            self._series = [*self._series, series]
        return series

    def retire(self, series: list[RequestSeries]) -> None:
        """Fold what ``series`` recorded since the last flush, and forget them (their
        middleware stopped, or is gone): the series a process flushes are those in use."""
        with self._flush_lock:
            gone = {id(s) for s in series}
            for one in self._series:
                if id(one) in gone and one.count != one.flushed:
                    one.flushed = one.count
                    one.fold(self._count_child)
            self._series = [s for s in self._series if id(s) not in gone]

    @property
    def pending(self) -> int:
        """Requests recorded but not yet folded into the Prometheus metrics."""
        return sum(s.count - s.flushed for s in self._series)

    def flush(self) -> None:
        """Fold what the series recorded since the last flush into the Prometheus metrics.

        Thread-safe: the loop thread only ever adds to a series' running totals, and the
        flush (on the loop at each probe, or in a scrape's thread) folds the difference to
        what it folded last time.
        """
        with self._flush_lock:
            for series in self._series:
                count = series.count
                if count == series.flushed:
                    continue
                series.flushed = count
                series.fold(self._count_child)

    def _count_child(self, method: str, route: str, status: int) -> Any:
        key = (method, route, status)
        counter = self._count_children.get(key)
        if counter is None:
            counter = self._count_children[key] = self.requests.labels(
                method, route, str(status)
            )
        return counter

    def set_in_progress(self, counts: dict[tuple[str | None, str | None], int]) -> None:
        """Publish in-flight request counts; keys no longer in flight drop to zero."""
        for key in self._in_progress_keys - counts.keys():
            self.in_progress.labels(*key).set(0)
        for key, value in counts.items():
            self.in_progress.labels(*key).set(value)
        self._in_progress_keys |= counts.keys()

    def set_threadpool(self, busy: float, limit: float, waiting: int) -> None:
        self.pool_busy.set(busy)
        self.pool_limit.set(limit)
        self.pool_waiting.set(waiting)


class RequestSeries:
    """Running totals of the requests of one (method, route), written by one loop thread.

    ``add(status, duration, blocking, delayed)`` costs a few list and float operations per
    request (instead of ~5 µs of ``observe()``/``inc()``); :meth:`fold` hands the growth since
    the last fold to the Prometheus children, one lock operation per touched bucket.
    """

    __slots__ = ("_blocking_child", "_delayed_child", "_duration_child", "_folded", "add",
                 "flushed", "method", "route", "totals")

    def __init__(self, method: str, route: str, duration_child: Any, blocking_child: Any,
                 delayed_child: Any):
        self.method = method
        self.route = route
        self._duration_child = duration_child
        self._blocking_child = blocking_child
        self._delayed_child = delayed_child
        duration_bounds = _bounds(duration_child, HTTP_BUCKETS)
        blocking_bounds = _bounds(blocking_child, BLOCKING_BUCKETS)
        if _bounds(delayed_child, BLOCKING_BUCKETS) != blocking_bounds:
            raise ValueError("the delay histogram must have the blocking histogram's buckets")
        self.totals = _request.Totals(duration_bounds, blocking_bounds)
        #: add(status, duration, blocking, delayed): record one finished request (loop
        #: thread only).
        self.add: Any = self.totals.add
        self.flushed = 0
        #: What fold() already handed over: duration, blocking and delay counts, the three
        #: sums, statuses.
        self._folded: tuple[list[int], list[int], list[int], list[float], dict[int, int]] = (
            [0] * (len(duration_bounds) + 1), [0] * (len(blocking_bounds) + 1),
            [0] * (len(blocking_bounds) + 1), [0.0, 0.0, 0.0], {},
        )

    @property
    def count(self) -> int:
        """Requests added so far."""
        return int(self.totals.count)

    def fold(self, counter_for: Any) -> None:
        """Hand what was added since the last fold to the Prometheus children."""
        done_duration, done_blocking, done_delayed, done_sums, done_statuses = self._folded
        (duration_counts, blocking_counts, delayed_counts, duration_sum, blocking_sum,
         delayed_sum, statuses, _) = self.totals.snapshot()
        _fold_histogram(self._duration_child, duration_counts, done_duration,
                        duration_sum - done_sums[0])
        done_sums[0] = duration_sum
        _fold_histogram(self._blocking_child, blocking_counts, done_blocking,
                        blocking_sum - done_sums[1])
        done_sums[1] = blocking_sum
        _fold_histogram(self._delayed_child, delayed_counts, done_delayed,
                        delayed_sum - done_sums[2])
        done_sums[2] = delayed_sum
        for status, n in statuses.items():
            grown = n - done_statuses.get(status, 0)
            if grown:
                counter_for(self.method, self.route, status).inc(grown)
                done_statuses[status] = n




def _bounds(child: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    """The finite bucket bounds of a histogram child (its +Inf bucket is the last index)."""
    bounds = getattr(child, "_upper_bounds", None)
    if bounds is None:
        return default
    return tuple(b for b in bounds if b != float("inf"))


def _fold_histogram(child: Any, counts: list[int], done: list[int], added_sum: float) -> None:
    """Add the growth of ``counts`` over ``done`` to a histogram child; ``done`` catches up.

    prometheus_client keeps a histogram child as per-bucket values (``_buckets``, made
    cumulative at scrape time) and a ``_sum``. Where that layout is not found (a future
    prometheus_client), the growth is replayed through the public ``observe``, each
    observation approximated by its bucket's upper bound (the largest finite one for +Inf).
    """
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    direct = buckets is not None and total is not None and len(buckets) == len(counts)
    bounds = getattr(child, "_upper_bounds", None)
    for i, n in enumerate(counts):
        grown = n - done[i]
        if grown:
            done[i] = n
            if direct:
                buckets[i].inc(grown)  # type: ignore[index]
            else:
                finite = [b for b in bounds or () if b != float("inf")] or [0.0]
                value = finite[min(i, len(finite) - 1)]
                for _ in range(grown):
                    child.observe(value)
    if direct and added_sum:
        total.inc(added_sum)  # type: ignore[union-attr]
