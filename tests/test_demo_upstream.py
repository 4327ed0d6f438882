"""The upstream simulator on a real server: its data, and every fault it can inject."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest_demo import LOOPS, serve_simulator, timed

from demo_app.faults import Behaviour
from demo_app.upstream import create_upstream_app


@pytest.fixture(scope="module", params=LOOPS)
def upstream(request: pytest.FixtureRequest) -> Iterator[str]:
    rules = {"/posts": Behaviour(delay_ms=150), "/posts/2": Behaviour()}
    with serve_simulator(request.param, rules=rules) as (url, _):
        yield url


@pytest.fixture(scope="module")
def shared_client(upstream: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream, timeout=5) as client:
        yield client


@pytest.fixture
def client(shared_client: httpx.Client) -> httpx.Client:
    shared_client.post("/_sim/reset").raise_for_status()
    return shared_client


def test_serves_every_upstream_the_demo_calls(client: httpx.Client) -> None:
    assert client.get("/users/1").json()["name"] == "Leanne Graham"
    orders = client.get("/users/3/orders", params={"limit": 2}).json()
    assert [order["user_id"] for order in orders] == [3, 3]
    assert client.get("/users/3/notifications/count").json() == 3
    assert client.get("/posts/2").json()["id"] == 2
    assert client.get("/products/4").json() == {"id": 4, "name": "Product 4", "price": 18.0}
    assert client.get("/weather", params={"city": "Oslo"}).json()["city"] == "Oslo"


def test_unknown_ids_are_a_real_404(client: httpx.Client) -> None:
    for path in ("/users/101", "/users/0/orders", "/posts/999", "/products/101"):
        assert client.get(path).status_code == 404, path


def test_the_analytics_sink_keeps_events(client: httpx.Client) -> None:
    assert client.post("/analytics/events", json={"event": "a"}).status_code == 202
    client.post("/analytics/events", json={"event": "b"})
    events = client.get("/analytics/events").json()["events"]
    assert [e["event"] for e in events] == [{"event": "a"}, {"event": "b"}]
    client.post("/_sim/reset")
    assert client.get("/analytics/events").json()["events"] == []


def test_stats_count_requests_and_connections_but_not_themselves(client: httpx.Client) -> None:
    client.get("/users/1")
    client.get("/users/1")
    with httpx.Client(base_url=str(client.base_url)) as other:
        other.get("/weather")
    stats = client.get("/_sim/stats").json()
    assert stats == {"requests": 3, "by_path": {"/users/1": 2, "/weather": 1}, "connections": 2}


def test_delay_header(client: httpx.Client) -> None:
    response, seconds = timed(lambda: client.get("/users/1", headers={"X-Sim-Delay-Ms": "200"}))
    assert response.status_code == 200
    assert 0.19 < seconds < 0.6, seconds


def test_jitter_adds_up_to_its_bound(client: httpx.Client) -> None:
    headers = {"X-Sim-Delay-Ms": "20", "X-Sim-Jitter-Ms": "60"}
    durations = [timed(lambda: client.get("/users/1", headers=headers))[1] for _ in range(6)]
    assert all(0.019 < d < 0.4 for d in durations), durations
    assert max(durations) - min(durations) > 0.01, durations  # the extra delay does vary


def test_rules_apply_per_path_prefix_the_longest_winning(client: httpx.Client) -> None:
    assert 0.14 < timed(lambda: client.get("/posts/1"))[1] < 0.6
    assert timed(lambda: client.get("/posts/2"))[1] < 0.1
    assert timed(lambda: client.get("/users/1"))[1] < 0.1


@pytest.mark.parametrize("status", [404, 500, 503])
def test_status_header(client: httpx.Client, status: int) -> None:
    response = client.get("/users/1", headers={"X-Sim-Status": str(status)})
    assert response.status_code == status
    assert response.json() == {"detail": "simulated failure", "status": status}


def test_error_rate(client: httpx.Client) -> None:
    always = [client.get("/users/1", headers={"X-Sim-Error-Rate": "1"}) for _ in range(5)]
    assert {r.status_code for r in always} == {500}
    never = [client.get("/users/1", headers={"X-Sim-Error-Rate": "0"}) for _ in range(5)]
    assert {r.status_code for r in never} == {200}
    some = [client.get("/users/1", headers={"X-Sim-Error-Rate": "0.5"}) for _ in range(40)]
    assert {r.status_code for r in some} == {200, 500}


def test_garbage_is_truncated_json(client: httpx.Client) -> None:
    response = client.get("/users/1", headers={"X-Sim-Garbage": "1"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(ValueError):
        response.json()


def test_hang_lasts_until_the_client_gives_up(client: httpx.Client) -> None:
    with pytest.raises(httpx.ReadTimeout):
        client.get("/users/1", headers={"X-Sim-Hang": "1"}, timeout=0.3)
    # The simulator noticed the disconnect and is free again.
    assert client.get("/users/1").status_code == 200


def test_drop_closes_the_connection_without_a_response(client: httpx.Client) -> None:
    with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        client.get("/users/1", headers={"X-Sim-Drop": "1"})
    assert client.get("/users/1").status_code == 200


def test_drop_reset_resets_the_connection(client: httpx.Client) -> None:
    with pytest.raises(httpx.ReadError):
        client.get("/users/1", headers={"X-Sim-Drop": "reset"})
    assert client.get("/users/1").status_code == 200


def test_a_bad_control_header_is_a_400_that_says_why(client: httpx.Client) -> None:
    response = client.get("/users/1", headers={"X-Sim-Delay-Ms": "soon"})
    assert response.status_code == 400
    assert "X-Sim-Delay-Ms='soon' is invalid" in response.json()["detail"]


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_STATUS", "503")
    assert create_upstream_app().defaults == Behaviour(status=503)
