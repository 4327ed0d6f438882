"""The fleet, end to end: multi-worker instances -> Prometheus agent -> VictoriaMetrics, with
loopwatch's recording and alerting rules evaluated by vmalert (notifying Alertmanager).

One choreographed run of :class:`dashboards.stack.fleet.Fleet` (jobs ``api``: api-1, api-2 and
``canary``: canary-1, each ``uvicorn --workers 2`` in multiprocess mode) proves, through
VictoriaMetrics's and vmalert's HTTP APIs:

1. **Exact counts.** Requests (by instance, route, status) and blocks (by instance, route)
   summed over the fleet equal what the test sent, exactly: ``increase_pure`` over a window
   that holds the whole run, so nothing is extrapolated.
2. **Across a restart.** canary-1 is stopped (``LoopwatchTargetDown`` fires for it alone,
   ``LoopwatchMetricsAbsent`` for job canary alone, and Alertmanager inhibits the first with
   the second), then started again with an empty multiprocess directory: its counters start
   from zero. The totals are still exact. A reset is seen when a scrape reads a lower value
   than the one before, so the restarted instance gets fewer requests per series than
   before the stop (docs/sre.md says why this is how counters work, everywhere).
3. **Alerts on the right instance.** api-1 blocks its loop (600 ms blocks back to back, and one
   of 1.2 s): the lag (warning and critical), blocked, long-block and saturation alerts fire
   for api-1 and for no other instance. api-2 fills its thread pool:
   ``LoopwatchThreadPoolSaturated`` fires for api-2 alone.
4. **Every dashboard query** (from dashboards/loopwatch.json: panels, variables, annotations)
   returns finite data with the variables at "All", with one instance selected and with one
   route selected, and only series of the selection.
5. The counts are exact again at the end, over everything sent in all phases.

Alert holds are capped with ``alert_for`` (as ``--alert-for`` does); expressions, thresholds
and windows are the repository's. promtool tests (tests/test_rules.py) cover the real holds.
"""

from __future__ import annotations

import math
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboards.stack import panels  # noqa: E402 (after the sys.path line)
from dashboards.stack.fleet import Fleet  # noqa: E402
from dashboards.stack.processes import find_binary  # noqa: E402
from dashboards.stack.promapi import wait_for  # noqa: E402
from tests.needs import missing  # noqa: E402

pytestmark = pytest.mark.slow

ALERT_FOR = "15s"
BLOCK_MS = 600
LONG_BLOCK_MS = 1200
THREAD_LIMIT = 2  # per worker: 4 threads per instance, filled by a few requests
# Above any step a loaded CI host stretches by itself (a spurious block outside the injected
# ones would make "exact" a matter of luck); every injected block is longer.
BLOCK_THRESHOLD = 0.25

#: What each instance gets in the counting phase: (path, times).
BEFORE: dict[str, list[tuple[str, int]]] = {
    "api-1": [("/fast", 30), ("/items/1", 10), ("/items/2", 5), ("/fail", 4), ("/block?ms=300", 3)],
    "api-2": [("/fast", 20), ("/items/9", 6), ("/block?ms=300", 2), ("/sync-wait?ms=5", 5)],
    "canary-1": [("/fast", 12), ("/items/3", 8), ("/fail", 5), ("/block?ms=300", 3)],
}
#: After canary-1's restart: fewer per series than before it (see the module docstring).
AFTER: dict[str, list[tuple[str, int]]] = {
    "canary-1": [("/fast", 7), ("/items/4", 3), ("/fail", 2), ("/block?ms=300", 2)],
    "api-2": [("/fast", 25), ("/block?ms=300", 1)],
}

BLOCK_ALERTS = {
    ("LoopwatchEventLoopLagHigh", "warning"),
    ("LoopwatchEventLoopLagHigh", "critical"),
    ("LoopwatchEventLoopBlocked", "warning"),
    ("LoopwatchEventLoopLongBlock", "warning"),
    ("LoopwatchEventLoopSaturated", "warning"),
}
POOL_ALERT = ("LoopwatchThreadPoolSaturated", "warning")


