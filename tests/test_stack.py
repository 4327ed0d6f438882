"""End-to-end: the dashboard and the rules against a real Prometheus on loopback.

``test_stack_end_to_end`` runs the real stack (``python -m dashboards.stack``'s :class:`Stack`:
upstream simulator, demo app, Prometheus from the system packages with the repository's rule
files), drives the demo's load generator plus an event-loop-blocking anti-pattern, and asserts
through Prometheus's HTTP API that

* every query of every dashboard panel, with the template variables substituted as Grafana
  would, returns data (at least one finite sample), and
* ``LoopwatchEventLoopBlocked`` goes to ``firing`` while the anti-pattern runs and back to
  ``inactive`` after it stops.

Alert hold durations: the stack caps every alert's ``for:`` at ``ALERT_FOR`` in a generated copy
of the rule files (``--alert-for``); expressions, thresholds and rate windows are the repository's.
The unmodified ``for:`` durations are covered by promtool unit tests (tests/test_rules.py).

``test_contract_exporter`` does the same against a hand-written exporter that serves exactly the
metric names and labels of loopwatch's metric contract: it checks the dashboard and rules against
the contract itself, independently of the demo. Its anti-pattern also makes it shed requests
(as loopwatch's opt-in admission would): the demo runs without admission, so there the
load-shedding panels read their 0 fallback, and this is where their real series are proven.
While it blocks, one of its routes spends most of its latency waiting (delay from others), so
``LoopwatchRouteDelayedByOthers`` fires for that route alone.

In the demo, the delay is the real loopwatch's: the load generator's routes await the upstream
simulator while the anti-pattern holds the loop with ``time.sleep``, so their I/O wake-ups and
first steps wait behind it; ``test_stack_end_to_end`` checks that the *Who waited on whom* panels
show a route other than the anti-pattern suffering delay.
"""

from __future__ import annotations

import math
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboards.stack import panels, promapi  # noqa: E402 (after the sys.path line)
from dashboards.stack.demo import Stack  # noqa: E402
from dashboards.stack.durations import parse_duration  # noqa: E402
from tests.needs import missing  # noqa: E402 (after the sys.path line)

if TYPE_CHECKING:
    from typing_extensions import Self


@pytest.fixture(autouse=True)
def _prometheus_binary() -> None:
    """Skip without the prometheus binary; under CI (``CI`` set), where it must be, fail."""
    if not (shutil.which("prometheus") or Path("/usr/bin/prometheus").exists()):
        missing("needs the prometheus binary (Debian package `prometheus`)")


BLOCKED_ALERT = "LoopwatchEventLoopBlocked"
ALERT_FOR = "5s"
# A route of the demo that blocks the event loop with time.sleep for `ms` milliseconds.
ANTI_PATTERN_PATH = "/antipatterns/sleep?ms=150"
ANTI_PATTERN_CONCURRENCY = 2  # enough to keep the loop blocked; few enough to let scrapes through


def assert_all_panels_have_data(stack: Stack, timeout: float) -> list[panels.PanelResult]:
    dashboard = panels.load_dashboard()
    variables = stack.panel_variables(dashboard)
    results: list[panels.PanelResult] = []

    def all_ok() -> bool:
        nonlocal results
        results = panels.check_panels(stack.prometheus_url, dashboard, variables)
        return all(r.ok for r in results)

    try:
        promapi.wait_for(all_ok, timeout=timeout, interval=1.0, what="every panel query to return data")
    except TimeoutError:
        pytest.fail("panel queries without data:\n" + panels.format_panel_results(results))
    assert len(results) == len(panels.panel_targets(dashboard)) > 20
    return results


def per_route_panels(stack: Stack, titles: set[str]) -> dict[str, dict[str, float]]:
    """Panel title -> {route: value} of each titled per-route panel's query, run now as
    Grafana would run it with every variable at "All"."""
    dashboard = panels.load_dashboard()
    results = panels.check_panels(stack.prometheus_url, dashboard, stack.panel_variables(dashboard))
    return {
        r.target.panel: {s["metric"]["route"]: float(s["value"][1]) for s in r.samples or []}
        for r in results
        if r.target.panel in titles
    }


