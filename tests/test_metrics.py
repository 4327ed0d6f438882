"""The batched request metrics: running totals per (method, route), folded into Prometheus."""

from __future__ import annotations

import random
import threading

from prometheus_client import CollectorRegistry, Histogram

from loopwatch._metrics import BLOCKING_BUCKETS, HTTP_BUCKETS, metrics_for


def _histogram(registry: CollectorRegistry, name: str, **labels: str) -> dict[str, float]:
    out = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name.startswith(name) and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.name.removeprefix(name) + s.labels.get("le", "")] = s.value
    return out


def test_folded_totals_equal_observing_every_request() -> None:
    """Bucket counts (values on a bound included), sums and status counts are what
    prometheus_client's own observe()/inc() would have made of the same requests."""
    rng = random.Random(7)
    values = [(rng.choice([200, 200, 404, 500]),
               rng.choice([*HTTP_BUCKETS, rng.uniform(0, 12), rng.expovariate(200)]),
               rng.choice([*BLOCKING_BUCKETS, rng.uniform(0, 1e-3), rng.uniform(0, 12)]),
               rng.choice([0.0, *BLOCKING_BUCKETS, rng.uniform(0, 1e-3), rng.uniform(0, 12)]))
              for _ in range(5_000)]
    registry = CollectorRegistry()
    metrics = metrics_for(registry)
    series = metrics.new_series("GET", "/x")
    reference = CollectorRegistry()
    ref_duration = Histogram("loopwatch_request_duration_seconds", "", buckets=HTTP_BUCKETS,
                             registry=reference)
    ref_blocking = Histogram("loopwatch_request_blocking_seconds", "",
                             buckets=BLOCKING_BUCKETS, registry=reference)
    ref_delayed = Histogram("loopwatch_request_delayed_seconds", "",
                            buckets=BLOCKING_BUCKETS, registry=reference)
    statuses: dict[int, int] = {}
    for i, (status, duration, blocking, delayed) in enumerate(values):
        series.add(status, duration, blocking, delayed)
        ref_duration.observe(duration)
        ref_blocking.observe(blocking)
        ref_delayed.observe(delayed)
        statuses[status] = statuses.get(status, 0) + 1
        if i % 997 == 0:
            metrics.flush()  # folds in several batches, each only what it had not folded
    assert metrics.pending > 0
    metrics.flush()
    assert metrics.pending == 0
    for name in ("loopwatch_request_duration_seconds", "loopwatch_request_blocking_seconds",
                 "loopwatch_request_delayed_seconds"):
        got = _histogram(registry, name, method="GET", route="/x")
        want = _histogram(reference, name)
        assert got.keys() == want.keys()
        for key in got:
            assert abs(got[key] - want[key]) <= 1e-9 * max(1.0, abs(want[key])), (name, key)
    for status, n in statuses.items():
        assert registry.get_sample_value(
            "loopwatch_requests_total", {"method": "GET", "route": "/x", "status": str(status)}
        ) == n


def test_a_flush_in_another_thread_loses_nothing() -> None:
    """The loop thread adds while a scrape's thread flushes: every request is counted once."""
    registry = CollectorRegistry()
    metrics = metrics_for(registry)
    series = [metrics.new_series("GET", f"/r{i}") for i in range(3)]
    stop = threading.Event()
    flushes = 0

    def flusher() -> None:
        nonlocal flushes
        while not stop.is_set():
            metrics.flush()
            flushes += 1

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for i in range(150_000):
            series[i % 3].add(200 + (i % 2), 0.001, 0.0001, 0.0)
    finally:
        stop.set()
        thread.join()
    metrics.flush()
    assert flushes > 10
    for i in range(3):
        labels = {"method": "GET", "route": f"/r{i}"}
        assert registry.get_sample_value(
            "loopwatch_request_duration_seconds_count", labels) == 50_000
        assert registry.get_sample_value(
            "loopwatch_request_blocking_seconds_count", labels) == 50_000
        ok = registry.get_sample_value("loopwatch_requests_total", {**labels, "status": "200"})
        other = registry.get_sample_value("loopwatch_requests_total", {**labels, "status": "201"})
        assert ok is not None and other is not None and ok + other == 50_000
        total = registry.get_sample_value("loopwatch_request_duration_seconds_sum", labels)
        assert total is not None and abs(total - 50.0) < 1e-6
