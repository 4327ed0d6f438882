"""Route labels are templates of the app's own routing, for every way of adding a route, never
a concrete path: a real uvicorn server, a real client, both loops."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router
from starlette.staticfiles import StaticFiles

import loopwatch
from loopwatch._metrics import metrics_for
from harness.servers import serve_in_thread


async def hello(request: Any) -> PlainTextResponse:
    return PlainTextResponse("hi")


class RawApp:
    """A mounted ASGI app with no routes of its own."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("raw")(scope, receive, send)


def build_app(registry: CollectorRegistry, static_dir: Path) -> FastAPI:
    app = FastAPI()
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry)

    @app.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        return {"user": user_id}

    async def shared() -> dict[str, str]:
        return {}

    app.add_api_route("/one/{a}", shared)  # the same endpoint under two templates
    app.add_api_route("/two/{b}", shared)
    app.add_route("/added/{x}", hello)
    app.add_route("/loopwatch/events", loopwatch.events_app())

    api = APIRouter(prefix="/api")

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    admin = APIRouter(prefix="/admin")

    @admin.get("/things/{thing}")
    async def thing(thing: str) -> dict[str, str]:
        return {"thing": thing}

    api.include_router(admin)
    app.include_router(api, prefix="/v1")
    app.mount("/blobs/{bucket}", Starlette(routes=[Route("/k/{key}", hello)]))
    app.mount("/raw/{b}", RawApp())
    app.mount("/nest/{n}", Router(routes=[Mount("/deeper/{d}", routes=[
        Route("/leaf/{leaf}", hello)])]))
    app.mount("/wrapped/{w}", GZipMiddleware(Starlette(routes=[Route("/in/{i}", hello)])))
    app.mount("/static", StaticFiles(directory=static_dir))
    app.router.routes.append(Host("{sub}.example.com", app=Router(routes=[
        Route("/h/{z}", hello)])))
    return app


# (path requested, Host header or None, status, route label)
EXPECTED = [
    ("/users/7", None, 200, "/users/{user_id}"),
    ("/one/1", None, 200, "/one/{a}"),
    ("/two/2", None, 200, "/two/{b}"),
    ("/added/5", None, 200, "/added/{x}"),
    ("/loopwatch/events", None, 200, "/loopwatch/events"),
    ("/docs", None, 200, "/docs"),
    ("/openapi.json", None, 200, "/openapi.json"),
    ("/v1/api/items/3", None, 200, "/v1/api/items/{item_id}"),
    ("/v1/api/admin/things/t", None, 200, "/v1/api/admin/things/{thing}"),
    ("/blobs/b1/k/kk", None, 200, "/blobs/{bucket}/k/{key}"),
    ("/blobs/b1/nothing", None, 404, "<unmatched>"),
    ("/raw/zz/anything/at/all", None, 200, "/raw/{b}/{path}"),
    ("/nest/1/deeper/2/leaf/3", None, 200, "/nest/{n}/deeper/{d}/leaf/{leaf}"),
    ("/wrapped/w1/in/i1", None, 200, "/wrapped/{w}/{path}"),
    ("/static/hello.txt", None, 200, "/static/{path}"),
    ("/h/9", "api.example.com", 200, "/h/{z}"),
    ("/nope/nothing", None, 404, "<unmatched>"),
]


def labels(registry: CollectorRegistry) -> dict[str, set[str]]:
    """route label -> statuses seen, from loopwatch_requests_total."""
    metrics_for(registry).flush()
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        if family.name == "loopwatch_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out.setdefault(sample.labels["route"], set()).add(sample.labels["status"])
    return out


@pytest.fixture
def static_dir(tmp_path: Path) -> Path:
    (tmp_path / "hello.txt").write_text("hello")
    return tmp_path


def test_every_kind_of_route_is_labelled_with_its_template(
    loop_kind: str, static_dir: Path
) -> None:
    registry = CollectorRegistry()
    app = build_app(registry, static_dir)
    with serve_in_thread(app, loop=loop_kind) as server:
        with httpx.Client(base_url=server.url) as client:
            for path, host, status, _ in EXPECTED:
                headers = {"host": host} if host else {}
                assert client.get(path, headers=headers).status_code == status, path
    seen = labels(registry)
    for path, _, status, label in EXPECTED:
        assert str(status) in seen.get(label, set()), (path, label, seen)
    assert set(seen) == {label for *_, label in EXPECTED}, set(seen)


def test_mounts_with_path_parameters_never_mint_labels(loop_kind: str, static_dir: Path) -> None:
    """1,000 buckets under Mount("/blobs/{bucket}") and Mount("/raw/{b}"): two labels, the
    registry's series do not grow with the buckets."""
    registry = CollectorRegistry()
    app = build_app(registry, static_dir)

    async def hammer(url: str) -> None:
        async with httpx.AsyncClient(base_url=url) as client:
            for start in range(0, 1000, 50):
                await asyncio.gather(*(client.get(f"/blobs/b{i}/k/k{i}")
                                       for i in range(start, start + 50)))
                await asyncio.gather(*(client.get(f"/raw/r{i}/x") for i in range(start, start + 50)))

    with serve_in_thread(app, loop=loop_kind) as server:
        asyncio.run(hammer(server.url))
    seen = labels(registry)
    assert set(seen) == {"/blobs/{bucket}/k/{key}", "/raw/{b}/{path}"}, sorted(seen)[:10]
    series = sum(len(f.samples) for f in registry.collect())
    assert series < 200, series


def test_a_pure_asgi_app_without_routes_is_unmatched(run: Any) -> None:
    registry = CollectorRegistry()
    app = loopwatch.LoopWatchMiddleware(RawApp(), registry=registry)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            for i in range(20):
                assert (await client.get(f"/anything/{i}")).status_code == 200

    run(main())
    assert set(labels(registry)) == {"<unmatched>"}


def test_routes_added_after_the_first_request_get_their_template(run: Any) -> None:
    registry = CollectorRegistry()
    app = Starlette(routes=[Route("/first", hello)])
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as client:
            assert (await client.get("/first")).status_code == 200
            app.router.routes.append(Route("/later/{n}", hello))  # an endpoint it knows
            await asyncio.sleep(1.1)  # the middleware looks at the routes once a second
            assert (await client.get("/later/1")).status_code == 200

    run(main())
    assert set(labels(registry)) == {"/first", "/later/{n}"}


def test_the_pure_python_path_labels_the_same(static_dir: Path) -> None:
    """The same routes on the pure-Python path (LOOPWATCH_PURE_PYTHON=1, a process of its
    own: the path is chosen at import)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.argv = ['x', '-q', '-p', 'no:cacheprovider', "
        f"'{__file__}::test_every_kind_of_route_is_labelled_with_its_template', "
        "'-k', 'asyncio']\n"
        "import loopwatch._accel as a; assert a.ctiming is None, 'not pure'\n"
        "import pytest; raise SystemExit(pytest.main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, LOOPWATCH_PURE_PYTHON="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