DELAY_PANEL = "Delay suffered from others by route"
HELD_PANEL = "Loop time held by route, beside the delay"
SHARE_PANEL = "Share of latency spent waiting on others"


def wait_for_alert(stack: Stack, state: str, timeout: float) -> float:
    start = time.monotonic()
    promapi.wait_for(
        lambda: stack.alert_state(BLOCKED_ALERT) == state,
        timeout=timeout,
        what=f"{BLOCKED_ALERT} to be {state}",
    )
    return time.monotonic() - start


# --------------------------------------------------------------------------------------------
# The real demo


class AntiPattern:
    """Threads that keep requesting a blocking route of the demo until stopped (bounded in time)."""

    def __init__(self, url: str, concurrency: int, max_seconds: float = 120.0) -> None:
        import httpx

        self._client = httpx.Client(timeout=10.0)
        self._url = url
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self.responses: dict[int, int] = {}
        self.errors = 0
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)
        ]

    def _run(self) -> None:
        import httpx

        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                status = self._client.get(self._url).status_code
                self.responses[status] = self.responses.get(status, 0) + 1
            except httpx.HTTPError:
                self.errors += 1

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)
        self._client.close()


def assert_routes_wait_on_the_anti_pattern(stack: Stack, timeout: float) -> None:
    """The real loopwatch charges delay to the demo's routes that wait behind the anti-patterns
    (the test's, and those in the load generator's mix): some route that never blocks suffers
    delay, an anti-pattern holds the most loop time, and no route's delay is more than its
    duration."""
    seen: dict[str, dict[str, float]] = {}

    def waiting_seen() -> bool:
        nonlocal seen
        seen = per_route_panels(stack, {DELAY_PANEL, HELD_PANEL, SHARE_PANEL})
        delay, held, share = (seen.get(t, {}) for t in (DELAY_PANEL, HELD_PANEL, SHARE_PANEL))
        victims = [v for r, v in delay.items() if not r.startswith("/antipatterns/")]
        shares = [v for v in share.values() if math.isfinite(v)]
        return (
            any(v > 0 for v in victims)
            and bool(held) and max(held, key=held.__getitem__).startswith("/antipatterns/")
            and bool(shares) and all(0 <= v <= 1.0 + 1e-9 for v in shares)
        )

    try:
        promapi.wait_for(waiting_seen, timeout=timeout, interval=1.0, what="the delay series")
    except TimeoutError:
        pytest.fail(f"the 'Who waited on whom' panels do not show the routes waiting: {seen}")


@pytest.mark.slow
def test_stack_end_to_end(tmp_path: Path) -> None:
    with Stack(data_dir=tmp_path / "stack", alert_for=ALERT_FOR) as stack:
        stack.wait_until_scraped(timeout=30)
        assert stack.alert_state(BLOCKED_ALERT) == "inactive"

        stack.start_load("--duration", "0", "--concurrency", "4")
        with AntiPattern(stack.url("demo") + ANTI_PATTERN_PATH, ANTI_PATTERN_CONCURRENCY) as anti:
            wait_for_alert(stack, "firing", timeout=60)
            assert_all_panels_have_data(stack, timeout=60)
            assert_routes_wait_on_the_anti_pattern(stack, timeout=30)
            assert stack.alert_state(BLOCKED_ALERT) == "firing"
        assert anti.responses.get(200, 0) > 0, (
            f"anti-pattern route never answered 200: {anti.responses}"
        )
        stack.stop_process("load")

        # The 1m rate window has to slide past the blocks: about a minute.
        took = wait_for_alert(stack, "inactive", timeout=100)
        assert took > 20, f"alert resolved after {took:.0f}s, before its 1m window could clear"
        # Nothing left that blocks: the recorded share of time blocked is back to ~0.
        blocked = stack.query("instance:loopwatch_event_loop_block_duration_seconds_sum:rate1m")
        assert blocked and all(float(s["value"][1]) < 0.1 for s in blocked), blocked


