"""What the article is about: awaiting keeps the loop serving, blocking stops it.

Timing bounds are honest: the lower bound shows the delay really happened, the upper one
leaves room for a loaded machine without letting the wrong behaviour pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator

import httpx
import pytest
from conftest_demo import LOOPS, Stack, serve, serve_simulator, serve_stack, timed

from demo_app import Settings, create_app


@pytest.fixture(scope="module", params=LOOPS)
def shared_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with serve_stack(request.param) as stack:
        yield stack


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    """The demo and the simulator, on each loop, with the simulator's counters cleared."""
    shared_stack.reset()
    return shared_stack


@pytest.fixture(scope="module")
def asyncio_stack() -> Iterator[Stack]:
    """The demo on asyncio only: the loop implementation cannot change whether a call blocks."""
    with serve_stack("asyncio") as stack:
        yield stack


DELAY = {"X-Sim-Delay-Ms": "200"}


def test_dashboard_takes_as_long_as_its_slowest_call(stack: Stack) -> None:
    stack.client.get("/dashboard/1")  # open the connections to the simulator first
    # The best of three: a busy machine can only add latency, never remove the 200 ms.
    runs = [timed(lambda: stack.client.get("/dashboard/1", headers=DELAY)) for _ in range(3)]
    assert {response.status_code for response, _ in runs} == {200}
    seconds = min(seconds for _, seconds in runs)
    assert 0.2 <= seconds < 0.3, seconds


def test_sequential_awaits_take_the_sum_of_the_calls(stack: Stack) -> None:
    response, seconds = timed(lambda: stack.client.get("/antipatterns/sequential/1", headers=DELAY))
    assert response.status_code == 200
    assert 0.6 <= seconds < 0.9, seconds


async def _quick_request_during(stack: Stack, path: str, headers: dict[str, str]) -> float:
    """Seconds that ``/users/1``, sent 0.1 s after ``path`` started, takes to be answered."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=10) as client:
        slow = asyncio.create_task(client.get(path, headers=headers))
        await asyncio.sleep(0.1)
        quick, seconds = await _timed(client.get("/users/1"))
        assert quick.status_code == 200
        assert (await slow).status_code == 200
    return seconds


async def _timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    start = time.perf_counter()
    response = await request
    return response, time.perf_counter() - start


# Each blocks the loop for 500 ms, so a request sent 100 ms later waits ~400 ms.
BLOCKING = [
    "/antipatterns/sleep?ms=500",
    "/antipatterns/requests-get?ms=500",
    "/antipatterns/cpu?ms=500",
    "/antipatterns/file-read?ms=500",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("path", BLOCKING)
async def test_a_blocking_route_stalls_every_other_request(asyncio_stack: Stack, path: str) -> None:
    seconds = await _quick_request_during(asyncio_stack, path, {})
    assert seconds >= 0.3, f"{path} did not hold up a concurrent request ({seconds:.3f} s)"


# Each takes 500 ms too, without blocking the loop.
NON_BLOCKING = [
    ("/weather", {"X-Sim-Delay-Ms": "500"}),
    ("/dashboard/1", {"X-Sim-Delay-Ms": "500"}),
    ("/antipatterns/sequential/1", {"X-Sim-Delay-Ms": "170"}),
    ("/antipatterns/sync-def?ms=500", {}),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "headers"), NON_BLOCKING)
async def test_an_awaiting_route_leaves_the_loop_free(
    asyncio_stack: Stack, path: str, headers: dict[str, str]
) -> None:
    seconds = await _quick_request_during(asyncio_stack, path, headers)
    assert seconds < 0.2, f"{path} held up a concurrent request ({seconds:.3f} s)"


@pytest.mark.asyncio
async def test_sync_def_routes_queue_once_the_thread_pool_is_exhausted(
    asyncio_stack: Stack,
) -> None:
    """45 concurrent requests to a 300 ms ``def`` route: 40 threads, so two waves."""
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=asyncio_stack.url, timeout=10, limits=limits) as client:
        start = time.perf_counter()
        held = [asyncio.create_task(client.get("/antipatterns/sync-def?ms=300")) for _ in range(45)]
        await asyncio.sleep(0.1)
        quick, quick_seconds = await _timed(client.get("/users/1"))
        responses = await asyncio.gather(*held)
        total = time.perf_counter() - start
    assert {r.status_code for r in responses} == {200}
    assert quick.status_code == 200
    assert quick_seconds < 0.2, quick_seconds  # the loop itself stayed free...
    assert 0.6 <= total < 1.5, total  # ...but the last 5 waited for a thread


@pytest.mark.asyncio
async def test_the_shared_client_keeps_to_its_pool() -> None:
    """200 requests, 20 at a time, reach the simulator over at most the pool's 10 connections."""
    with serve_stack(max_connections=10, max_keepalive_connections=10) as stack:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(base_url=stack.url, timeout=10, limits=limits) as client:
            queue = list(range(200))

            async def user() -> None:
                while queue:
                    queue.pop()
                    response = await client.get("/data", headers={"X-Sim-Delay-Ms": "10"})
                    assert response.status_code == 200

            await asyncio.gather(*(user() for _ in range(20)))
        stats = stack.sim_stats()
    assert stats["requests"] == 200
    # More than one (the calls did overlap), never more than the pool allows.
    assert 2 <= stats["connections"] <= 10, stats


def test_the_client_lives_from_startup_to_shutdown() -> None:
    with serve_simulator() as (upstream_url, _):
        app = create_app(Settings(upstream_url=upstream_url), instrument=False)
        assert getattr(app.state, "http_client", None) is None
        with serve(app, "asyncio") as demo:
            client = app.state.http_client
            assert httpx.get(f"{demo.url}/data").status_code == 200
            assert httpx.get(f"{demo.url}/users/1").status_code == 200
            assert app.state.http_client is client
            assert not client.is_closed
        assert client.is_closed
