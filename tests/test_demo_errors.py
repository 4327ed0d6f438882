"""Every upstream failure, produced for real by the simulator, and the demo's answer to it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest_demo import LOOPS, Stack, serve, serve_stack, timed
from servers import free_port

from demo_app import Settings, create_app

TIMEOUT = 0.5


@pytest.fixture(scope="module", params=LOOPS)
def shared_impatient(request: pytest.FixtureRequest) -> Iterator[Stack]:
    with serve_stack(request.param, timeout=TIMEOUT, connect_timeout=TIMEOUT) as stack:
        yield stack


@pytest.fixture
def impatient(shared_impatient: Stack) -> Stack:
    """A demo that gives its upstream 0.5 s, and the simulator it calls."""
    shared_impatient.reset()
    return shared_impatient


def answer(stack: Stack, path: str, **sim: str) -> tuple[int, dict[str, Any]]:
    headers = {f"X-Sim-{name.replace('_', '-')}": value for name, value in sim.items()}
    response = stack.client.get(path, headers=headers)
    return response.status_code, response.json()["detail"]


def test_an_upstream_that_hangs_is_a_504_after_the_timeout(impatient: Stack) -> None:
    (status, detail), seconds = timed(lambda: answer(impatient, "/resilient/1", Hang="1"))
    assert status == 504
    assert detail["code"] == "upstream_timeout"
    assert detail["retryable"] is True
    assert "ReadTimeout" in detail["message"]
    assert TIMEOUT * 0.9 < seconds < TIMEOUT + 1.5, seconds


def test_an_unknown_user_is_a_404(impatient: Stack) -> None:
    status, detail = answer(impatient, "/resilient/999")
    assert status == 404
    assert detail == {"code": "not_found", "message": "user 999 not found", "retryable": False}
    assert impatient.sim_stats()["by_path"] == {"/users/999": 1}


def test_an_upstream_404_is_a_404(impatient: Stack) -> None:
    assert answer(impatient, "/resilient/1", Status="404")[0] == 404


def test_an_upstream_500_is_a_retryable_502(impatient: Stack) -> None:
    status, detail = answer(impatient, "/resilient/1", Status="500")
    assert status == 502
    assert detail == {
        "code": "upstream_error",
        "message": "the upstream service answered 500 for user 1",
        "retryable": True,
    }


def test_an_upstream_401_is_a_502_not_worth_retrying(impatient: Stack) -> None:
    status, detail = answer(impatient, "/resilient/1", Status="401")
    assert (status, detail["code"], detail["retryable"]) == (502, "upstream_error", False)


def test_random_upstream_errors_are_502s(impatient: Stack) -> None:
    assert answer(impatient, "/resilient/1", Error_Rate="1")[0] == 502


def test_a_dropped_connection_is_a_502(impatient: Stack) -> None:
    status, detail = answer(impatient, "/resilient/1", Drop="close")
    assert (status, detail["code"]) == (502, "upstream_unreachable")
    assert "RemoteProtocolError" in detail["message"]
    # The pool discarded the dead connection: the next call works.
    assert impatient.client.get("/resilient/1").status_code == 200


def test_a_reset_connection_is_a_502(impatient: Stack) -> None:
    status, detail = answer(impatient, "/resilient/1", Drop="reset")
    assert (status, detail["code"]) == (502, "upstream_unreachable")
    assert "ReadError" in detail["message"]
    assert impatient.client.get("/resilient/1").status_code == 200


def test_garbage_json_is_a_502(impatient: Stack) -> None:
    status, detail = answer(impatient, "/resilient/1", Garbage="1")
    assert (status, detail["code"]) == (502, "upstream_invalid_response")


def test_the_dashboard_maps_the_failure_of_any_of_its_calls(impatient: Stack) -> None:
    assert answer(impatient, "/dashboard/999")[0] == 404
    (status, _), seconds = timed(lambda: answer(impatient, "/dashboard/1", Hang="1"))
    assert status == 504
    assert seconds < TIMEOUT + 1.5  # the three calls time out together, not one after another
    assert answer(impatient, "/dashboard/1", Drop="1")[0] == 502


@pytest.mark.parametrize("path", ["/data", "/users/1", "/products/1", "/weather"])
def test_every_route_maps_upstream_failures(impatient: Stack, path: str) -> None:
    assert answer(impatient, path, Status="503")[0] == 502
    assert answer(impatient, path, Garbage="1")[0] == 502


def test_an_upstream_port_with_nothing_listening_is_a_502() -> None:
    settings = Settings(upstream_url=f"http://127.0.0.1:{free_port()}")
    with serve(create_app(settings, instrument=False), "asyncio") as demo:
        response = httpx.get(f"{demo.url}/resilient/1")
    assert response.status_code == 502
    detail = response.json()["detail"]
    assert detail["code"] == "upstream_unreachable"
    assert "ConnectError" in detail["message"]
    assert "127.0.0.1" not in detail["message"]  # the upstream's address is for the log only
