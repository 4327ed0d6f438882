"""loopwatch's own endpoints never block the loop they guard: the events JSON and the Prometheus
exposition at their largest allowed sizes, served by a real uvicorn server on both loops, hold
the loop for less than 10 ms at a time; and too many at once get 503, not a thread each.

The largest responses are served by a server in a process of its own
(tests/apps/own_endpoints.py), as in production: in this process, the test run's other threads
and the client's parsing of 10 MB would share the GIL with the server's loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import Mount, Route

import loopwatch
from loopwatch import _offloop
from harness.servers import free_port, serve_in_subprocess, serve_in_thread, uvicorn_args

ROOT = Path(__file__).resolve().parent.parent


def build(registry: CollectorRegistry) -> Starlette:
    app = Starlette(routes=[
        Route("/loopwatch/events", loopwatch.events_app(limit=1000)),
        Mount("/metrics", loopwatch.metrics_app(registry)),
    ])
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry, log_blocks=False,
                       exclude_paths=())
    return app


@contextlib.contextmanager
def largest_server(loop_kind: str) -> Iterator[httpx.Client]:
    """tests/apps/own_endpoints.py served by uvicorn in a process of its own, as in production:
    no other thread of this test run shares the server's GIL."""
    port = free_port()
    args = uvicorn_args("tests.apps.own_endpoints:app", port, "--no-access-log", loop=loop_kind)
    with serve_in_subprocess(args, port=port, cwd=ROOT, path="/health", timeout=60,
                             output="file"):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client


def test_the_largest_events_response_never_holds_the_loop(loop_kind: str) -> None:
    """Made on the loop as it goes out, in short steps: no step of it, and no stall of the
    loop while it is served, lasts 10 ms."""
    with largest_server(loop_kind) as client:
        assert client.post("/fill").json() == {"filled": 1000}
        response = client.get("/loopwatch/events?limit=1000")
        assert response.status_code == 200
        assert len(response.content) > 10_000_000  # it is the largest response allowed
        events = response.json()["events"]
        assert len(events) == 1000 and {len(e["frames"]) for e in events} == {100}
        time.sleep(0.1)
        assert client.get("/steps").json() == {"own": [], "untimed": []}


def test_the_largest_exposition_never_holds_the_loop(loop_kind: str) -> None:
    """Rendered in a thread (prometheus_client's one call): no step of the endpoint on the
    loop lasts 10 ms. (The render thread still shares the GIL with the loop's: README, "Own
    endpoints".)"""
    with largest_server(loop_kind) as client:
        for accept in ("", "application/openmetrics-text; version=1.0.0"):
            response = client.get("/metrics/", headers={"accept": accept,
                                                        "accept-encoding": "identity"})
            assert response.status_code == 200
            assert response.text.count("big_total{") == 20_000
        response = client.get("/metrics/", headers={"accept-encoding": "gzip"})
        assert response.status_code == 200
        assert response.headers["content-encoding"] == "gzip"
        assert response.text.count("big_total{") == 20_000  # httpx decoded it
        time.sleep(0.1)
        assert client.get("/steps").json()["own"] == []


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
                    calls = [asyncio.create_task(client.get("/metrics/"))
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


def test_a_streamed_body_goes_out_whole_in_chunks_without_a_length() -> None:
    """``stream``: parts of any size, str or bytes, go out complete, in messages of at most
    CHUNK bytes, with no content-length (the whole is never known)."""
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    parts: list[bytes | str] = ["{", b"", "é" * 1000, b"x" * (2 * _offloop.CHUNK + 5), "y" * 7, "}"]
    asyncio.run(_offloop.stream(send, 200, iter(parts), [(b"content-type", b"application/json")]))
    assert sent[0] == {"type": "http.response.start", "status": 200,
                       "headers": [(b"content-type", b"application/json")]}
    body = b"".join(p.encode() if isinstance(p, str) else p for p in parts)
    assert b"".join(m["body"] for m in sent[1:]) == body
    assert all(len(m["body"]) <= _offloop.CHUNK for m in sent[1:])
    assert [m.get("more_body", False) for m in sent[1:]] == [True] * (len(sent) - 2) + [False]


def test_a_streamed_head_response_makes_no_body() -> None:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    def parts() -> Any:
        raise AssertionError("the body was made for a HEAD request")
        yield ""

    asyncio.run(_offloop.stream(send, 200, parts(), [], head_only=True))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"" and not sent[1].get("more_body")


def test_a_streamed_body_gives_the_loop_a_turn_after_each_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts that each take 0.6 STEP to make (on a clock the test moves): the loop's other
    tasks run after every two, not after the whole body."""
    now = [0.0]
    monkeypatch.setattr(_offloop, "_clock", lambda: now[0])
    log: list[str] = []

    def parts() -> Any:
        for _ in range(50):
            now[0] += 0.6 * _offloop.STEP
            log.append("part")
            yield "x" * 100

    async def send(message: Any) -> None:
        pass

    async def main() -> None:
        done = False

        async def other() -> None:
            while not done:
                log.append("turn")
                await asyncio.sleep(0)

        task = asyncio.create_task(other())
        await asyncio.sleep(0)
        await _offloop.stream(send, 200, parts(), [])
        done = True
        await task

    asyncio.run(main())
    runs = "".join("p" if entry == "part" else " " for entry in log).split()
    assert log.count("part") == 50
    assert max(len(run) for run in runs) == 2, runs