# --------------------------------------------------------------------------------------------
# A hand-written exporter with loopwatch's metric contract


SHED_ROUTE = "/items/{item_id}"
SHED_PER_S = 4.0
# While the anti-pattern blocks, this route's requests take 100 ms, 80 ms of it waiting.
DELAYED_ROUTE = "/items/{item_id}"
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BLOCK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0.0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float, n: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += n
        self.sum += value * n

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, cum = [], 0.0
        for b, c in zip([*self.buckets, math.inf], self.counts, strict=False):
            cum += c
            le = "+Inf" if b == math.inf else repr(float(b))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {cum}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {cum}")
        return out


class ContractExporter:
    """Serves /metrics with loopwatch's metric names; ``blocking`` switches an anti-pattern on.

    Values grow with wall time at fixed rates, as a steadily loaded app's would.
    """

    def __init__(self) -> None:
        self.blocking = False
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self.busy = 0.0
        self.lag = _Histogram(LAG_BUCKETS)
        self.blocks: dict[tuple[str, str], _Histogram] = {}
        self.req_blocking: dict[tuple[str, str], _Histogram] = {}
        self.req_delayed: dict[tuple[str, str], _Histogram] = {}
        self.duration: dict[tuple[str, str], _Histogram] = {}
        self.requests: dict[tuple[str, str, str], float] = {}
        self.shed: dict[tuple[str, str], float] = {}
        self.shedding = 0

    def _request(
        self, route: str, status: str, per_s: float, dt: float, dur: float, loop: float,
        delayed: float,
    ) -> None:
        key = ("GET", route)
        self.requests[("GET", route, status)] = (
            self.requests.get(("GET", route, status), 0) + per_s * dt
        )
        self.duration.setdefault(key, _Histogram(HTTP_BUCKETS)).observe(dur, per_s * dt)
        self.req_blocking.setdefault(key, _Histogram(LAG_BUCKETS)).observe(loop, per_s * dt)
        self.req_delayed.setdefault(key, _Histogram(LAG_BUCKETS)).observe(delayed, per_s * dt)

    def _advance(self) -> None:
        now = time.monotonic()
        dt, self._last = now - self._last, now
        self.lag.observe(0.0008, 100 * dt)
        self.busy += 0.2 * dt
        # Calm, a request waits on others a few ms; while the anti-pattern blocks, the requests
        # of DELAYED_ROUTE wait behind it for most of their duration.
        slow = self.blocking
        self._request(DELAYED_ROUTE, "200", 20, dt, 0.1 if slow else 0.02, 0.004,
                      0.08 if slow else 0.002)
        self._request(DELAYED_ROUTE, "502", 1, dt, 0.1 if slow else 0.05, 0.004,
                      0.08 if slow else 0.002)
        self._request("/sync", "200", 5, dt, 0.3, 0.001, 0.002)
        if self.blocking:
            self.lag.observe(0.2, 6 * dt)
            self.busy += 0.6 * dt
            # Each waits a little on the other anti-pattern requests, never on itself.
            self._request("/antipatterns/sleep", "200", 6, dt, 0.3, 0.15, 0.05)
            self.blocks.setdefault(
                ("GET", "/antipatterns/sleep"), _Histogram(BLOCK_BUCKETS)
            ).observe(0.15, 6 * dt)
            # The admission answers 503 to some of the requests meanwhile (as with admission=).
            key = ("GET", SHED_ROUTE)
            self.shed[key] = self.shed.get(key, 0) + SHED_PER_S * dt
        self.shedding = int(self.blocking)
        # a rare block outside any request
        self.blocks.setdefault(("<none>", "<none>"), _Histogram(BLOCK_BUCKETS)).observe(
            0.12, 0.01 * dt
        )

    def render(self) -> str:
        with self._lock:
            self._advance()
            out = ["# TYPE loopwatch_event_loop_lag_seconds histogram"]
            out += self.lag.lines("loopwatch_event_loop_lag_seconds", "")
            out += [
                "# TYPE loopwatch_event_loop_busy_seconds_total counter",
                f"loopwatch_event_loop_busy_seconds_total {self.busy}",
            ]
            out.append("# TYPE loopwatch_event_loop_block_duration_seconds histogram")
            for (m, r), h in self.blocks.items():
                out += h.lines(
                    "loopwatch_event_loop_block_duration_seconds", f'method="{m}",route="{r}"'
                )
            out.append("# TYPE loopwatch_request_blocking_seconds histogram")
            for (m, r), h in self.req_blocking.items():
                out += h.lines("loopwatch_request_blocking_seconds", f'method="{m}",route="{r}"')
            out.append("# TYPE loopwatch_request_delayed_seconds histogram")
            for (m, r), h in self.req_delayed.items():
                out += h.lines("loopwatch_request_delayed_seconds", f'method="{m}",route="{r}"')
            out.append("# TYPE loopwatch_request_duration_seconds histogram")
            for (m, r), h in self.duration.items():
                out += h.lines("loopwatch_request_duration_seconds", f'method="{m}",route="{r}"')
            out.append("# TYPE loopwatch_requests_total counter")
            for (m, r, s), v in self.requests.items():
                out.append(f'loopwatch_requests_total{{method="{m}",route="{r}",status="{s}"}} {v}')
            out.append("# TYPE loopwatch_requests_in_progress gauge")
            for m, r in self.duration:
                out.append(f'loopwatch_requests_in_progress{{method="{m}",route="{r}"}} 1')
            out.append("# TYPE loopwatch_requests_shed_total counter")
            for (m, r), v in self.shed.items():
                out.append(f'loopwatch_requests_shed_total{{method="{m}",route="{r}"}} {v}')
            out += [
                "# TYPE loopwatch_shedding gauge",
                f"loopwatch_shedding {self.shedding}",
                "# TYPE loopwatch_threadpool_threads_busy gauge",
                "loopwatch_threadpool_threads_busy 3",
                "# TYPE loopwatch_threadpool_threads_limit gauge",
                "loopwatch_threadpool_threads_limit 40",
                "# TYPE loopwatch_threadpool_tasks_waiting gauge",
                "loopwatch_threadpool_tasks_waiting 0",
                "# TYPE loopwatch_internal_errors_total counter",
                "loopwatch_internal_errors_total 0",
            ]
            return "\n".join(out) + "\n"


