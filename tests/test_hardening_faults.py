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

from demo_app import Settings, create_app
from loopwatch._metrics import metrics_for
from tests.apps import hardening_app
from tests.servers import free_port, serve_in_subprocess, serve_in_thread

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


def _wait_for(condition: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def loopwatch_errors(registry: CollectorRegistry) -> float:
    metrics_for(registry).flush()
    return registry.get_sample_value("loopwatch_internal_errors_total") or 0.0


# -- the watchdog thread dies --------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_url() -> Iterator[str]:
    """The corpus app, watched by loopwatch, under uvicorn in its own process."""
    port = free_port()
    args = ["-m", "uvicorn", "tests.apps.hardening_app:app", "--port", str(port),
            "--loop", "asyncio", "--log-level", "warning"]
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


def _gauges(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("loopwatch_threadpool_"):
            name, value = line.split()
            out[name] = float(value)
    return out
