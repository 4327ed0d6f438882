"""Every upstream failure, produced for real by the simulator, and the demo's answer to it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest_demo import LOOPS, Stack, serve, serve_stack, timed
from harness.servers import free_port

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


def test_a_user_the_upstream_does_not_have_is_a_404(impatient: Stack) -> None:
    status, detail = answer(impatient, "/resilient/9", Status="404")
    assert status == 404
    assert detail == {"code": "not_found", "message": "user 9 not found", "retryable": False}
    assert impatient.sim_stats()["by_path"] == {"/users/9": 1}


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
    assert answer(impatient, "/dashboard/9", Status="404")[0] == 404
    (status, _), seconds = timed(lambda: answer(impatient, "/dashboard/1", Hang="1"))
    assert status == 504
    assert seconds < TIMEOUT + 1.5  # the three calls time out together, not one after another
    assert answer(impatient, "/dashboard/1", Drop="1")[0] == 502


UPSTREAM_ROUTES = [
    "/data",
    "/users/1",
    "/dashboard/1",
    "/resilient/1",
    "/products/1",
    "/weather",
    "/antipatterns/sequential/1",
    "/antipatterns/requests-get?ms=0",
]


@pytest.mark.parametrize("path", UPSTREAM_ROUTES)
def test_every_route_maps_upstream_failures_to_the_one_error_model(
    impatient: Stack, path: str
) -> None:
    for sim, status, code in [
        ({"Status": "503"}, 502, "upstream_error"),
        ({"Garbage": "1"}, 502, "upstream_invalid_response"),
        ({"Drop": "reset"}, 502, "upstream_unreachable"),
        ({"Status": "404"}, 404, "not_found"),
        ({"Hang": "1"}, 504, "upstream_timeout"),
    ]:
        got, detail = answer(impatient, path, **sim)
        assert (got, detail["code"]) == (status, code), (sim, detail)
        assert set(detail) == {"code", "message", "retryable"}


@pytest.mark.parametrize("path", UPSTREAM_ROUTES)
def test_every_route_declares_the_answers_it_gives(impatient: Stack, path: str) -> None:
    """Each status of the test above, and 422 where there is input to refuse, is in the
    route's OpenAPI entry, with the one error model for the upstream's failures."""
    schema = impatient.client.get("/openapi.json").json()
    concrete = path.partition("?")[0]
    (template,) = [t for t in schema["paths"]
                   if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", t), concrete)]
    responses = schema["paths"][template]["get"]["responses"]
    takes_input = "{" in template or "?" in path  # only input can be refused with a 422
    expected = {"200", "404", "502", "504"} | ({"422"} if takes_input else set())
    assert set(responses) == expected, set(responses)
    for status in ("404", "502", "504"):
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/UpstreamError"


def test_an_upstream_port_with_nothing_listening_is_a_502() -> None:
    settings = Settings(upstream_url=f"http://127.0.0.1:{free_port()}")
    with serve(create_app(settings, instrument=False), "asyncio") as demo:
        response = httpx.get(f"{demo.url}/resilient/1")
    assert response.status_code == 502
    detail = response.json()["detail"]
    assert detail["code"] == "upstream_unreachable"
    assert "ConnectError" in detail["message"]
    assert "127.0.0.1" not in detail["message"]  # the upstream's address is for the log only