@pytest.fixture
def contract_exporter() -> Iterator[tuple[ContractExporter, str]]:
    exporter = ContractExporter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exporter.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield exporter, f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def assert_shedding_panels_read_the_shed_series(stack: Stack, timeout: float) -> None:
    """The load-shedding panels show the exporter's shed route shedding and the exporter as
    shedding: values only the shed series give (their fallback reads 0)."""
    dashboard = panels.load_dashboard()
    variables = stack.panel_variables(dashboard)
    shed_panels = {"Shed requests by route", "Instances shedding"}
    seen: dict[str, list[dict[str, object]]] = {}

    def shedding_seen() -> bool:
        results = panels.check_panels(stack.prometheus_url, dashboard, variables)
        seen.update(
            {r.target.panel: r.samples or [] for r in results if r.target.panel in shed_panels}
        )
        rate = [float(s["value"][1]) for s in seen["Shed requests by route"]
                if s["metric"].get("route") == SHED_ROUTE]
        shedding = [float(s["value"][1]) for s in seen["Instances shedding"]]
        # Above 0 (the fallback's value), at most the exporter's rate: the 1m window of the
        # recording rule fills up over the first minute of shedding.
        return len(rate) == 1 and 0 < rate[0] <= SHED_PER_S * 1.1 and shedding == [1.0]

    try:
        promapi.wait_for(shedding_seen, timeout=timeout, interval=1.0, what="the shed series")
    except TimeoutError:
        pytest.fail(f"the load-shedding panels do not show the shedding: {seen}")


