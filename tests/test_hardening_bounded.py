"""Bounded: 100,000 requests with random paths and methods add no time series, every map
inside loopwatch stays bounded, and memory stays flat.

The requests are driven in-process (ASGI calls, no sockets) through the real middleware on a
running event loop with its monitor, so that 100,000 of them take seconds. The probe, the
once-a-second tick and the flushes into Prometheus all run as in a server.
"""

from __future__ import annotations

import asyncio
import gc
import random
import string
import time
import tracemalloc
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch._metrics import metrics_for
from harness.asgi import Lifespan
from tests.apps import hardening_app
from tests.conftest import run_on

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
#: The route labels the plain app can produce (see hardening_app.build_plain).
ROUTES = {"/", "/users/{user_id:int}", "/items/{name}", "/api/v1/things/{thing_id}",
          "/api/v1/{path}", "/raw/{path}", "<unmatched>"}


def _segment(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.6:
        return "".join(rng.choices(string.ascii_letters + string.digits, k=rng.randint(1, 12)))
    if kind < 0.7:
        return "%" + rng.choice(["20", "2F", "00", "C3%A9", "ZZ"])
    if kind < 0.8:
        return rng.choice(["..", ".", "", "~", "%", "?", "#"])
    if kind < 0.9:
        return "".join(chr(rng.randint(0x80, 0x2FFF)) for _ in range(rng.randint(1, 4)))
    return "x" * rng.randint(100, 2000)


def random_request(rng: random.Random) -> tuple[str, str]:
    roll = rng.random()
    if roll < 0.08:
        method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(1, 10)))
    elif roll < 0.1:
        method = rng.choice(["get", "M-SEARCH", "PROPFIND", "BREW", ""])
    else:
        method = rng.choice(METHODS)
    kind = rng.random()
    if kind < 0.15:
        path = f"/users/{rng.randint(-10**6, 10**12)}"
    elif kind < 0.25:
        path = f"/users/{_segment(rng)}"
    elif kind < 0.4:
        path = f"/items/{_segment(rng)}"
    elif kind < 0.5:
        path = f"/api/v1/things/{_segment(rng)}"
    elif kind < 0.55:
        path = f"/api/v1/{_segment(rng)}/{_segment(rng)}"
    elif kind < 0.6:
        path = f"/raw/{_segment(rng)}"
    elif kind < 0.65:
        path = "/"
    else:
        path = "/" + "/".join(_segment(rng) for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.1:
            path += "/"
    return method, path


class Driver:
    """Calls an ASGI app in-process like a server would."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.statuses: dict[int, int] = {}

    async def request(self, method: str, path: str) -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1", "method": method, "scheme": "http", "path": path,
            "raw_path": path.encode("utf-8", "surrogateescape"),
            "query_string": b"secret=1", "root_path": "",
            "headers": [(b"host", b"testserver"), (b"cookie", b"session=abc")],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80), "state": {},
        }
        status = 0
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        try:
            await self.app(scope, receive, send)
        except Exception:  # noqa: BLE001 - an app error is a 500, as a server would answer
            status = status or 500
        self.statuses[status] = self.statuses.get(status, 0) + 1
        return status


def series(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    metrics_for(registry).flush()
    return {(s.name, tuple(sorted(s.labels.items())))
            for family in registry.collect() for s in family.samples}


def label_pairs(registry: CollectorRegistry, name: str) -> set[tuple[str, str]]:
    return {(dict(labels)["method"], dict(labels)["route"])
            for metric, labels in series(registry) if metric == name}


def _objects() -> int:
    gc.collect()
    gc.collect()
    return len(gc.get_objects())


async def _drive(driver: Driver, rng: random.Random, n: int, concurrency: int = 16) -> None:
    """n random requests, ``concurrency`` at a time, with the loop free between them."""
    todo = [random_request(rng) for _ in range(n)]

    async def worker(chunk: list[tuple[str, str]]) -> None:
        for i, (method, path) in enumerate(chunk):
            await driver.request(method, path)
            if i % 50 == 0:
                await asyncio.sleep(0)  # let the probe and the tick run

    size = -(-n // concurrency)
    await asyncio.gather(*(worker(todo[i:i + size]) for i in range(0, n, size)))


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_100k_random_requests_add_no_series_and_leave_every_map_bounded(loop_kind: str) -> None:
    registry = CollectorRegistry()
    # A block threshold no request reaches: block histograms are tested below; here every
    # series comes from requests.
    app = hardening_app.build_plain(registry, block_threshold=30, log_blocks=False)
    driver = Driver(app)
    rng = random.Random(20240611)
    metrics = metrics_for(registry)
    measured: dict[str, Any] = {}

    async def main() -> None:
        async with Lifespan(app):
            monitor = loopwatch.get_monitor()
            assert monitor is not None and app.monitor is monitor
            # Warm-up: every method on every route kind, so that every label combination the
            # app can produce exists before the count (the random phase only repeats them).
            for method in [*METHODS, "PROPFIND"]:
                for path in ["/", "/users/1", "/users/x", "/items/a", "/api/v1/things/1",
                             "/api/v1/nothing", "/raw/x", "/nowhere", "/items/a/"]:
                    await driver.request(method, path)
            await _drive(driver, rng, 10_000)
            await asyncio.sleep(1.1)  # one tick: the in-progress gauge has been published
            measured["series_10k"] = series(registry)
            measured["objects_10k"] = _objects()
            started = time.perf_counter()
            await _drive(driver, rng, 90_000)
            measured["seconds_90k"] = time.perf_counter() - started
            await asyncio.sleep(1.1)
            measured["series_100k"] = series(registry)
            measured["objects_100k"] = _objects()
            measured["lag_count"] = monitor.lag_count
            measured["in_flight"] = len(app._in_flight)
            measured["pending"] = metrics.pending
            measured["internal_errors"] = monitor.internal_errors
            measured["by_label"] = len(app._by_label)
            measured["fast"] = len(app._fast)

    run_on(loop_kind, main())

    total = sum(driver.statuses.values())
    assert total == 100_000 + 10 * 9
    assert set(driver.statuses) <= {200, 201, 404, 405, 307}, driver.statuses
    # Not one new series in the last 90,000 requests. (The in-progress gauge gets a series
    # for a (method, route) only once a tick sees such a request in flight, so its set grows
    # by chance within the same bounded label set: checked below.)
    added = {s for s in measured["series_100k"] - measured["series_10k"]
             if s[0] != "loopwatch_requests_in_progress"}
    assert not added, sorted(added)[:10]
    # Every label is bounded: a route template (never a raw path) and a known method.
    requests_total = series(registry)
    for _, labels in requests_total:
        label = dict(labels)
        if "route" in label:
            assert label["route"] in ROUTES, label
        if "method" in label:
            assert label["method"] in {*METHODS, "_OTHER"}, label
    in_progress = label_pairs(registry, "loopwatch_requests_in_progress")
    counted = label_pairs(registry, "loopwatch_requests_total")
    assert in_progress <= counted
    assert len(counted) <= len(ROUTES) * 10
    # The internal maps.
    # The route index: one entry per endpoint of the app, whatever the paths requested.
    assert sum(map(len, app._routes._index.by_endpoint.values())) <= len(ROUTES)
    assert len(metrics._request_children) == len(counted)
    assert len(metrics._count_children) <= len(counted) * 5
    assert metrics._in_progress_keys <= counted
    assert not metrics._block_children
    assert measured["in_flight"] == 0  # the middleware's in-flight set is empty again
    # The middleware's request totals: one per label pair; its cache, one per route object
    # and standard method (invented methods are never cached). Both are let go when the app
    # stops, with the series the metrics no longer flush.
    assert measured["by_label"] == len(counted)
    assert measured["fast"] <= len(counted)
    assert not app._by_label and not app._fast and not metrics._series
    assert measured["pending"] < 5_000  # flushed by the probe while requests ran
    assert measured["internal_errors"] == 0
    assert measured["lag_count"] > 10  # the monitor really ran alongside
    # Memory: the objects alive after 100,000 requests are those alive after 10,000.
    growth = measured["objects_100k"] - measured["objects_10k"]
    assert growth < 2_000, (growth, measured["objects_10k"])


def test_memory_is_flat_over_20k_requests() -> None:
    """tracemalloc over 20,000 requests after a warm-up: no allocation site keeps growing."""
    registry = CollectorRegistry()
    app = hardening_app.build_plain(registry, block_threshold=30, log_blocks=False)
    driver = Driver(app)
    rng = random.Random(7)
    out: dict[str, Any] = {}

    async def main() -> None:
        async with Lifespan(app):
            await _drive(driver, rng, 5_000)
            metrics_for(registry).flush()
            gc.collect()
            tracemalloc.start(1)
            try:
                before = tracemalloc.take_snapshot()
                await _drive(driver, rng, 20_000)
                metrics_for(registry).flush()
                gc.collect()
                after = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            out["diff"] = after.compare_to(before, "lineno")

    asyncio.run(main())
    grown = [d for d in out["diff"] if d.size_diff > 0]
    total = sum(d.size_diff for d in out["diff"])
    loopwatch_sites = [d for d in grown if "loopwatch" in str(d.traceback)
                       and d.size_diff > 16_384]
    # 20,000 requests; a leak of even 10 bytes per request would be 200 kB.
    assert total < 150_000, [str(d) for d in grown[:10]]
    assert not loopwatch_sites, [str(d) for d in loopwatch_sites]


def test_block_histograms_and_the_event_ring_stay_bounded() -> None:
    """Many blocks on a few routes: one histogram child per (method, route), a ring of
    ring_size events, every block counted."""
    registry = CollectorRegistry()
    app = hardening_app.build_plain(registry, block_threshold=0.02, probe_interval=0.005,
                                    ring_size=8, log_blocks=False)
    driver = Driver(app)
    blocked: list[str] = []

    async def blocking_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/items/"):
            time.sleep(0.03)  # blocks the loop inside the request (the route is matched)
            blocked.append(scope["path"])
        await inner(scope, receive, send)

    inner = app.app
    app.app = blocking_app
    out: dict[str, Any] = {}

    async def main() -> None:
        async with Lifespan(app):
            for i in range(40):
                await driver.request(random.Random(i).choice(["GET", "PUT", "POST", "FOO"]),
                                     f"/items/{i}")
                await asyncio.sleep(0.002)
            monitor = loopwatch.get_monitor()
            assert monitor is not None
            out["blocks"] = len(monitor.blocks)
            out["count"] = monitor.block_count

    asyncio.run(main())
    assert len(blocked) == 40
    assert out["blocks"] == 8
    assert out["count"] >= 40  # every block counted (a GC pause on a busy machine may add one)
    metrics = metrics_for(registry)
    # The block happened before routing: the route is unknown at that point of the step,
    # but the owner's labels are resolved when the event is emitted, after the step.
    assert len(metrics._block_children) <= 4 * 2
    block_series = label_pairs(registry, "loopwatch_event_loop_block_duration_seconds_count")
    assert {m for m, _ in block_series} <= {"GET", "PUT", "POST", "_OTHER", "<none>"}

