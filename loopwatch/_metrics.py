"""The Prometheus metrics: built once per registry, label children bound once and reused.

The only module that imports prometheus_client. Metric names are a contract shared with the
dashboard, the alert rules and the docs. Everything is a counter, a histogram or a gauge
owned by this process, so prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``)
works without a custom collector.

Per-request observations cost one ``deque.append`` on the request path. They are folded into
the Prometheus metrics in batches — on every probe of the loop monitor (at most 75 ms apart)
and before every scrape — where each (method, route) costs a few lock operations however many
requests it had, instead of ~5 µs of ``observe()``/``inc()`` per request.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections import deque
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ._events import BlockEvent

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
    """Fold every registry's pending request observations into its metrics (before a scrape)."""
    with _lock:
        everything = list(_by_registry.values())
    for metrics in everything:
        metrics.flush()


class LoopWatchMetrics:
    """All loopwatch metrics of one registry, and a monitor sink that feeds them."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
        self.internal_errors = Counter(
            "loopwatch_internal_errors",
            "Failures inside loopwatch (each caught; the application was not affected).",
            registry=r,
        )
        self._observe_lag = self.lag.observe
        self._inc_busy = self.busy.inc
        self._request_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._count_children: dict[tuple[str, str, int], Any] = {}
        self._block_children: dict[tuple[str, str], Any] = {}
        self._in_progress_keys: set[tuple[str | None, str | None]] = set()
        #: (method, route, status, duration, blocking) of finished requests not yet folded
        #: into the metrics; appended on the loop thread, drained by flush().
        self.pending: deque[tuple[str, str, int, float, float]] = deque()
        self._flush_lock = threading.Lock()

    # -- monitor sink ---------------------------------------------------------------------

    def on_probe(self, lag: float, busy_delta: float) -> None:
        self._observe_lag(lag)
        if busy_delta > 0.0:
            self._inc_busy(busy_delta)
        if self.pending:
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

    def observe_request(
        self, method: str, route: str, status: int, duration: float, blocking: float
    ) -> None:
        """Record one finished request (cheap: folded into the metrics on the next flush)."""
        self.pending.append((method, route, status, duration, blocking))

    def flush(self) -> None:
        """Fold pending request observations into the Prometheus metrics. Thread-safe."""
        pending = self.pending
        if not pending:
            return
        with self._flush_lock:
            per_route: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
            per_status: dict[tuple[str, str, int], int] = {}
            pop = pending.popleft
            while True:
                try:
                    method, route, status, duration, blocking = pop()
                except IndexError:
                    break
                key = (method, route)
                lists = per_route.get(key)
                if lists is None:
                    lists = per_route[key] = ([], [])
                lists[0].append(duration)
                lists[1].append(blocking)
                skey = (method, route, status)
                per_status[skey] = per_status.get(skey, 0) + 1
            for key, (durations, blockings) in per_route.items():
                children = self._request_children.get(key)
                if children is None:
                    children = self._request_children[key] = (
                        self.request_duration.labels(*key),
                        self.request_blocking.labels(*key),
                    )
                _observe_many(children[0], durations)
                _observe_many(children[1], blockings)
            for skey, n in per_status.items():
                counter = self._count_children.get(skey)
                if counter is None:
                    method, route, status = skey
                    counter = self._count_children[skey] = self.requests.labels(
                        method, route, str(status)
                    )
                counter.inc(n)

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


def _observe_many(child: Any, values: list[float]) -> None:
    """``child.observe(v) for v in values``, with one lock operation per touched bucket.

    prometheus_client keeps a histogram child as per-bucket values (``_buckets``, made
    cumulative at scrape time) and a ``_sum``; where that layout is not found, fall back to
    the public ``observe``.
    """
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(buckets) != len(bounds):
        for v in values:
            child.observe(v)
        return
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect_left(bounds, v)] += 1
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    total.inc(sum(values))
