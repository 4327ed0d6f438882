"""OpenTelemetry export: the same measurements as the Prometheus metrics, through a real SDK.

A real uvicorn server on loopback, on both loops, with ``meter_provider=`` given to the
middleware: what the SDK's in-memory reader collects must agree exactly with the Prometheus
metrics of the same requests (counts, sums, statuses, routes), carry the HTTP semantic
conventions' names, units and attributes, and stay bounded under a hostile client. End to end,
the real OTLP/HTTP exporter sends to a receiver in this test, which decodes the payload with
the official protobuf definitions (``opentelemetry-proto``).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader
from prometheus_client import CollectorRegistry

import loopwatch
from harness.otlp import Received, otlp_receiver
from harness.servers import serve_in_thread
from loopwatch._accel import request as request_path
from loopwatch._metrics import metrics_for
from tests.apps import sample
from tests.conftest import run_on


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def _metric(reader: InMemoryMetricReader, name: str) -> Any:
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    return metric
    raise AssertionError(f"{name} not exported")


def _requests_seen(reader: InMemoryMetricReader) -> int:
    return sum(p.count for p in _points(reader, "http.server.request.duration"))


def _wait_for(reader: InMemoryMetricReader, n: int, timeout: float = 10.0) -> None:
    """Until the reader saw ``n`` requests (the server records a request a moment after the
    client has its response, and exports it at the monitor's next probe)."""
    deadline = time.monotonic() + timeout
    while _requests_seen(reader) < n:
        assert time.monotonic() < deadline, f"saw {_requests_seen(reader)} of {n} requests"
        time.sleep(0.05)


def _prometheus(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    metrics_for(registry).flush()
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name in ("loopwatch_request_duration_seconds_sum",
                          "loopwatch_request_duration_seconds_count",
                          "loopwatch_request_blocking_seconds_sum",
                          "loopwatch_request_delayed_seconds_sum"):
                out[(s.name, s.labels["method"], s.labels["route"])] = s.value
    return out


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


def test_requests_and_blocks_match_the_prometheus_metrics(
    loop_kind: str, reader: InMemoryMetricReader
) -> None:
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[reader])
    app = sample.build(registry, meter_provider=provider)
    with serve_in_thread(app, loop=loop_kind) as server, httpx.Client(base_url=server.url) as c:
        for i in range(30):
            assert c.get(f"/items/{i}").status_code == 200
        for _ in range(2):
            assert c.get("/a").status_code == 200  # blocks 200 ms each
        assert c.get("/no/such/path").status_code == 404
        assert c.get("/boom").status_code == 500  # uvicorn closes the connection after it
        _wait_for(reader, 34)
        prom = _prometheus(registry)
        prom_blocks = registry.get_sample_value(
            "loopwatch_event_loop_block_duration_seconds_sum", {"method": "GET", "route": "/a"})

    # Per route and status, exactly what was sent; durations and loop time equal to the
    # Prometheus figures of the very same requests.
    duration = {(p.attributes.get("http.route"), p.attributes["http.response.status_code"]): p
                for p in _points(reader, "http.server.request.duration")}
    assert {k: p.count for k, p in duration.items()} == {
        ("/items/{item_id}", 200): 30, ("/a", 200): 2, ("/boom", 500): 1, (None, 404): 1,
    }
    for (route, _), point in duration.items():
        label = route or "<unmatched>"
        assert point.attributes["http.request.method"] == "GET"
        assert point.attributes["url.scheme"] == "http"
        assert math.isclose(point.sum, prom[("loopwatch_request_duration_seconds_sum", "GET",
                                              label)], rel_tol=1e-9)
    assert duration[("/boom", 500)].attributes["error.type"] == "500"
    assert "error.type" not in duration[("/a", 200)].attributes
    assert duration[("/a", 200)].min >= 0.2
    blocking = {p.attributes.get("http.route"): p
                for p in _points(reader, "loopwatch.request.blocking")}
    assert blocking["/a"].count == 2 and blocking["/a"].sum >= 0.4
    for route, point in blocking.items():
        assert math.isclose(point.sum, prom[("loopwatch_request_blocking_seconds_sum", "GET",
                                              route or "<unmatched>")], rel_tol=1e-9)
    delayed = {p.attributes.get("http.route"): p
               for p in _points(reader, "loopwatch.request.delayed")}
    assert delayed["/a"].count == 2
    for route, point in delayed.items():
        assert math.isclose(point.sum, prom[("loopwatch_request_delayed_seconds_sum", "GET",
                                              route or "<unmatched>")], rel_tol=1e-9, abs_tol=1e-12)
    # Units and kinds as OpenTelemetry names them.
    assert _metric(reader, "http.server.request.duration").unit == "s"
    assert list(duration[("/a", 200)].explicit_bounds)[:3] == [0.005, 0.01, 0.025]

    blocks = _points(reader, "loopwatch.event_loop.block.duration")
    assert sum(p.count for p in blocks) >= 2
    by_route = {p.attributes.get("http.route"): p for p in blocks}
    assert by_route["/a"].count == 2 and by_route["/a"].min >= 0.2
    # The same two block events as the Prometheus histogram, each at least the sleep that
    # really happened (the OS may oversleep) and at most 50 ms over it.
    assert math.isclose(by_route["/a"].sum, prom_blocks, rel_tol=1e-9)
    slept = sum(sample.measured[-2:])
    assert slept <= by_route["/a"].sum <= slept + 0.1
    assert by_route["/a"].attributes["http.request.method"] == "GET"
    lag = _points(reader, "loopwatch.event_loop.lag")
    assert lag[0].count > 0 and lag[0].max >= 0.15  # the probe waited behind a block
    busy = _points(reader, "loopwatch.event_loop.busy")
    assert busy[0].value >= 0.4
    assert _metric(reader, "loopwatch.event_loop.busy").unit == "s"
    errors = _points(reader, "loopwatch.internal_errors")
    assert sum(p.value for p in errors) == 0


def test_active_requests_and_thread_pool(loop_kind: str, reader: InMemoryMetricReader) -> None:
    provider = MeterProvider(metric_readers=[reader])
    app = sample.build(CollectorRegistry(), meter_provider=provider)

    with serve_in_thread(app, loop=loop_kind) as server:
        async def scenario() -> list[Any]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                done = asyncio.Event()

                async def keep_in_flight(start: float) -> None:
                    # The next request as soon as one returns, three workers staggered: a
                    # request is always in flight, whatever the phase of the middleware's
                    # once-a-second tick (a batch of three, resent when all were done, could
                    # keep step with it and be between batches at every tick).
                    await asyncio.sleep(start)
                    while not done.is_set():
                        await c.get("/b")  # 200 ms

                workers = [asyncio.create_task(keep_in_flight(i * 0.07)) for i in range(3)]
                # The middleware notes requests in flight once a second: wait for a tick.
                deadline = time.monotonic() + 5
                seen: list[Any] = []
                while not seen and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                    seen = [p for p in _points(reader, "http.server.active_requests")
                            if p.value > 0]
                done.set()
                await asyncio.gather(*workers)
                return seen

        active = run_on("asyncio", scenario())
    assert active, "no active requests observed"
    assert active[0].attributes == {"http.request.method": "GET", "url.scheme": "http"}
    assert 1 <= active[0].value <= 3
    limit = _points(reader, "loopwatch.threadpool.threads.limit")
    assert limit and limit[0].value == 40  # AnyIO's default


def decode(bodies: Received) -> dict[str, Any]:
    """The metrics of OTLP/HTTP export requests, decoded with the official protobuf
    definitions, by name (cumulative: the last export of each holds it all)."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    metrics: dict[str, Any] = {}
    for _, _, body in bodies:
        message = ExportMetricsServiceRequest()
        message.ParseFromString(body)
        for resource in message.resource_metrics:
            for scope in resource.scope_metrics:
                assert scope.scope.name == "loopwatch"
                for metric in scope.metrics:
                    metrics[metric.name] = metric
    return metrics


def test_otlp_http_export_decodes_with_the_official_protobuf(loop_kind: str) -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    with otlp_receiver() as (url, bodies):
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{url}/v1/metrics"),
                                               export_interval_millis=60_000)
        provider = MeterProvider(metric_readers=[reader])
        app = sample.build(CollectorRegistry(), meter_provider=provider)
        with serve_in_thread(app, loop=loop_kind) as server, \
                httpx.Client(base_url=server.url) as c:
            for i in range(5):
                assert c.get(f"/items/{i}").status_code == 200
            assert c.get("/a").status_code == 200
            time.sleep(1.2)  # recorded, drained at the next probe; a tick notes the pool
        provider.shutdown()  # exports what is left
    assert bodies, "nothing exported"
    path, content_type, _ = bodies[-1]
    assert path == "/v1/metrics" and content_type == "application/x-protobuf"
    metrics = decode(bodies)
    duration = metrics["http.server.request.duration"]
    assert duration.unit == "s"
    by_route = {}
    for point in duration.histogram.data_points:
        attributes = {a.key: a.value for a in point.attributes}
        by_route[attributes["http.route"].string_value] = (point.count, attributes)
    assert by_route["/items/{item_id}"][0] == 5 and by_route["/a"][0] == 1
    attributes = by_route["/a"][1]
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["http.request.method"].string_value == "GET"
    assert attributes["url.scheme"].string_value == "http"
    block = metrics["loopwatch.event_loop.block.duration"].histogram.data_points
    assert sum(p.count for p in block) >= 1 and max(p.max for p in block) >= 0.2
    assert metrics["loopwatch.event_loop.busy"].sum.is_monotonic
    assert metrics["loopwatch.event_loop.lag"].histogram.data_points[0].count > 0
    for name in ("loopwatch.request.blocking", "loopwatch.request.delayed",
                 "http.server.active_requests",
                 "loopwatch.threadpool.threads.limit", "loopwatch.internal_errors"):
        assert name in metrics, sorted(metrics)


def test_attributes_stay_bounded_under_a_hostile_client(
    loop_kind: str, reader: InMemoryMetricReader
) -> None:
    provider = MeterProvider(metric_readers=[reader])
    app = sample.build(CollectorRegistry(), meter_provider=provider)
    # Behind a proxy that is trusted with anything: the client claims any scheme it likes.
    # h11 passes invented methods on to the app (httptools answers them 400 itself).
    with serve_in_thread(app, loop=loop_kind, proxy_headers=True, forwarded_allow_ips="*",
                         http="h11") as server, \
            httpx.Client(base_url=server.url) as c:
        for i in range(200):
            c.get(f"/random/{i}?secret={i}", headers={"X-Forwarded-Proto": f"proto{i}"})
            c.request(f"VERB{i}", f"/items/{i}")
        _wait_for(reader, 400)
    sets = {tuple(sorted(p.attributes.items()))
            for p in _points(reader, "http.server.request.duration")}
    assert len(sets) <= 4, sets
    for attributes in map(dict, sets):
        assert attributes.get("url.scheme") in (None, "http")
        assert attributes["http.request.method"] in ("GET", "_OTHER")
        assert attributes.get("http.route") in (None, "/items/{item_id}")


def test_the_monitor_alone_exports_the_loop(loop_kind: str,
                                            reader: InMemoryMetricReader) -> None:
    provider = MeterProvider(metric_readers=[reader])

    async def work() -> None:
        await asyncio.sleep(0.01)
        time.sleep(0.1)

    async def main() -> None:
        monitor = loopwatch.Monitor(block_threshold=0.05, log_blocks=False,
                                    meter_provider=provider).start()
        await asyncio.create_task(work())  # a task of the monitor's time: timed on uvloop too
        await asyncio.sleep(0.1)
        monitor.stop()

    run_on(loop_kind, main())
    blocks = _points(reader, "loopwatch.event_loop.block.duration")
    assert [p.count for p in blocks] == [1] and blocks[0].min >= 0.1
    assert blocks[0].attributes == {}  # outside any request
    assert _points(reader, "loopwatch.event_loop.lag")[0].count > 0


def test_requests_kept_for_export_are_bounded(monkeypatch: pytest.MonkeyPatch,
                                              reader: InMemoryMetricReader) -> None:
    """With no probe to drain them (the monitor never started), at most RAW_LIMIT requests
    wait; the rest are counted as not exported, and the app keeps serving."""
    from loopwatch._otel import OtelMetrics

    otel = OtelMetrics(MeterProvider(metric_readers=[reader]))
    series = metrics_for(CollectorRegistry()).new_series("GET", "/x")
    otel.attach(series)
    monkeypatch.setattr(request_path, "RAW_LIMIT", 3)
    for _ in range(5):
        series.add(200, 0.01, 0.001, 0.0)
        request_path.keep_raw(series.totals, 200, 0.01, 0.001, 0.0, "http")
    assert len(series.totals.raw) == 3
    otel.drain()
    assert series.totals.raw == []
    assert [p.count for p in _points(reader, "http.server.request.duration")] == [3]
    assert [p.value for p in _points(reader, "loopwatch.internal_errors")] == [2]


def test_a_bad_meter_provider_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match=r"invalid meter_provider=.*allowed: an OpenTelemetry "
                                        r"MeterProvider"):
        loopwatch.LoopWatchMiddleware(FastAPI(), meter_provider=object())
    with pytest.raises(TypeError, match="invalid meter_provider"):
        loopwatch.Monitor(meter_provider="otel")


def test_without_opentelemetry_installed_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.metrics", None)
    with pytest.raises(ImportError, match=r'pip install "loopwatch\[otel\]"'):
        loopwatch.LoopWatchMiddleware(FastAPI(), meter_provider=MeterProvider())


def test_without_a_meter_provider_nothing_is_kept(loop_kind: str) -> None:
    registry = CollectorRegistry()
    app = sample.build(registry)
    with serve_in_thread(app, loop=loop_kind) as server, httpx.Client(base_url=server.url) as c:
        for i in range(3):
            c.get(f"/items/{i}")
        series = metrics_for(registry)._series
        assert series and all(s.totals.raw is None for s in series)


# uvicorn ends a failed startup with sys.exit(3): in a server's thread, that is the thread's
# end (a process would exit with 3).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_bad_meter_provider_stops_a_server_at_startup_naming_it(
    loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Starlette builds its middleware inside the first lifespan call, where uvicorn's default
    lifespan="auto" would take the error for "lifespan unsupported" and serve a 500 for every
    request: the startup must fail instead, saying why."""
    app = FastAPI()
    app.add_middleware(loopwatch.LoopWatchMiddleware, meter_provider=object())
    with pytest.raises(RuntimeError, match="died during startup"):
        with serve_in_thread(app, loop=loop_kind, lifespan="auto"):
            pass
    assert any("invalid meter_provider" in r.getMessage() for r in caplog.records
               if r.name == "loopwatch"), caplog.text