def route_of(path: str) -> str:
    """The route template loopwatch labels ``path`` with, in the fleet app."""
    path = path.split("?")[0]
    return "/items/{item_id}" if path.startswith("/items/") else path


class Sent:
    """Everything the test sent that got an answer, as the metrics must count it."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.requests: Counter[tuple[str, str, str]] = Counter()  # (instance, route, status)
        self.blocks: Counter[tuple[str, str]] = Counter()  # (instance, route)
        self._lock = threading.Lock()

    def get(self, client: httpx.Client, name: str, path: str) -> int:
        status = client.get(self.fleet.url(name) + path).status_code
        instance, route = self.fleet.target(name), route_of(path)
        with self._lock:
            self.requests[(instance, route, str(status))] += 1
            if route == "/block":
                assert int(re.search(r"ms=(\d+)", path).group(1)) / 1000 > BLOCK_THRESHOLD
                self.blocks[(instance, route)] += 1
        return status

    def send(self, plan: dict[str, list[tuple[str, int]]]) -> None:
        """Every request of ``plan``, 8 at a time, each on a new connection."""
        jobs = [(name, path) for name, paths in plan.items() for path, n in paths for _ in range(n)]

        def one(job: tuple[str, str]) -> None:
            with httpx.Client(timeout=30) as client:
                self.get(client, *job)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, jobs))


class Hammer:
    """Threads that request ``path`` of instance ``name`` back to back, each on one kept-alive
    connection, until stopped (bounded: ``max_seconds``); every answer is recorded in ``sent``.
    """

    def __init__(
        self, sent: Sent, name: str, path: str, threads: int, *, pause: float = 0.0,
        max_seconds: float = 150,
    ) -> None:
        self._sent, self._name, self._path, self._pause = sent, name, path, pause
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.errors: list[str] = []

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    self._sent.get(client, self._name, self._path)
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    return
                self._stop.wait(self._pause)

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=40)
        assert not any(t.is_alive() for t in self._threads), "a request never ended"


# --------------------------------------------------------------------------------------------
# Reading the fleet


def counts(fleet: Fleet, expr: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    return {
        tuple(s["metric"].get(label, "") for label in labels): round(float(s["value"][1]), 6)
        for s in fleet.query(expr)
    }


def own_counts(fleet: Fleet, name: str) -> list[str]:
    """The instance's own count lines, for an error message."""
    try:
        text = httpx.get(fleet.url(name) + "/metrics", timeout=10).text
    except httpx.HTTPError as exc:
        return [repr(exc)]
    return [line for line in text.splitlines() if re.match(r"loopwatch_(requests_total|event_loop_block_duration_seconds_count)", line)]


def assert_exact(fleet: Fleet, sent: Sent, timeout: float = 40) -> None:
    """VictoriaMetrics's totals equal what was sent: per series, and summed over the fleet."""
    want_requests = {k: float(v) for k, v in sent.requests.items()}
    want_blocks = {k: float(v) for k, v in sent.blocks.items()}
    req_expr = "sum by (instance, route, status) (increase_pure(loopwatch_requests_total[1h]))"
    blk_expr = (
        "sum by (instance, route) "
        "(increase_pure(loopwatch_event_loop_block_duration_seconds_count[1h]))"
    )
    got: dict[str, Any] = {}

    def equal() -> bool:
        got["requests"] = counts(fleet, req_expr, ("instance", "route", "status"))
        got["blocks"] = counts(fleet, blk_expr, ("instance", "route"))
        return got["requests"] == want_requests and got["blocks"] == want_blocks

    try:
        wait_for(equal, timeout=timeout, interval=1.0, what="exact counts")
    except TimeoutError:
        own = {name: own_counts(fleet, name) for name in fleet.instances}
        assert got.get("requests") == want_requests, own
        assert got.get("blocks") == want_blocks, own
        raise
    total = fleet.query("sum(increase_pure(loopwatch_requests_total[1h]))")
    assert float(total[0]["value"][1]) == sum(sent.requests.values())
    total = fleet.query("sum(increase_pure(loopwatch_event_loop_block_duration_seconds_count[1h]))")
    assert float(total[0]["value"][1]) == sum(sent.blocks.values())


