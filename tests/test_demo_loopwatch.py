"""The demo watched by loopwatch: its metrics and block events name the guilty route and line.

These need ``create_app(instrument=True)``, i.e. the loopwatch middleware and apps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest_demo import LOOPS, serve, serve_simulator
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from harness.servers import free_port, serve_in_subprocess

import demo_app.antipatterns
from demo_app import Settings, create_app

SOURCE = Path(demo_app.antipatterns.__file__)


def line_of(text: str) -> int:
    """The line of antipatterns.py holding ``text``: where loopwatch must point."""
    lines = SOURCE.read_text().splitlines()
    (number,) = [n for n, line in enumerate(lines, start=1) if text in line]
    return number


class Instrumented:
    def __init__(self, client: httpx.Client, registry: CollectorRegistry) -> None:
        self.client = client
        self.registry = registry

    def blocking_sum(self, route: str) -> float:
        """``loopwatch_request_blocking_seconds_sum`` for GET ``route``, scraped from /metrics."""
        text = self.client.get("/metrics/").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "loopwatch_request_blocking_seconds_sum" and sample.labels == {
                    "method": "GET",
                    "route": route,
                }:
                    return float(sample.value)
        return 0.0

    def events(self, route: str) -> list[dict[str, object]]:
        events = self.client.get("/loopwatch/events/").json()["events"]
        return [event for event in events if event["route"] == route]


@pytest.fixture(scope="module", params=LOOPS)
def instrumented(request: pytest.FixtureRequest) -> Iterator[Instrumented]:
    registry = CollectorRegistry()
    with serve_simulator(request.param) as (upstream_url, _):
        app = create_app(Settings(upstream_url=upstream_url), registry=registry)
        with (
            serve(app, request.param) as demo,
            httpx.Client(base_url=demo.url, timeout=10) as client,
        ):
            yield Instrumented(client, registry)


# route template, URL, the text of the blocking line in antipatterns.py
BLOCKS = [
    (
        "/antipatterns/sleep",
        "/antipatterns/sleep?ms=300",
        "time.sleep(ms / 1000)  # noqa: ASYNC251",
    ),
    ("/antipatterns/requests-get", "/antipatterns/requests-get?ms=300", "requests.get(url"),
    ("/antipatterns/file-read", "/antipatterns/file-read?ms=300", "data = source.read()"),
]


@pytest.mark.parametrize(("route", "url", "blocking_line"), BLOCKS)
def test_a_block_is_charged_to_its_route_and_line(
    instrumented: Instrumented, route: str, url: str, blocking_line: str
) -> None:
    before = instrumented.blocking_sum(route)
    assert instrumented.client.get(url).status_code == 200
    assert instrumented.blocking_sum(route) - before >= 0.25
    events = instrumented.events(route)
    assert events, f"no block event for {route}"
    event = events[-1]
    assert event["method"] == "GET"
    assert 0.25 <= float(event["duration"]) < 1.5  # type: ignore[arg-type]
    line = line_of(blocking_line)
    frames = {(Path(str(f["file"])).name, f["line"]) for f in event["frames"]}  # type: ignore[attr-defined]
    assert (SOURCE.name, line) in frames, event
    assert str(event["location"]).endswith(f"{SOURCE.name}:{line}"), event


def test_cpu_bound_work_is_charged_to_its_loop(instrumented: Instrumented) -> None:
    route = "/antipatterns/cpu"
    assert instrumented.client.get("/antipatterns/cpu?ms=300").status_code == 200
    events = instrumented.events(route)
    assert events, f"no block event for {route}"
    event = events[-1]
    loop_lines = {line_of("while time.perf_counter() < deadline:"), line_of("hashlib.sha256(")}
    assert {f["line"] for f in event["frames"] if f["file"].endswith(SOURCE.name)} & loop_lines  # type: ignore[attr-defined]


def test_an_awaiting_route_is_not_blamed(instrumented: Instrumented) -> None:
    route = "/weather"
    response = instrumented.client.get("/weather", headers={"X-Sim-Delay-Ms": "300"})
    assert response.status_code == 200
    assert instrumented.blocking_sum(route) < 0.05
    assert instrumented.events(route) == []


def test_the_live_page_reads_the_demos_registry(instrumented: Instrumented) -> None:
    """The page's route table comes from the registry the demo's middleware writes to (here
    one of the test's own, not the global one)."""
    assert instrumented.client.get("/antipatterns/sleep?ms=150").status_code == 200
    rows = instrumented.client.get("/loopwatch/api/state").json()["routes"]["rows"]
    sleep = [row for row in rows if row["route"] == "/antipatterns/sleep"]
    assert sleep and sleep[0]["requests"] >= 1 and sleep[0]["blocks"] >= 1, rows


def test_python_m_demo_app_serves_metrics_and_events() -> None:
    """The demo as a user runs it, here calling an upstream of ours (``--no-upstream``)."""
    port = free_port()
    args = ["-m", "demo_app", "--no-upstream", "--port", str(port)]
    with serve_simulator() as (upstream_url, sim):
        env: dict[str, str | None] = {"DEMO_UPSTREAM_URL": upstream_url}
        with serve_in_subprocess(args, port=port, env=env, path="/docs") as proc:
            base = f"http://127.0.0.1:{port}"
            assert httpx.get(f"{base}/users/2").json()["id"] == 2
            httpx.get(f"{base}/antipatterns/sleep?ms=200")
            metrics = httpx.get(f"{base}/metrics", follow_redirects=True).text
            events = httpx.get(f"{base}/loopwatch/events", follow_redirects=True).json()["events"]
            page = httpx.get(f"{base}/loopwatch/")
            state = httpx.get(f"{base}/loopwatch/api/state").json()
            proc.terminate()
            banner = proc.communicate(timeout=10)[0].decode()
        assert sim.by_path == {"/users/2": 1}
    sample = 'loopwatch_request_blocking_seconds_sum{method="GET",route="/antipatterns/sleep"}'
    assert sample in metrics
    assert any(event["route"] == "/antipatterns/sleep" for event in events)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert any(event["route"] == "/antipatterns/sleep" for event in state["events"]), state
    for url in (f"{base}/docs", f"{base}/loopwatch/", f"{base}/metrics/",
                f"{base}/loopwatch/events/", upstream_url):
        assert url in banner
