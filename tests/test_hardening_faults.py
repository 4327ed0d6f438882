"""Faults: a misbehaving upstream, a dead watchdog thread, scrapes while the app is stuck.

* The demo (watched by loopwatch) in front of an upstream that is down, slow, hanging,
  answering garbage JSON, a huge body, a body that never ends or one cut short: the demo
  answers 502/504 within its timeout, its connection pool returns to idle, and nothing leaks
  (no "Task was destroyed but it is pending", no ResourceWarning, no unraisable exception).
* The watchdog thread dying is detected on the next tick (an ERROR log line and
  ``loopwatch_internal_errors_total``), blocks are still measured and not misdiagnosed, and
  the app never hangs.
* ``/metrics`` keeps answering: right after each block of the loop, while sync routes hold
  the whole AnyIO thread pool, and while the loop's default executor is saturated.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest_demo import serve, serve_simulator
from prometheus_client import CollectorRegistry

import loopwatch
from demo_app import Settings, create_app
from loopwatch._metrics import metrics_for
from tests.apps import hardening_app
from harness.servers import free_port, serve_in_subprocess, serve_in_thread, uvicorn_args

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 0.5  # the demo's upstream timeout in these tests
#: How much later than its timeout the demo may answer on a busy 2-core machine.
SLACK = 1.5


# -- capturing leaks -------------------------------------------------------------------------


@dataclass
class Leaks:
    records: list[logging.LogRecord] = field(default_factory=list)
    warnings: list[warnings.WarningMessage] = field(default_factory=list)
    unraisable: list[Any] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = [f"log {r.name}: {r.getMessage()[:300]}" for r in self.records
               if r.levelno >= logging.ERROR or "destroyed but it is pending" in r.getMessage()
               or "never retrieved" in r.getMessage()]
        out += [f"warning: {w.category.__name__}: {str(w.message)[:300]}" for w in self.warnings
                if issubclass(w.category, (ResourceWarning, RuntimeWarning))]
        out += [f"unraisable: {u.exc_value!r} in {u.object!r}"[:300] for u in self.unraisable]
        return out


class _Collect(logging.Handler):
    def __init__(self, sink: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record)


@contextlib.contextmanager
def capture_leaks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Leaks]:
    """Collect, from every thread: asyncio's and the servers' error logs, warnings (with
    ResourceWarning enabled) and unraisable exceptions; garbage is collected at the end."""
    import sys

    leaks = Leaks()
    handler = _Collect(leaks.records)
    loggers = [logging.getLogger(n) for n in ("asyncio", "uvicorn.error", "loopwatch")]
    for lg in loggers:
        lg.addHandler(handler)
    monkeypatch.setattr(sys, "unraisablehook", leaks.unraisable.append)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield leaks
        finally:
            for _ in range(3):
                gc.collect()
            leaks.warnings.extend(caught)
            for lg in loggers:
                lg.removeHandler(handler)


# -- the demo in front of a faulty upstream ------------------------------------------------------


@dataclass
class Demo:
    url: str
    app: Any
    registry: CollectorRegistry

    def pool(self) -> Any:
        """httpcore's connection pool under the demo's client (found through any wrapper
        transport the demo may put around httpx's own)."""
        transport = self.app.state.http_client._transport
        for _ in range(5):
            if isinstance(transport, httpx.AsyncHTTPTransport):
                return transport._pool
            transport = next(v for v in vars(transport).values()
                             if isinstance(v, httpx.AsyncBaseTransport))
        raise AssertionError("no httpx.AsyncHTTPTransport under the demo's client")

    def pool_is_idle(self) -> bool:
        pool = self.pool()
        return not pool._requests and all(c.is_idle() or c.is_closed() for c in pool.connections)


@contextlib.contextmanager
def demo_in_front_of(upstream_url: str, loop: str) -> Iterator[Demo]:
    registry = CollectorRegistry()
    app = create_app(Settings(upstream_url=upstream_url, timeout=TIMEOUT,
                              connect_timeout=TIMEOUT), registry=registry)
    with serve(app, loop) as server:
        yield Demo(server.url, app, registry)


LOOPS = ["asyncio", "uvloop"]


def _get(url: str, **headers: str) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = httpx.get(url, headers=headers, timeout=TIMEOUT + SLACK + 1.5)
    return response, time.perf_counter() - start


@pytest.mark.parametrize("loop", LOOPS)
def test_simulated_faults_are_answered_in_time_and_leave_nothing_behind(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = [  # headers, expected status, expected code, at least this long
        ({"X-Sim-Delay-Ms": "100"}, 200, None, 0.1),
        ({"X-Sim-Delay-Ms": "3000"}, 504, "upstream_timeout", TIMEOUT),
        ({"X-Sim-Hang": "1"}, 504, "upstream_timeout", TIMEOUT),
        ({"X-Sim-Garbage": "1"}, 502, "upstream_invalid_response", 0),
        ({"X-Sim-Status": "503"}, 502, "upstream_error", 0),
        ({"X-Sim-Drop": "reset"}, 502, "upstream_unreachable", 0),
        ({"X-Sim-Drop": "close"}, 502, "upstream_unreachable", 0),
    ]
    with capture_leaks(monkeypatch) as leaks:
        with serve_simulator(loop) as (upstream_url, _), \
                demo_in_front_of(upstream_url, loop) as demo:
            for headers, status, code, at_least in cases:
                for path in ("/resilient/1", "/dashboard/2"):
                    response, took = _get(demo.url + path, **headers)
                    assert response.status_code == status, (headers, path, response.text)
                    if code:
                        assert response.json()["detail"]["code"] == code
                    assert at_least * 0.9 <= took <= TIMEOUT + SLACK, (headers, path, took)
            _wait_for(demo.pool_is_idle, "the pool's connections returned to idle")
            assert httpx.get(demo.url + "/users/3", timeout=5).status_code == 200
            assert loopwatch_errors(demo.registry) == 0
    assert not leaks.problems(), leaks.problems()


@pytest.mark.parametrize("loop", LOOPS)
def test_an_upstream_that_is_down_is_a_quick_502(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with capture_leaks(monkeypatch) as leaks:
        with demo_in_front_of(f"http://127.0.0.1:{free_port()}", loop) as demo:
            for path in ("/resilient/1", "/data", "/weather", "/dashboard/1"):
                response, took = _get(demo.url + path)
                assert response.status_code == 502, (path, response.text)
                assert response.json()["detail"]["code"] == "upstream_unreachable"
                assert took <= TIMEOUT + SLACK
            _wait_for(demo.pool_is_idle, "the pool's connections returned to idle")
    assert not leaks.problems(), leaks.problems()


@contextlib.contextmanager
def fault_upstream(mode: str, loop: str, **options: Any) -> Iterator[tuple[str, Any]]:
    upstream = hardening_app.FaultUpstream(mode, **options)
    try:
        with serve_in_thread(upstream, loop=loop, timeout_graceful_shutdown=2) as server:
            yield server.url, upstream
    finally:
        upstream.released = True


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(("mode", "status"), [
    ("short", 502),     # Content-Length larger than the body, then the connection closes
    ("huge", 502),      # 32 MB of valid JSON
    ("trickle", 504),   # a byte every 50 ms, forever: each read is within the timeout
])
def test_huge_endless_and_truncated_bodies_are_answered_within_the_timeout(
    loop: str, mode: str, status: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upstream body the demo cannot use must cost it no more than its timeout: the
    timeout bounds the whole call, not each read, and a body too large to be an answer is
    refused instead of buffered, parsed and sent on."""
    with capture_leaks(monkeypatch):
        with fault_upstream(mode, loop, huge_bytes=32 * 1024 * 1024) as (url, upstream), \
                demo_in_front_of(url, loop) as demo:
            try:
                response, took = _get(demo.url + "/resilient/1")
            except httpx.TimeoutException:
                pytest.fail(f"{mode}: the demo did not answer within {TIMEOUT + SLACK + 1.5} s "
                            f"(its upstream timeout is {TIMEOUT} s)")
            finally:
                upstream.released = True  # let a stuck demo request finish before shutdown
            assert (response.status_code, took <= TIMEOUT + SLACK) == (status, True), (
                mode, response.status_code, len(response.content), took)
            _wait_for(demo.pool_is_idle, "the pool's connections returned to idle")


def _wait_for(condition: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def loopwatch_errors(registry: CollectorRegistry) -> float:
    metrics_for(registry).flush()
    return registry.get_sample_value("loopwatch_internal_errors_total") or 0.0


# -- the watchdog thread dies --------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_a_dead_watchdog_is_reported_once_and_never_hangs_the_app(
    loop: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    crashes: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    registry = CollectorRegistry()
    app = hardening_app.build_corpus(registry, log_blocks=False)
    caplog.set_level(logging.WARNING, logger="loopwatch")
    with serve_in_thread(app, loop=loop) as server:
        assert httpx.get(server.url + "/json").status_code == 200
        monitor = loopwatch.get_monitor(server.loop)
        assert monitor is not None
        _wait_for(lambda: monitor.watchdog_thread is not None, "the watchdog started")
        watchdog = monitor._watchdog
        assert watchdog is not None and watchdog.is_alive()

        def crash(timeout: float | None = None) -> bool:
            raise RuntimeError("injected: the watchdog thread dies")

        watchdog._stop.wait = crash  # type: ignore[method-assign]
        _wait_for(lambda: not watchdog.is_alive(), "the watchdog died")
        died = time.monotonic()
        _wait_for(lambda: loopwatch_errors(registry) >= 1, "the death was counted", 3.0)
        noticed = time.monotonic() - died
        assert noticed <= 2.5  # the next once-a-second tick (plus a busy machine)
        errors = [r for r in caplog.records if r.name == "loopwatch"
                  and r.levelno >= logging.ERROR and "watchdog" in r.getMessage()]
        assert errors, [r.getMessage() for r in caplog.records]
        # The app is unaffected: it answers, blocks are still timed, metrics still served.
        start = time.perf_counter()
        assert httpx.get(server.url + "/block?ms=250", timeout=10).status_code == 200
        assert time.perf_counter() - start < 2
        events = httpx.get(server.url + "/loopwatch/events/", timeout=10).json()["events"]
        assert events and 0.25 <= events[-1]["duration"] < 0.5
        # ... and the event says why it has no stack; it does not blame the GIL.
        assert "GIL" not in events[-1]["stack_status"], events[-1]
        assert events[-1]["hint"] is None, events[-1]
        assert httpx.get(server.url + "/metrics/", timeout=10).status_code == 200
        time.sleep(1.2)  # more ticks: still counted once
        assert loopwatch_errors(registry) == 1
        # No "NoneType: None" pseudo-traceback in the log.
        assert not any(r.exc_text and "NoneType: None" in r.exc_text for r in caplog.records
                       if r.name == "loopwatch"), [r.exc_text for r in caplog.records]
        stop_started = time.monotonic()
    assert time.monotonic() - stop_started < 3  # the server (and monitor) stopped promptly
    assert not server.thread.is_alive()
    assert len(crashes) == 1 and "injected" in str(crashes[0].exc_value)


# -- scraping /metrics while the app is stuck ---------------------------------------------------


@pytest.fixture(scope="module")
def corpus_url() -> Iterator[str]:
    """The corpus app, watched by loopwatch, under uvicorn in its own process."""
    port = free_port()
    args = uvicorn_args("tests.apps.hardening_app:app", port, loop="asyncio")
    env: dict[str, str | None] = {"PYTHONPATH": str(ROOT), "PROMETHEUS_MULTIPROC_DIR": None}
    with serve_in_subprocess(args, port=port, env=env, path="/pid"):
        yield f"http://127.0.0.1:{port}"


def test_a_scrape_answers_right_after_each_block(corpus_url: str) -> None:
    """While the loop is blocked nothing on it can answer, /metrics included (the exposition
    renders in a thread, but the request is read and answered by the loop). A scrape sent
    during a block must be answered as soon as the block ends."""
    block = 0.6
    url = corpus_url
    httpx.get(url + "/metrics/", timeout=10)  # warm up
    blocks: list[tuple[float, float]] = []

    def blocker() -> None:
        with httpx.Client(timeout=30) as client:
            for _ in range(3):
                start = time.monotonic()
                client.get(url + f"/block?ms={int(block * 1000)}")
                blocks.append((start, time.monotonic()))
                time.sleep(0.3)

    thread = threading.Thread(target=blocker)
    scrapes: list[tuple[float, float, int]] = []
    thread.start()
    with httpx.Client(timeout=30) as client:
        while thread.is_alive():
            sent = time.monotonic()
            status = client.get(url + "/metrics/").status_code
            scrapes.append((sent, time.monotonic(), status))
            time.sleep(0.05)
    thread.join()
    assert len(blocks) == 3
    assert all(status == 200 for _, _, status in scrapes)
    late = []
    for sent, done, _ in scrapes:
        # The end of the block this scrape waited behind, if any (as the client saw it).
        ends = [end for start, end in blocks if start - 0.2 <= sent <= end]
        waited_until = max(ends, default=sent)
        if done - waited_until > 0.5:
            late.append((round(sent - blocks[0][0], 3), round(done - waited_until, 3)))
    assert not late, late
    # Scrapes were answered between the blocks, not only after the last one.
    between = [s for s in scrapes if any(b[1] < s[1] < n[0] for b, n in zip(blocks, blocks[1:], strict=False))]
    assert len(between) >= 2, (scrapes, blocks)


def test_a_scrape_answers_while_sync_routes_hold_the_whole_thread_pool(corpus_url: str) -> None:
    """45 sync-def requests hold all 40 threads of AnyIO's pool (5 wait): the loop is free,
    and /metrics (rendered in the loop's own executor, not AnyIO's pool) answers at once and
    shows the pool exhausted."""
    url = corpus_url

    async def main() -> tuple[list[float], dict[str, float]]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(
                max_connections=100)) as client:
            held = [asyncio.ensure_future(client.get(url + "/sync?ms=3000"))
                    for _ in range(45)]
            await asyncio.sleep(0.4)
            latencies: list[float] = []
            gauges: dict[str, float] = {}
            deadline = time.monotonic() + 2.2  # the gauges are refreshed once a second
            while time.monotonic() < deadline:
                start = time.monotonic()
                text = (await client.get(url + "/metrics/")).text
                latencies.append(time.monotonic() - start)
                gauges = _gauges(text)
                if gauges.get("loopwatch_threadpool_threads_busy") == 40:
                    break
                await asyncio.sleep(0.1)
            responses = await asyncio.gather(*held)
            assert all(r.status_code == 200 for r in responses)
            return latencies, gauges

    latencies, gauges = asyncio.run(main())
    assert max(latencies) < 1.0, latencies
    assert gauges.get("loopwatch_threadpool_threads_busy") == 40, gauges
    assert gauges.get("loopwatch_threadpool_threads_limit") == 40, gauges
    assert gauges.get("loopwatch_threadpool_tasks_waiting") == 5, gauges


def test_a_scrape_answers_while_the_default_executor_is_saturated(corpus_url: str) -> None:
    """The app hands blocking work to the loop's default executor (``run_in_executor(None,
    ...)``, 6 threads on a 2-core machine) and saturates it: the scrape must not queue
    behind the app's work -- metrics are most needed when the app is saturated."""
    url = corpus_url

    async def main() -> float:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(
                max_connections=100)) as client:
            # Twice as many jobs as the default executor has threads (the server runs on
            # this machine: min(32, cpus + 4)).
            jobs = 2 * min(32, (os.cpu_count() or 1) + 4)
            held = [asyncio.ensure_future(client.get(url + "/executor?ms=3000"))
                    for _ in range(jobs)]
            await asyncio.sleep(0.4)
            start = time.monotonic()
            response = await client.get(url + "/metrics/")
            took = time.monotonic() - start
            assert response.status_code == 200
            await asyncio.gather(*held)
            return took

    took = asyncio.run(main())
    assert took < 1.0, f"the scrape waited {took:.2f} s for the app's executor work"


def _gauges(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("loopwatch_threadpool_"):
            name, value = line.split()
            out[name] = float(value)
    return out