def active(fleet: Fleet) -> dict[tuple[str, str], dict[str, str]]:
    """(alertname, severity) -> {instance or job: state} of vmalert's active alerts."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for alert in fleet.alerts():
        labels = alert["labels"]
        key = (labels["alertname"], labels.get("severity", ""))
        where = labels.get("instance") or f"job={labels.get('job')}"
        out.setdefault(key, {})[where] = alert["state"]
    return out


def wait_for_alerts(
    fleet: Fleet, want: dict[tuple[str, str], str], timeout: float
) -> dict[tuple[str, str], dict[str, str]]:
    """Wait until each alert of ``want`` fires for its instance (or ``job=...``)."""
    seen: dict[tuple[str, str], dict[str, str]] = {}

    def firing() -> bool:
        nonlocal seen
        seen = active(fleet)
        return all(seen.get(key, {}).get(where) == "firing" for key, where in want.items())

    try:
        wait_for(firing, timeout=timeout, interval=1.0, what=f"alerts {sorted(want)}")
    except TimeoutError:
        pytest.fail(f"not all of {want} fire; active: {seen}")
    return seen


# --------------------------------------------------------------------------------------------
# The dashboard's queries

#: Labels that tell the selection apart, and the variable that selects each.
SELECTING = {"job": "job", "instance": "instance", "route": "route"}


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, expr) of every query: panels, the variables' label_values, annotations."""
    out = [(t.name, t.expr) for t in panels.panel_targets(dashboard)]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]["query"])
            assert m, var["query"]
            out.append((f"variable ${m.group(2)}", f"count by ({m.group(2)}) ({m.group(1)})"))
    for ann in dashboard["annotations"]["list"]:
        if ann.get("expr"):
            out.append((f"annotation {ann['name']}", ann["expr"]))
    return out


def check_dashboard(
    fleet: Fleet, dashboard: dict[str, Any], selected: dict[str, list[str]]
) -> list[str]:
    """Problems of the dashboard's queries under ``selected`` (empty: all returned data, and
    only series of the selection)."""
    variables = fleet.panel_variables(dashboard, selected)
    problems = []
    for name, expr in dashboard_queries(dashboard):
        expanded = panels.expand_variables(expr, variables)
        samples = fleet.query(expanded)
        finite = [s for s in samples if math.isfinite(float(s["value"][1]))]
        if not finite:
            problems.append(f"{name}: no finite data ({len(samples)} series)\n    {expanded}")
            continue
        # A variable's own query offers every value of its label, whatever is selected.
        own = name.removeprefix("variable $") if name.startswith("variable $") else None
        for s in samples:
            for label, var in SELECTING.items():
                value = s["metric"].get(label)
                if var == own or var not in selected or value is None:
                    continue
                if value not in selected[var]:
                    problems.append(f"{name}: series with {label}={value!r} outside {selected}")
    return problems


# --------------------------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    try:
        for binary in ("prometheus", "victoria-metrics", "vmalert", "prometheus-alertmanager"):
            find_binary(binary)
    except FileNotFoundError as exc:
        missing(str(exc))
    with Fleet(
        data_dir=tmp_path / "fleet",
        alert_for=ALERT_FOR,
        thread_limit=THREAD_LIMIT,
        block_threshold=BLOCK_THRESHOLD,
        scrape_interval="2s",
    ) as f:
        yield f


