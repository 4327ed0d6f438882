"""The Grafana dashboard (dashboards/loopwatch.json) and its provisioning files.

Grafana itself does not run here; these tests check what would make the dashboard wrong on a
fleet: queries that do not parse, assume one target, ignore the variables or the datasource
variable, reference metrics nobody exports, thresholds that disagree with the alerts, panels
without units, and docs that do not explain a panel.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboards.stack import panels as st  # noqa: E402 (after the sys.path line)
from tests.needs import missing  # noqa: E402 (after the sys.path line)
from dashboards.contract import CONTRACT, Metric, series_names  # noqa: E402 (after the sys.path line)

DASHBOARD = ROOT / "dashboards" / "loopwatch.json"
RULES_DIR = ROOT / "dashboards" / "prometheus" / "rules"
PROVISIONING = ROOT / "dashboards" / "grafana" / "provisioning"
SRE_DOC = ROOT / "docs" / "sre.md"
DS_UID = "${datasource}"
SEVERITY_COLORS = {"critical": "red", "warning": "orange"}
#: Values used to expand the variables where a query has to be parsed or run.
VARIABLES = {
    "job": "(loopwatch-demo|api)",
    "instance": ".+",
    "route": ".*",
    "datasource": "prometheus",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in st.iter_panels(dashboard) if p["type"] != "row"]


def rows(dashboard: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Row title -> the panels under it (dashboard order; rows are not collapsed)."""
    out: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] | None = None
    for p in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if p["type"] == "row":
            current = out.setdefault(p["title"], list(p.get("panels", [])))
        else:
            assert current is not None, f"panel {p['title']!r} is above the first row"
            current.append(p)
    return out


def exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    out = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            out += group["rules"]
    return out


# --------------------------------------------------------------------------------------------
# Identity, variables, datasource


