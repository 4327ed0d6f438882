"""The analytics event of ``/products/{id}``: sent after the response, never the user's problem."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
from conftest_demo import LOOPS, serve, serve_simulator, serve_stack, timed, wait_for
from harness.servers import free_port

from demo_app import Settings, create_app
from demo_app.faults import Behaviour

PRODUCT = {"id": 2, "name": "Product 2", "price": 9.0}
EVENT = {"event": "product_viewed", "product_id": 2}


@pytest.mark.parametrize("loop", LOOPS)
def test_the_event_is_posted_after_the_response_was_sent(loop: str) -> None:
    with serve_stack(loop, rules={"/analytics": Behaviour(delay_ms=400)}) as stack:
        response, seconds = timed(lambda: stack.client.get("/products/2"))
        answered_at = time.time()
        assert response.json() == PRODUCT
        assert seconds < 0.3, seconds  # the user did not wait for the slow sink...
        # Read in-process: the rule would slow GET /analytics/events down as well.
        assert list(stack.sim.events) == []  # ...which has not recorded the event yet
        (recorded,) = wait_for(lambda: list(stack.sim.events))
    assert recorded["event"] == EVENT
    assert recorded["received_at"] > answered_at


def test_a_failing_sink_does_not_change_the_response() -> None:
    with serve_stack(rules={"/analytics": Behaviour(status=500)}) as stack:
        response = stack.client.get("/products/2")
        assert (response.status_code, response.json()) == (200, PRODUCT)
        # The sink was called, and failed.
        wait_for(lambda: stack.sim_stats()["by_path"].get("/analytics/events") == 1)
        assert list(stack.sim.events) == []


def test_a_sink_that_is_down_does_not_change_the_response(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="demo_app.analytics")
    with serve_simulator() as (upstream_url, _):
        settings = Settings(
            upstream_url=upstream_url,
            analytics_url=f"http://127.0.0.1:{free_port()}/analytics/events",
        )
        with serve(create_app(settings, instrument=False), "asyncio") as demo:
            response = httpx.get(f"{demo.url}/products/2")
            assert (response.status_code, response.json()) == (200, PRODUCT)
            # The post was attempted and its failure logged, not raised.
            wait_for(lambda: "was lost: ConnectError" in caplog.text)