def test_fleet(fleet: Fleet) -> None:
    t0 = time.monotonic()
    fleet.wait_until_scraped(timeout=60)
    assert active(fleet) == {}, "alerts before anything happened"
    sent = Sent(fleet)
    canary = fleet.target("canary-1")

    # 1. Exact counts.
    sent.send(BEFORE)
    assert_exact(fleet, sent)
    t_counts = time.monotonic()

    # 2. canary-1 goes away: its target is down, its job has no metrics.
    fleet.stop_instance("canary-1")
    seen = wait_for_alerts(
        fleet,
        {("LoopwatchTargetDown", "warning"): canary,
         ("LoopwatchMetricsAbsent", "warning"): "job=canary"},
        timeout=60,
    )
    assert seen == {
        ("LoopwatchTargetDown", "warning"): {canary: "firing"},
        ("LoopwatchMetricsAbsent", "warning"): {"job=canary": "firing"},
    }

    def inhibited() -> bool:
        held = {a["labels"]["alertname"]: a["status"] for a in fleet.alertmanager_alerts()}
        return (
            held.get("LoopwatchMetricsAbsent", {}).get("state") == "active"
            and held.get("LoopwatchTargetDown", {}).get("state") == "suppressed"
        )

    wait_for(inhibited, timeout=30, what="Alertmanager to inhibit TargetDown by MetricsAbsent")

    # ... and comes back with its counters at zero.
    fleet.start_instance("canary-1")
    wait_for(
        lambda: fleet.query(f'up{{instance="{canary}"}} == 1') and not active(fleet),
        timeout=60,
        what="canary-1 scraped again and every alert resolved",
    )
    sent.send(AFTER)
    assert_exact(fleet, sent)
    t_restart = time.monotonic()

    # 3. api-1 blocks, api-2's thread pool fills up.
    api1, api2 = fleet.target("api-1"), fleet.target("api-2")
    dashboard = panels.load_dashboard()
    with (
        Hammer(sent, "api-1", f"/block?ms={BLOCK_MS}", threads=1) as blocker,
        # Blocks too, then stays in progress where the loop's ticks see it.
        Hammer(sent, "api-1", "/block?ms=300&then_ms=1000", threads=1),
        Hammer(sent, "api-2", "/sync-wait?ms=1000", threads=12) as pool_filler,
        Hammer(sent, "api-2", "/fast", threads=1, pause=0.05),
        Hammer(sent, "canary-1", "/items/5", threads=1, pause=0.05),
    ):
        with httpx.Client(timeout=30) as client:
            assert sent.get(client, "api-1", f"/block?ms={LONG_BLOCK_MS}") == 200
        want = {key: api1 for key in BLOCK_ALERTS} | {POOL_ALERT: api2}
        seen = wait_for_alerts(fleet, want, timeout=120)
        t_alerts = time.monotonic()
        # Nowhere else, not even pending; nothing else fires.
        assert {key: set(where) for key, where in seen.items()} == {
            key: {where} for key, where in want.items()
        }, seen

        # 4. Every dashboard query, three selections.
        for selected in ({}, {"instance": [api1]}, {"route": ["/block"]}):
            problems = check_dashboard(fleet, dashboard, selected)
            assert not problems, f"selection {selected}:\n" + "\n".join(problems)
        t_dashboard = time.monotonic()
    assert not blocker.errors and not pool_filler.errors, blocker.errors + pool_filler.errors

    # 5. Everything sent, in every phase, counted exactly.
    assert_exact(fleet, sent)
    print(
        f"\nfleet: counted {time.monotonic() - t0:.0f}s in: exact counts at {t_counts - t0:.0f}s, "
        f"after the restart {t_restart - t0:.0f}s, alerts {t_alerts - t0:.0f}s, dashboard "
        f"{t_dashboard - t0:.0f}s; {sum(sent.requests.values())} requests, "
        f"{sum(sent.blocks.values())} blocks"
    )
