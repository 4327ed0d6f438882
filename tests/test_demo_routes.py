"""The demo's routes against the real simulator: happy paths, forwarding, input validation."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest_demo import LOOPS, Stack, serve_stack


@pytest.fixture(scope="module", params=LOOPS)
def shared_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with serve_stack(request.param) as stack:
        yield stack


@pytest.fixture
def stack(shared_stack: Stack) -> Stack:
    """The demo and the simulator, on each loop, with the simulator's counters cleared."""
    shared_stack.reset()
    return shared_stack


def test_data(stack: Stack) -> None:
    response = stack.client.get("/data")
    assert response.status_code == 200
    assert response.json() == stack.upstream.get("/posts/1").json()


def test_user(stack: Stack) -> None:
    response = stack.client.get("/users/3")
    assert response.status_code == 200
    assert response.json()["id"] == 3
    assert stack.sim_stats()["by_path"] == {"/users/3": 1}


def test_dashboard_combines_three_upstream_calls(stack: Stack) -> None:
    body = stack.client.get("/dashboard/4").json()
    assert body["profile"]["id"] == 4
    assert [order["user_id"] for order in body["orders"]] == [4] * 5
    assert body["notification_count"] == 4
    assert stack.sim_stats()["by_path"] == {
        "/users/4": 1,
        "/users/4/orders": 1,
        "/users/4/notifications/count": 1,
    }


def test_resilient(stack: Stack) -> None:
    assert stack.client.get("/resilient/5").json()["id"] == 5


def test_product(stack: Stack) -> None:
    response = stack.client.get("/products/6")
    assert response.json() == {"id": 6, "name": "Product 6", "price": 27.0}


def test_weather(stack: Stack) -> None:
    assert stack.client.get("/weather").json()["city"] == "Berlin"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/antipatterns/sleep?ms=10", {"slept_ms": 10}),
        ("/antipatterns/sync-def?ms=10", {"slept_ms": 10}),
        ("/antipatterns/file-read?ms=10", {"bytes": 4096}),
    ],
)
def test_antipatterns_answer(stack: Stack, path: str, body: dict[str, int]) -> None:
    response = stack.client.get(path)
    assert (response.status_code, response.json()) == (200, body)


def test_cpu_antipattern_computes(stack: Stack) -> None:
    body = stack.client.get("/antipatterns/cpu?ms=20").json()
    assert body["rounds"] > 0
    assert len(body["digest"]) == 64


def test_requests_get_antipattern_calls_the_weather_with_the_delay(stack: Stack) -> None:
    response = stack.client.get("/antipatterns/requests-get?ms=50")
    assert response.json() == stack.upstream.get("/weather").json()
    assert stack.sim_stats()["by_path"] == {"/weather": 2}


def test_sequential_antipattern_gives_the_dashboards_answer(stack: Stack) -> None:
    sequential = stack.client.get("/antipatterns/sequential/4")
    assert sequential.json() == stack.client.get("/dashboard/4").json()


def test_sim_headers_are_forwarded_to_the_upstream(stack: Stack) -> None:
    assert stack.client.get("/dashboard/1", headers={"X-Sim-Status": "503"}).status_code == 502
    assert stack.client.get("/weather", headers={"X-Sim-Garbage": "1"}).status_code == 502
    assert stack.client.get("/weather").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/users/abc",
        "/users/-1",
        "/users/0",
        "/users/101",
        "/users/1000000001",
        "/users/99999999999999999999999",
        "/users/1.5",
        "/dashboard/abc",
        "/resilient/-7",
        "/products/0",
        "/products/101",
        "/dashboard/101",
        "/resilient/101",
        "/antipatterns/sequential/101",
        "/antipatterns/sequential/abc",
        "/antipatterns/requests-get?ms=5001",
        "/antipatterns/requests-get?ms=-1",
        "/antipatterns/sleep?ms=abc",
        "/antipatterns/sleep?ms=5001",
        "/antipatterns/sync-def?ms=-5",
        "/antipatterns/cpu?ms=99999",
        "/antipatterns/file-read?ms=1e3",
    ],
)
def test_bad_input_is_a_422_without_an_upstream_call(stack: Stack, path: str) -> None:
    response = stack.client.get(path)
    assert response.status_code == 422, response.text
    assert stack.sim_stats()["requests"] == 0


def test_the_largest_id_is_the_simulators_last(stack: Stack) -> None:
    response = stack.client.get("/users/100")
    assert response.status_code == 200  # every id the schema allows exists upstream
    assert stack.sim_stats()["requests"] == 1
