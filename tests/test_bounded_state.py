"""Nothing loopwatch keeps grows with the number of apps, servers or monitors a process has
seen: series of stopped apps are folded and forgotten, monitors of loops closed without a
shutdown are let go with their hooks, and odd scopes are served like any other."""

from __future__ import annotations

import asyncio
import gc
import resource
import weakref
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch import _hooks, _monitor
from loopwatch._metrics import metrics_for
from harness.asgi import Lifespan
from harness.servers import serve_in_thread
from tests.conftest import run_on


def make_app(registry: CollectorRegistry, **options: Any) -> FastAPI:
    app = FastAPI()
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry, log_blocks=False,
                       **options)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    return app


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_two_thousand_apps_started_and_shut_down_leave_no_series_behind(loop_kind: str) -> None:
    registry = CollectorRegistry()
    metrics = metrics_for(registry)

    async def one_app() -> None:
        app = make_app(registry)
        # lifespan startup, two requests, lifespan shutdown: as a server runs an app
        async with Lifespan(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://t") as client:
                assert (await client.get("/items/1")).status_code == 200
                assert (await client.get("/items/x")).status_code == 422

    async def main(count: int) -> None:
        for _ in range(count):
            await one_app()

    run_on(loop_kind, main(200))
    gc.collect()
    warm = rss_mb()
    run_on(loop_kind, main(1800))
    gc.collect()
    assert metrics._series == [], len(metrics._series)  # none of 2,000 stopped apps is kept
    registry_samples = {(s.name, tuple(sorted(s.labels.items())))
                        for f in registry.collect() for s in f.samples}
    # Counted in full: 2,000 apps x 2 requests, in series that do not multiply with apps.
    assert registry.get_sample_value("loopwatch_requests_total", {
        "method": "GET", "route": "/items/{item_id}", "status": "200"}) == 2000
    assert registry.get_sample_value("loopwatch_requests_total", {
        "method": "GET", "route": "/items/{item_id}", "status": "422"}) == 2000
    assert len(registry_samples) < 150, len(registry_samples)
    # What 1,800 more apps left in memory (max RSS; an app is ~150 kB while it lives).
    assert rss_mb() - warm < 30, (warm, rss_mb())


def test_an_app_with_a_registry_of_its_own_is_let_go_with_it(loop_kind: str) -> None:
    """Apps built with a registry each (a test suite, a process that builds apps as it
    goes): once an app and its registry are dropped, loopwatch holds neither, nor their
    metrics. A registry kept anyway (its metrics refer to it) would keep every metric and
    series of every app the process ever built."""
    registries = []

    async def one_app() -> None:
        registry = CollectorRegistry()
        registries.append(weakref.ref(registry))
        app = make_app(registry)
        async with Lifespan(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://t") as client:
                assert (await client.get("/items/1")).status_code == 200
        assert registry.get_sample_value("loopwatch_requests_total", {
            "method": "GET", "route": "/items/{item_id}", "status": "200"}) == 1

    async def main() -> None:
        for _ in range(20):
            await one_app()

    run_on(loop_kind, main())
    gc.collect()
    alive = [ref for ref in registries if ref() is not None]
    assert not alive, f"{len(alive)} of {len(registries)} registries still held"


@pytest.mark.parametrize("sample_stacks", [True, False])
def test_servers_run_without_lifespan_leave_no_monitor_or_hook(
    loop_kind: str, sample_stacks: bool
) -> None:
    """uvicorn with lifespan off: the monitor starts on the first request and nothing stops
    it; the loop is closed when the server ends. Twenty such runs leave no monitor running,
    and Handle._run as it was."""
    registry = CollectorRegistry()
    for _ in range(20):
        app = make_app(registry, sample_stacks=sample_stacks)
        with serve_in_thread(app, loop=loop_kind, lifespan="off") as server:
            assert httpx.get(server.url + "/items/3").status_code == 200
    del app, server
    gc.collect()

    async def one_more() -> None:  # a new start tidies up whatever is left
        loopwatch.Monitor(log_blocks=False).start().stop()

    run_on(loop_kind, one_more())
    gc.collect()
    assert not [m for m in _monitor._monitors.values() if m.active]
    assert _hooks._handle_users == 0 and not _hooks.handle_hook_installed()


@pytest.mark.parametrize("path", [None, 5, b"/bytes", ""])
def test_a_scope_with_an_odd_path_is_served_and_counted(run: Any, path: Any) -> None:
    """A scope whose path is None, an int, bytes or empty (some test clients and custom
    servers send such): the app runs and answers, the request is counted as <unmatched>."""
    registry = CollectorRegistry()
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope.get("path"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = loopwatch.LoopWatchMiddleware(app, registry=registry, log_blocks=False)
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def main() -> None:
        for _ in range(3):  # the first request starts the monitor; then the C path, if built
            scope = {"type": "http", "method": "GET", "path": path, "headers": []}
            await middleware(scope, receive, send)
            await asyncio.sleep(0)
        middleware._stop()

    run(main())
    assert seen == [path] * 3
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200] * 3
    assert registry.get_sample_value("loopwatch_requests_total", {
        "method": "GET", "route": "<unmatched>", "status": "200"}) == 3
    assert registry.get_sample_value("loopwatch_internal_errors_total") == 0