def assert_waiting_panels_name_victim_and_culprit(stack: Stack, timeout: float) -> None:
    """The "Who waited on whom" panels show DELAYED_ROUTE suffering the most delay, with more
    than half of its latency spent waiting, and the anti-pattern holding the most loop time."""
    seen: dict[str, dict[str, float]] = {}

    def shown() -> bool:
        nonlocal seen
        seen = per_route_panels(stack, {DELAY_PANEL, HELD_PANEL, SHARE_PANEL})
        delay, held, share = (seen.get(t, {}) for t in (DELAY_PANEL, HELD_PANEL, SHARE_PANEL))
        # The 1m windows of the recording rules fill up over the first minute of blocking.
        return (
            bool(delay) and max(delay, key=delay.__getitem__) == DELAYED_ROUTE
            and bool(held) and max(held, key=held.__getitem__) == "/antipatterns/sleep"
            and 0.5 < share.get(DELAYED_ROUTE, 0) <= 0.8 * 1.01
        )

    try:
        promapi.wait_for(shown, timeout=timeout, interval=1.0, what="the delay series")
    except TimeoutError:
        pytest.fail(f"the 'Who waited on whom' panels do not name victim and culprit: {seen}")


def test_contract_exporter(tmp_path: Path, contract_exporter: tuple[ContractExporter, str]) -> None:
    exporter, target = contract_exporter
    with Stack(
        services=[], extra_targets=[target], data_dir=tmp_path / "stack", alert_for=ALERT_FOR
    ) as stack:
        stack.wait_until_scraped(timeout=30)
        time.sleep(3)
        assert stack.alert_state(BLOCKED_ALERT) == "inactive"
        exporter.blocking = True
        took = wait_for_alert(stack, "firing", timeout=40)
        assert took >= parse_duration(ALERT_FOR) - 1  # it held for its (capped) for: duration
        assert_all_panels_have_data(stack, timeout=30)
        assert_shedding_panels_read_the_shed_series(stack, timeout=30)
        assert_waiting_panels_name_victim_and_culprit(stack, timeout=30)
        # The alerts about other failure modes stay quiet. (The lag alert may pend or fire too,
        # depending on how much of its 1m window the blocking covers by now.)
        states = {r["name"]: r["state"] for r in promapi.alerting_rules(stack.prometheus_url)}
        quiet = {
            "LoopwatchEventLoopLongBlock",
            "LoopwatchEventLoopSaturated",
            "LoopwatchThreadPoolSaturated",
            "LoopwatchTargetDown",
            "LoopwatchMetricsAbsent",
            "LoopwatchInternalErrors",
        }
        assert {name: states[name] for name in quiet} == dict.fromkeys(quiet, "inactive")
        # The exporter has shed for longer than the (capped) hold: LoopwatchShedding fires.
        promapi.wait_for(lambda: stack.alert_state("LoopwatchShedding") == "firing",
                         timeout=30, what="LoopwatchShedding to fire")
        # DELAYED_ROUTE has waited on the anti-pattern for most of its latency, at 21 requests
        # a second and 80 ms a request, for longer than the (capped) hold: the alert fires for
        # it, and for no other route (/sync waits 2 ms of 300, the anti-pattern 50 of 300).
        delayed = 'ALERTS{alertname="LoopwatchRouteDelayedByOthers", alertstate="firing"}'
        promapi.wait_for(lambda: stack.query(delayed), timeout=60,
                         what="LoopwatchRouteDelayedByOthers to fire")
        assert [a["metric"]["route"] for a in stack.query(delayed)] == [DELAYED_ROUTE]
