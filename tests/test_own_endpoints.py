"""loopwatch's own endpoints never block the loop they guard: the events JSON and the Prometheus
exposition at their largest allowed sizes, served by a real uvicorn server on both loops, hold
the loop for less than 10 ms at a time; and too many at once get 503, not a thread each.

The large responses are fetched by a client in another process: one in this process would
take the GIL from the server's loop thread while it reads them (up to a switch interval, 5 ms,
each time), stretching the loop's steps with the client's own work.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.routing import Mount, Route

import loopwatch
from loopwatch import _offloop
from loopwatch._events import BlockEvent, Frame
from harness.servers import serve_in_thread

STEP_LIMIT = 0.01


def biggest_event(i: int) -> BlockEvent:
    """An event as large as the settings allow: 100 frames, long paths and names."""
    frames = tuple(
        Frame(f"/srv/{'deep/' * 90}module_{n}.py", 100_000 + n, "Cls." + "f" * 200, "m")
        for n in range(100)
    )
    return BlockEvent(time=time.time(), duration=0.2, task=f"Task-{i}", frames=frames,
                      hint="h" * 200, method="GET", route="/r/{x}")


def build(registry: CollectorRegistry) -> Starlette:
    app = Starlette(routes=[
        Route("/loopwatch/events", loopwatch.events_app(limit=1000)),
        Mount("/metrics", loopwatch.metrics_app(registry)),
    ])
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry, ring_size=1000,
                       stack_depth=100, block_threshold=STEP_LIMIT, probe_interval=0.002,
                       log_blocks=False, exclude_paths=())
    return app


_CLIENT = """
import json, sys
import httpx
url, headers, kind = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
r = httpx.get(url, timeout=60, headers=headers)
out = {"status": r.status_code, "length": len(r.content),
       "encoding": r.headers.get("content-encoding")}
if kind == "events":
    events = r.json()["events"]
    out["events"] = len(events)
    out["frames"] = sorted({len(e["frames"]) for e in events})
else:
    out["big_total"] = "big_total" in r.text
print(json.dumps(out))
"""


def fetch_elsewhere(url: str, kind: str, headers: dict[str, str] | None = None) -> Any:
    """GET ``url`` from a client in another process; what it saw (``kind``: "events" or
    "metrics")."""
    proc = subprocess.run(
        [sys.executable, "-c", _CLIENT, url, json.dumps(headers or {}), kind],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def own_steps_over_the_limit(monitor: loopwatch.Monitor, routes: set[str]) -> list[Any]:
    """Block events of the endpoints' own steps that held the loop for 10 ms or more by
    themselves (the OS taking the CPU away on a loaded host is not the endpoint's doing)."""
    return [(e.route, e.duration, e.preempted) for e in monitor.blocks
            if e.route in routes and e.duration - e.preempted - e.paused >= STEP_LIMIT]


def test_the_largest_events_response_never_holds_the_loop(loop_kind: str) -> None:
    registry = CollectorRegistry()
    app = build(registry)
    with serve_in_thread(app, loop=loop_kind) as server:
        httpx.get(server.url + "/loopwatch/events?limit=1")  # the monitor starts
        monitor = loopwatch.get_monitor(server.loop)
        assert monitor is not None
        done = threading.Event()
        injected = [biggest_event(i) for i in range(1000)]  # built here, off the loop
        server.loop.call_soon_threadsafe(lambda: (monitor.blocks.extend(injected), done.set()))
        assert done.wait(5)
        before = len(monitor.blocks)
        started = time.perf_counter()
        got = fetch_elsewhere(server.url + "/loopwatch/events?limit=1000", "events")
        took = time.perf_counter() - started
        assert got["status"] == 200
        assert got["events"] == 1000 and got["frames"] == [100], got
        assert got["length"] > 10_000_000  # it is the largest response allowed
        time.sleep(0.1)
        new = list(monitor.blocks)[before - len(monitor.blocks):] if len(monitor.blocks) else []
        assert not own_steps_over_the_limit(monitor, {"/loopwatch/events"}), (took, new[-5:])


def test_the_largest_exposition_never_holds_the_loop(loop_kind: str) -> None:
    registry = CollectorRegistry()
    counter = Counter("big_total", "many series", ["label"], registry=registry)
    for i in range(20_000):
        counter.labels(f"value-{i:05d}-" + "x" * 40).inc()
    app = build(registry)
    with serve_in_thread(app, loop=loop_kind) as server:
        for accept in ("", "application/openmetrics-text; version=1.0.0"):
            got = fetch_elsewhere(server.url + "/metrics/", "metrics",
                                  {"accept": accept, "accept-encoding": "identity"})
            assert got["status"] == 200 and got["big_total"], got
        got = fetch_elsewhere(server.url + "/metrics/", "metrics", {"accept-encoding": "gzip"})
        assert got["status"] == 200 and got["encoding"] == "gzip", got
        monitor = loopwatch.get_monitor(server.loop)
        assert monitor is not None
        time.sleep(0.1)
        assert not own_steps_over_the_limit(monitor, {"/metrics/{path}"})


def test_too_many_renders_at_once_get_503_not_a_thread_each(loop_kind: str) -> None:
    """Renders run in threads of their own; beyond MAX_RENDERS at once a client gets 503 with
    Retry-After, and no more threads than that are ever started."""
    registry = CollectorRegistry()
    app = build(registry)
    release = threading.Event()
    real = _offloop.in_thread
    running: list[int] = []

    async def slow_in_thread(work: Any, *args: Any) -> Any:
        def slow(*a: Any) -> Any:
            running.append(_offloop._in_flight)
            release.wait(10)
            return work(*a)
        return await real(slow, *args)

    with serve_in_thread(app, loop=loop_kind) as server:
        import loopwatch._apps as apps
        original = apps.in_thread
        apps.in_thread = slow_in_thread  # type: ignore[assignment]
        try:
            async def flood() -> list[int]:
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                    calls = [asyncio.create_task(client.get("/loopwatch/events"))
                             for _ in range(_offloop.MAX_RENDERS + 6)]
                    await asyncio.sleep(0.5)
                    assert len(running) == _offloop.MAX_RENDERS, running  # threads started
                    release.set()
                    return [r.status_code for r in await asyncio.gather(*calls)]

            statuses = asyncio.run(flood())
        finally:
            apps.in_thread = original  # type: ignore[assignment]
    assert statuses.count(200) == _offloop.MAX_RENDERS, statuses
    assert statuses.count(503) == 6, statuses


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "pieces"])
@pytest.mark.parametrize("size", [0, 1, _offloop.CHUNK - 1, _offloop.CHUNK, 3 * _offloop.CHUNK + 7])
def test_bodies_go_out_whole_in_chunks(size: int, whole: bool) -> None:
    """A body given whole, or made in pieces by a render thread (``pieces``: parts of any
    size), goes out complete, in messages of at most CHUNK bytes."""
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    asyncio.run(_offloop.respond(send, 200, body if whole else _offloop.pieces(
        [body[:size // 3], body[size // 3:]]), []))
    assert sent[0]["type"] == "http.response.start"
    assert dict(sent[0]["headers"])[b"content-length"] == str(size).encode()
    chunks = sent[1:]
    assert b"".join(m["body"] for m in chunks) == body
    assert all(len(m["body"]) <= _offloop.CHUNK for m in chunks)
    assert [m.get("more_body", False) for m in chunks] == [True] * (len(chunks) - 1) + [False]
