"""A hostile battery: every setting at its allowed extremes, deep and wide stacks, recursion
near the limit, huge and malformed requests, many threads, monitors started and stopped in a
tight loop. Real uvicorn servers on loopback, both loops. The process survives, nothing
loopwatch keeps outgrows its settings, loopwatch counts no internal error, and its own
endpoints never hold the loop for 10 ms."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import loopwatch
from loopwatch._metrics import metrics_for
from harness.servers import serve_in_thread
from tests.conftest import run_on


def recurse(n: int, seconds: float) -> int:
    if n <= 0:
        time.sleep(seconds)
        return 0
    return recurse(n - 1, seconds) + 1


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def fast(request: Request) -> PlainTextResponse:
    return PlainTextResponse("fast")


async def block(request: Request) -> PlainTextResponse:
    time.sleep(float(request.query_params.get("s", "0.005")))
    return PlainTextResponse("block")


async def cpu(request: Request) -> PlainTextResponse:
    spin(float(request.query_params.get("s", "0.005")))
    return PlainTextResponse("cpu")


async def deep(request: Request) -> PlainTextResponse:
    # As deep as the recursion limit allows, minus what the server's own stack takes.
    depth = int(request.query_params.get("n", str(sys.getrecursionlimit() - 150)))
    recurse(depth, float(request.query_params.get("s", "0.005")))
    return PlainTextResponse("deep")


async def runaway(request: Request) -> PlainTextResponse:
    def forever(n: int) -> int:
        return forever(n + 1)

    forever(0)  # RecursionError: a 500 from the app, not from loopwatch
    return PlainTextResponse("unreachable")


async def echo_size(request: Request) -> PlainTextResponse:
    body = await request.body()
    return PlainTextResponse(str(len(body)))


def build(registry: CollectorRegistry, instrument: bool = True, **options: Any) -> Starlette:
    app = Starlette(routes=[
        Route("/fast", fast), Route("/block", block), Route("/cpu", cpu), Route("/deep", deep),
        Route("/runaway", runaway), Route("/echo", echo_size, methods=["POST"]),
        Route("/loopwatch/events", loopwatch.events_app(limit=1000)),
        Mount("/metrics", loopwatch.metrics_app(registry)),
    ])
    if instrument:
        app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry, exclude_paths=(),
                           **options)
    return app


def own_steps_over_10ms(monitor: loopwatch.Monitor) -> list[Any]:
    return [(e.route, e.duration) for e in monitor.blocks
            if e.route in ("/loopwatch/events", "/metrics/{path}")
            and e.duration - e.preempted - e.paused >= 0.01]


EXTREMES = {
    "smallest": dict(block_threshold=0.002, probe_interval=0.001, stack_depth=1, ring_size=1),
    "deepest": dict(block_threshold=0.002, probe_interval=0.001, stack_depth=100,
                    ring_size=100_000),
    "largest threshold": dict(block_threshold=60, probe_interval=59.999, stack_depth=100,
                              ring_size=100_000),
    "quiet": dict(block_threshold=0.002, probe_interval=0.001, log_blocks=False,
                  sample_stacks=False, ring_size=1),
}


@pytest.mark.parametrize("name", list(EXTREMES))
def test_every_setting_at_its_extremes_on_a_real_server(loop_kind: str, name: str) -> None:
    options = EXTREMES[name]
    registry = CollectorRegistry()
    app = build(registry, **options)
    paths = ["/fast", "/block", "/cpu", "/deep?n=300", "/deep", "/runaway", "/fast"] * 6
    with serve_in_thread(app, loop=loop_kind) as server:
        async def drive() -> list[int]:
            # No keep-alive: uvicorn closes a connection whose app raised (/runaway) after
            # its 500, and a pooled client could reuse it just then (a ReadError of its own).
            async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=httpx.Limits(
                    max_keepalive_connections=0)) as client:
                statuses = []
                for start in range(0, len(paths), 7):
                    batch = paths[start:start + 7]
                    responses = await asyncio.gather(*(client.get(p) for p in batch))
                    statuses += [r.status_code for r in responses]
                events = await client.get("/loopwatch/events?limit=1000")
                metrics = await client.get("/metrics/")
                assert events.status_code == 200 and metrics.status_code == 200
                return statuses

        statuses = asyncio.run(drive())
        monitor = loopwatch.get_monitor(server.loop)
        assert monitor is not None and monitor.active
        ring, depth = options["ring_size"], options.get("stack_depth", 50)
        assert len(monitor.blocks) <= ring
        assert all(len(e.frames) <= depth for e in monitor.blocks)
        assert not own_steps_over_10ms(monitor)
        if options["block_threshold"] < 1:
            assert monitor.block_count >= 6  # /block, /cpu and /deep each blocked 5 ms
        else:
            assert monitor.block_count == 0
        assert monitor.internal_errors == 0
    expected = {"/runaway": 500}
    assert statuses == [expected.get(p, 200) for p in paths], statuses
    metrics_for(registry).flush()
    assert registry.get_sample_value("loopwatch_internal_errors_total") == 0
    assert registry.get_sample_value("loopwatch_requests_total", {
        "method": "GET", "route": "/runaway", "status": "500"}) == 6


def test_many_threads_and_recursion_near_the_limit(loop_kind: str) -> None:
    """150 idle threads (more than faulthandler dumps) and blocks at the bottom of
    recursions as deep as the limit allows: blocks are reported, sampled or saying why."""
    registry = CollectorRegistry()
    app = build(registry, block_threshold=0.02, stack_depth=100)
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(150)]
    for thread in threads:
        thread.start()
    try:
        with serve_in_thread(app, loop=loop_kind) as server:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for _ in range(5):
                    assert client.get("/deep?s=0.05").status_code == 200
            monitor = loopwatch.get_monitor(server.loop)
            assert monitor is not None
            # A block is recorded as its step ends, on the loop thread, which is after the
            # step wrote the response: the client can read the last answer first.
            deadline = time.monotonic() + 5
            while (len(deep_events := [e for e in monitor.blocks if e.route == "/deep"]) < 5
                   and time.monotonic() < deadline):
                time.sleep(0.01)
            assert len(deep_events) == 5, [
                (e.route, e.duration, e.paused, e.gc_seconds) for e in monitor.blocks]
            for event in deep_events:
                assert event.duration >= 0.05
                assert event.stack_status == "sampled" or event.stack_status.startswith(
                    "unavailable")
            assert monitor.internal_errors == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def _raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


HOSTILE = {
    "long path": b"GET /" + b"p" * 8000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "many query params": b"GET /fast?" + b"&".join(b"k%d=v" % i for i in range(2000))
    + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "big header": b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Big: " + b"h" * 8000
    + b"\r\nConnection: close\r\n\r\n",
    "odd method": b"BREW /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "lowercase method": b"get /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "bad percent": b"GET /f%zz%%ast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "http/1.0": b"GET /fast HTTP/1.0\r\n\r\n",
    "pipelined": b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n"
    b"GET /block HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "garbage": b"\x00\xff\x16\x03\x01 nonsense\r\n\r\n",
    "body 5 MB": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(5 << 20).encode()
    + b"\r\nConnection: close\r\n\r\n" + b"b" * (5 << 20),
}


def _status_lines(answer: bytes) -> list[bytes]:
    # (A pipelined response follows the previous body with no line break in between.)
    return re.findall(rb"HTTP/1\.[01] \d{3} [^\r]*", answer)


def test_huge_and_malformed_requests(loop_kind: str) -> None:
    """What a hostile client sends gets the answers the server and app give without
    loopwatch, and no concrete path, query or header value ever becomes a label."""
    bare: dict[str, list[bytes]] = {}
    with serve_in_thread(build(CollectorRegistry(), instrument=False), loop=loop_kind) as server:
        for name, request in HOSTILE.items():
            bare[name] = _status_lines(_raw(server.port, request))
    registry = CollectorRegistry()
    app = build(registry)
    with serve_in_thread(app, loop=loop_kind) as server:
        port = server.port
        answers = {name: _raw(port, request) for name, request in HOSTILE.items()}
        answers["truncated"] = _raw(port, b"GET /fast HTTP/1.1\r\nHost:", timeout=1)
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/fast").status_code == 200  # still serving
        monitor = loopwatch.get_monitor(server.loop)
        assert monitor is not None and monitor.internal_errors == 0
    for name, lines in bare.items():
        assert _status_lines(answers[name]) == lines, (name, lines, answers[name][:200])
    assert bare["many query params"] == [b"HTTP/1.1 200 OK"]  # the app really served them
    assert bare["pipelined"] == [b"HTTP/1.1 200 OK"] * 2
    assert answers["body 5 MB"].endswith(str(5 << 20).encode())
    assert answers["truncated"] == b""
    metrics_for(registry).flush()
    labels = {(s.labels.get("method"), s.labels["route"]) for f in registry.collect()
              for s in f.samples if "route" in s.labels}
    routes = {route for _, route in labels}
    assert routes <= {"/fast", "/block", "/echo", "<unmatched>", "/metrics/{path}", "<gc>"}, routes
    methods = {method for method, route in labels if route != "<gc>"}
    assert methods <= {"GET", "POST", "_OTHER"}, labels
    # A garbage collection that held the loop (the test process's own heap, at any moment)
    # is a block of no request: fixed labels, method "<none>" and route "<gc>".
    assert {method for method, route in labels if route == "<gc>"} <= {"<none>"}, labels
    assert registry.get_sample_value("loopwatch_internal_errors_total") == 0


def test_monitors_started_and_stopped_in_a_tight_loop_while_blocking(loop_kind: str) -> None:
    """500 monitors, each started, blocked under, and stopped, some mid-block: one block
    each, no watchdog thread left, no hook left."""
    from loopwatch import _hooks

    before = {t.ident for t in threading.enumerate()}

    async def main() -> list[int]:
        counts = []
        for i in range(500):
            monitor = loopwatch.Monitor(block_threshold=0.002, probe_interval=0.001,
                                        log_blocks=False).start()
            await asyncio.sleep(0)
            # A block (3x the threshold: on uvloop this task is older than the monitor, and
            # its block is measured from the probe); every other round stops inside it.
            time.sleep(0.006)
            if i % 2:
                await asyncio.sleep(0)
            monitor.stop()
            counts.append(monitor.block_count)
        return counts

    counts = run_on(loop_kind, main())
    assert all(count >= 1 for count in counts), counts[:20]
    deadline = time.monotonic() + 5
    while {t.ident for t in threading.enumerate() if t.name == "loopwatch-watchdog"} - before:
        assert time.monotonic() < deadline, "watchdog threads left"
        time.sleep(0.01)
    assert _hooks._handle_users == 0 and not _hooks.handle_hook_installed()