def test_stable_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "loopwatch"
    assert dashboard["title"]
    assert dashboard.get("id") is None, "an exported numeric id would clash on import"
    assert dashboard["schemaVersion"] >= 36
    assert "__inputs" not in dashboard, "provisioned dashboards must not need import inputs"


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "job", "instance", "route"]
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    for name in ("job", "instance", "route"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"]["uid"] == DS_UID
        assert var["multi"] and var["includeAll"], f"${name} must allow several values and All"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        assert re.fullmatch(rf"label_values\(loopwatch_\w+(\{{.*\}})?, {name}\)", query), query
        assert var["refresh"] == 2, f"${name} should refresh on time-range change"
    assert "$job" in json.dumps(variables["instance"]["query"]), "instance must follow the job"
    assert "$instance" in json.dumps(variables["route"]["query"]), "route must follow instance"
    # "All" routes includes the block routes that are no request route (<none>, <gc>).
    assert variables["route"]["allValue"] == ".*"
    # "All" jobs expands to the jobs that export loopwatch metrics, never to every job of a
    # shared Prometheus (`up{job=~".+"}` would count all of its targets).
    assert not variables["job"].get("allValue")


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for p in panels(dashboard):
        assert p["datasource"] == {"type": "prometheus", "uid": DS_UID}, p["title"]
        assert p["targets"], f"{p['title']} has no query"
        for t in p["targets"]:
            assert t.get("datasource", p["datasource"]) == p["datasource"], p["title"]
    for ann in dashboard["annotations"]["list"]:
        if not ann.get("builtIn"):
            assert ann["datasource"]["uid"] == DS_UID, ann["name"]


def test_every_panel_has_unit_description_and_unique_id(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in st.iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in panels(dashboard):
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        assert len(p.get("description", "")) > 40, f"{p['title']}: no description"
    titles = [p["title"] for p in panels(dashboard)]
    assert len(titles) == len(set(titles)), "duplicate panel titles"


def test_layout_has_no_overlaps(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in st.iter_panels(dashboard):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for y in range(g["y"], g["y"] + g["h"]):
            for x in range(g["x"], g["x"] + g["w"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


# --------------------------------------------------------------------------------------------
# Rows and what they show


def test_rows_in_order(dashboard: dict[str, Any]) -> None:
    assert list(rows(dashboard)) == [
        "Fleet overview",
        "Loop health",
        "Who blocks",
        "HTTP",
        "Thread pool",
        "Load shedding",
        "Who waited on whom",
    ]


def _find(panels_: list[dict[str, Any]], *patterns: str, unit: str | None = None) -> dict[str, Any]:
    for p in panels_:
        text = "\n".join(exprs(p))
        if all(re.search(pat, text) for pat in patterns) and (
            unit is None or p["fieldConfig"]["defaults"]["unit"] == unit
        ):
            return p
    raise AssertionError(f"no panel whose queries match {patterns} (unit {unit})")


def test_loop_health_row(dashboard: dict[str, Any]) -> None:
    row = rows(dashboard)["Loop health"]
    lag = _find(
        row,
        r"histogram_quantile\(0\.5,",
        r"histogram_quantile\(0\.99,",
        r"histogram_quantile\(1,",
        r"loopwatch_event_loop_lag_seconds_bucket",
        unit="s",
    )
    assert "not the exact" in lag["description"], "say honestly what 'max' is"
    _find(row, r"loopwatch_event_loop_busy_seconds", unit="percentunit")
    _find(row, r"block_duration_seconds_count.*\* 60", unit="cpm")


def test_who_blocks_row(dashboard: dict[str, Any]) -> None:
    row = rows(dashboard)["Who blocks"]
    _find(row, r"sum by \(method, route\) \(rate\(loopwatch_request_blocking_seconds_sum")
    _find(
        row,
        r"loopwatch_request_blocking_seconds_sum(.|\n)*/(.|\n)*loopwatch_event_loop_busy_seconds_total",
        unit="percentunit",
    )
    _find(
        row, r"sum by \(method, route\) \(rate\(loopwatch_event_loop_block_duration_seconds_count"
    )


def test_http_row(dashboard: dict[str, Any]) -> None:
    row = rows(dashboard)["HTTP"]
    _find(row, r"^sum by \(method, route\) \(rate\(loopwatch_requests_total", unit="reqps")
    _find(row, r'loopwatch_requests_total\{status=~"5\.\."', unit="percentunit")
    _find(
        row,
        r"histogram_quantile\(0\.5, sum by \(method, route, le\)",
        r"histogram_quantile\(0\.99, sum by \(method, route, le\)",
        r"loopwatch_request_duration_seconds_bucket",
        unit="s",
    )


def test_thread_pool_row(dashboard: dict[str, Any]) -> None:
    row = rows(dashboard)["Thread pool"]
    _find(row, r"loopwatch_threadpool_threads_busy", r"loopwatch_threadpool_threads_limit")
    _find(row, r"loopwatch_threadpool_tasks_waiting")


def test_load_shedding_row(dashboard: dict[str, Any]) -> None:
    row = rows(dashboard)["Load shedding"]
    shed = _find(
        row, r"^sum by \(method, route\) \(instance_method_route:loopwatch_requests_shed:rate1m",
        unit="reqps",
    )
    # Routes that shed nothing read 0 (from the request counter), not a gap.
    assert re.search(r"\nor\n.*loopwatch_requests_total.*\* 0$", exprs(shed)[0]), exprs(shed)
    _find(row, r"^max by \(job, instance\) \(loopwatch_shedding\{")


def test_who_waited_on_whom_row(dashboard: dict[str, Any]) -> None:
    row = rows(dashboard)["Who waited on whom"]
    # Delay suffered and loop time held, per route, over the same recorded 1-minute windows.
    suffered = _find(
        row,
        r"^sum by \(method, route\) "
        r"\(instance_method_route:loopwatch_request_delayed_seconds_sum:rate1m\{",
        unit="s",
    )
    held = _find(
        row,
        r"^sum by \(method, route\) "
        r"\(instance_method_route:loopwatch_request_blocking_seconds_sum:rate1m\{",
        unit="s",
    )
    assert suffered["gridPos"]["y"] == held["gridPos"]["y"], "side by side"
    # The share the alert evaluates, per route: the worst instance's, never a sum of ratios.
    _find(
        row,
        r"^max by \(method, route\) \(instance_method_route:"
        r"loopwatch_request_delayed_seconds_per_duration_seconds:ratio_rate1m\{",
        unit="percentunit",
    )


def test_topk_panels_find_the_worst_instances(dashboard: dict[str, Any]) -> None:
    topk = [p for p in panels(dashboard) if any(e.startswith("topk(") for e in exprs(p))]
    per_instance = [p for p in topk if any(re.match(r"topk\(\d+, instance", e) for e in exprs(p))]
    assert len(per_instance) >= 2, [p["title"] for p in topk]
    for p in per_instance:
        assert p["type"] == "table" and all(t["instant"] for t in p["targets"]), p["title"]


# --------------------------------------------------------------------------------------------
# Queries


def test_queries_parse(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Every query, variables expanded, is valid PromQL (promtool parses it as a rule)."""
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(promtool).exists():
        missing("promtool is missing: install the Debian package `prometheus`")
    targets = st.panel_targets(dashboard)
    doc = {
        "groups": [
            {
                "name": "panels",
                "rules": [
                    {"record": f"panel:check:{i}", "expr": st.expand_variables(t.expr, VARIABLES)}
                    for i, t in enumerate(targets)
                ],
            }
        ]
    }
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(targets)} rules found" in result.stdout


def test_variables_are_known(dashboard: dict[str, Any]) -> None:
    for t in st.panel_targets(dashboard):
        st.expand_variables(t.expr, VARIABLES)  # KeyError on an unknown variable


_METRIC = re.compile(r"\b(loopwatch_[a-z_]+|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+|up)\b(\{[^}]*\})?")


def test_queries_use_known_metrics_with_job_and_instance_filters(dashboard: dict[str, Any]) -> None:
    recorded = {r["record"] for r in rules() if "record" in r}
    known = series_names() | recorded | {"up"}
    for t in st.panel_targets(dashboard):
        # label names inside by (...) are not metrics
        text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", t.expr)
        found = _METRIC.findall(text)
        assert found, t.name
        for name, matchers in found:
            assert name in known, f"{t.name}: unknown metric {name}"
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (
                f"{t.name}: {name} is not filtered by $job and $instance"
            )
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if "route" in CONTRACT.get(base, CONTRACT.get(name, Metric("", ()))).labels:
                assert 'route=~"$route"' in matchers, f"{t.name}: {name} is not filtered by $route"


def test_queries_aggregate_across_instances_and_workers(dashboard: dict[str, Any]) -> None:
    for t in st.panel_targets(dashboard):
        assert re.search(r"\b(sum|avg|max|min|count|topk)\b", t.expr), (
            f"{t.name} does not aggregate"
        )
        for clause in re.findall(r"\bby\s*\(([^)]*)\)", t.expr):
            assert "pid" not in clause, f"{t.name} keeps worker pids apart"
        # Raw counters and histograms are rated over Grafana's interval, never a fixed window.
        for window in re.findall(r"\[([^\]]+)\]", t.expr):
            assert window in ("$__rate_interval", "$__range"), f"{t.name}: fixed window [{window}]"


# --------------------------------------------------------------------------------------------
# Thresholds equal the alert thresholds


def alert_thresholds() -> dict[str, dict[float, str]]:
    """alertname -> {threshold: severity}, read from the alert expressions."""
    out: dict[str, dict[float, str]] = {}
    for rule in rules():
        if "alert" not in rule:
            continue
        m = re.search(r"(>=?)\s*([0-9.]+)\s*$", rule["expr"])
        if m:
            out.setdefault(rule["alert"], {})[float(m.group(2))] = rule["labels"]["severity"]
    return out


def linked_alerts(panel: dict[str, Any]) -> list[str]:
    m = re.search(r"^Thresholds: (.*)$", panel.get("description", ""), re.MULTILINE)
    return re.findall(r"\bLoopwatch[A-Za-z]+\b", m.group(1)) if m else []


def test_thresholds_equal_the_alert_thresholds(dashboard: dict[str, Any]) -> None:
    thresholds = alert_thresholds()
    linked: set[str] = set()
    for p in panels(dashboard):
        steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[0]["value"] is None and steps[0]["color"] == "green", p["title"]
        alerts = linked_alerts(p)
        drawn = {float(s["value"]): s["color"] for s in steps[1:]}
        if not alerts:
            assert not drawn, f"{p['title']} draws thresholds {drawn} that no alert uses"
            continue
        expected: dict[float, str] = {}
        for name in alerts:
            assert name in thresholds, f"{p['title']} links {name}, which has no numeric threshold"
            expected.update(thresholds[name])
            linked.add(name)
        assert set(drawn) == set(expected), (
            f"{p['title']}: thresholds {sorted(drawn)} != alerts' {sorted(expected)}"
        )
        for value, severity in expected.items():
            assert drawn[value] == SEVERITY_COLORS[severity], (p["title"], value, severity)
        assert p["fieldConfig"]["defaults"]["thresholds"]["mode"] == "absolute", p["title"]
        if p["type"] == "timeseries":
            assert p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] != "off", p[
                "title"
            ]
    # Every alert with a numeric threshold (bar the info-level one) is drawn somewhere.
    wanted = {name for name, t in thresholds.items() if set(t.values()) - {"info"}}
    assert wanted <= linked, f"alert thresholds drawn on no panel: {sorted(wanted - linked)}"


def test_threshold_check_notices_a_drift(dashboard: dict[str, Any]) -> None:
    """Control: moving one drawn threshold breaks the equality the test above checks."""
    thresholds = alert_thresholds()
    p = next(p for p in panels(dashboard) if linked_alerts(p))
    steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
    drawn = {float(s["value"]) for s in steps[1:]}
    expected = {v for name in linked_alerts(p) for v in thresholds[name]}
    assert drawn == expected
    assert {v * 2 for v in drawn} != expected


# --------------------------------------------------------------------------------------------
# Provisioning and docs


def test_provisioning_files() -> None:
    ds = yaml.safe_load((PROVISIONING / "datasources" / "loopwatch.yml").read_text())
    prom = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert [d["uid"] for d in prom if d.get("isDefault")] == ["prometheus"]
    for name in ("prometheus.yml", "agent.yml"):  # the demo's, and the fleet's
        scrape = yaml.safe_load((ROOT / "dashboards" / "prometheus" / name).read_text())
        for d in prom:
            assert d["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"], (
                f"{d['name']}: timeInterval must equal the scrape interval, or "
                "$__rate_interval is wrong"
            )
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "loopwatch.yml").read_text())[
        "providers"
    ]
    assert len(providers) == 1 and providers[0]["type"] == "file"
    assert providers[0]["options"]["path"].startswith("/")


def test_sre_guide_explains_every_panel_and_alert(dashboard: dict[str, Any]) -> None:
    text = SRE_DOC.read_text()
    for p in panels(dashboard):
        assert f"**{p['title']}**" in text, f"docs/sre.md does not explain panel **{p['title']}**"
    for rule in rules():
        name = rule.get("alert") or rule["record"]
        assert name in text, f"docs/sre.md does not mention {name}"


def test_contract_matches_what_loopwatch_exports() -> None:
    """The metric names the dashboard and rules rely on are the ones the library registers."""
    from prometheus_client import CollectorRegistry

    from loopwatch._metrics import LoopWatchMetrics

    registry = CollectorRegistry()
    LoopWatchMetrics(registry)
    exported = {}
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        exported[name] = family.type
    assert {n: m.type for n, m in CONTRACT.items()} == exported


# --------------------------------------------------------------------------------------------
# The dashboard as code (dashboards/loopwatch_dashboard.py, Grafana Foundation SDK)

HANDWRITTEN = ROOT / "tests" / "data" / "loopwatch-handwritten.json"


def _generator() -> Any:
    try:
        from dashboards import loopwatch_dashboard
    except ImportError as exc:
        missing(f"the dashboard generator needs the `dashboards` extra ({exc})")
    return loopwatch_dashboard


def test_committed_json_is_what_the_generator_makes() -> None:
    assert DASHBOARD.read_text() == _generator().render(), (
        "dashboards/loopwatch.json differs from the generator's output: edit "
        "dashboards/loopwatch_dashboard.py and run python -m dashboards.loopwatch_dashboard"
    )


def missing_from(expected: Any, actual: Any, path: str = "") -> list[str]:
    """What of ``expected`` is not in ``actual``: every key of a dict (recursively), every
    element of a list, every other value equal. ``actual`` may have more keys."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: {actual!r} is no object"]
        return [
            line
            for key, value in expected.items()
            for line in (
                missing_from(value, actual[key], f"{path}/{key}")
                if key in actual
                else [f"{path}/{key}: missing"]
            )
        ]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: {len(expected)} elements, generated {actual!r:.200}"]
        return [line for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for line in
                missing_from(e, a, f"{path}[{i}]")]
    return [] if expected == actual else [f"{path}: {expected!r} became {actual!r}"]


def test_generator_keeps_everything_the_handwritten_dashboard_had() -> None:
    """Every panel, query, variable, link and setting of the hand-written dashboard (as it
    was when it was replaced, tests/data/loopwatch-handwritten.json) is in the generated one,
    unchanged but for what was changed on purpose:

    * queries of per-route metrics are filtered by the new Route variable as well,
    * the alert annotations follow the Instance selection (``instance=~"$instance|"``: alerts
      of a whole job have no instance label and stay),
    * the Route variable comes after the three there were,
    * the schema version is the SDK's (newer), and an empty ``timepicker`` is left out,
    * the "Load shedding" row (opt-in admission) and the "Who waited on whom" row come after
      every panel there was (so the old panels keep their ids, and links to them still work).
    """
    gen = _generator()
    old = json.loads(HANDWRITTEN.read_text())
    new = gen.build()
    for panel in old["panels"]:
        for target in panel.get("targets", []):
            target["expr"] = gen.select(target["expr"].replace(gen.SELECT, "$sel"))
    old["annotations"]["list"][1]["expr"] = old["annotations"]["list"][1]["expr"].replace(
        'job=~"$job"}', 'job=~"$job", instance=~"$instance|"}'
    )
    assert new["schemaVersion"] >= old.pop("schemaVersion")
    assert old.pop("timepicker") == {} and "timepicker" not in new
    variables = old.pop("templating")["list"]
    # The SDK leaves out what equals Grafana's default for a variable (a datasource
    # variable is always refreshed on load: refresh 1).
    defaults = {"current": {}, "hide": 0, "options": [], "regex": "", "allValue": None}
    for var in variables:
        for key, value in list(var.items()):
            if defaults.get(key, object()) == value or (
                var["type"] == "datasource" and (key, value) == ("refresh", 1)
            ):
                del var[key]
    assert missing_from(variables, new["templating"]["list"][: len(variables)]) == []
    assert [v["name"] for v in new["templating"]["list"][len(variables):]] == ["route"]
    added = new["panels"][len(old["panels"]):]
    assert [p["title"] for p in added if p["type"] == "row"] == [
        "Load shedding", "Who waited on whom",
    ], added
    new = {**new, "panels": new["panels"][: len(old["panels"])]}
    assert missing_from(old, {k: v for k, v in new.items() if k != "templating"}) == []


def test_comparison_notices_a_lost_panel_or_query() -> None:
    """Control: the comparison above fails when something is dropped or changed."""
    new = _generator().build()
    dropped = json.loads(json.dumps(new))
    dropped["panels"].pop(5)
    assert missing_from(new, dropped)
    changed = json.loads(json.dumps(new))
    changed["panels"][3]["targets"][0]["expr"] += " * 2"
    assert missing_from(new, changed)


def test_generator_is_far_shorter_than_the_json() -> None:
    generator = ROOT / "dashboards" / "loopwatch_dashboard.py"
    lines = len(generator.read_text().splitlines())
    assert lines * 3 < len(DASHBOARD.read_text().splitlines()), lines
