"""The Prometheus rule files: promtool's checks and unit tests, and the conventions they follow.

promtool comes from the Debian package ``prometheus`` (/usr/bin/promtool). Without it these
tests skip locally and fail under CI (``CI`` set, as ``.ci/run`` does), where it must be
installed.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboards.contract import series_names  # noqa: E402 (after the sys.path line)
from tests.needs import missing  # noqa: E402 (after the sys.path line)

PROM_DIR = ROOT / "dashboards" / "prometheus"
RULES_DIR = PROM_DIR / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
UNIT_TESTS = sorted((PROM_DIR / "tests").glob("*.test.yml"))
RUNBOOK = ROOT / "docs" / "runbook.md"

SEVERITIES = {"critical", "warning", "info"}
#: The shortest range a rule may rate() over: 4 scrapes at a 15s scrape interval.
MIN_WINDOW_SECONDS = 60


def promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if not found:
        missing("promtool is missing: install the Debian package `prometheus`")
    return found


def run_promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def load_rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def all_rules() -> list[dict[str, Any]]:
    return [rule for path in RULE_FILES for rule in load_rules(path)]


def alerting_rules() -> list[dict[str, Any]]:
    return [r for r in all_rules() if "alert" in r]


def recording_rules() -> list[dict[str, Any]]:
    return [r for r in all_rules() if "record" in r]


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    return {
        github_anchor(m.group(1))
        for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", RUNBOOK.read_text(), re.MULTILINE)
    }


# --------------------------------------------------------------------------------------------
# promtool


def test_rule_files_exist() -> None:
    names = {p.name for p in RULE_FILES}
    assert {"loopwatch-recording.yml", "loopwatch-alerts.yml"} <= names
    assert UNIT_TESTS, "no promtool unit tests in dashboards/prometheus/tests"


def test_promtool_check_rules_is_clean() -> None:
    result = run_promtool("check", "rules", "--lint=all", "--lint-fatal", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES), result.stdout
    # Nothing to complain about, not even warnings.
    assert "WARNING" not in (result.stdout + result.stderr).upper(), result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", *UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout, result.stdout


def test_promtool_check_config_of_the_compose_prometheus() -> None:
    # rule_files in prometheus.yml is relative to it, so this checks the rules it loads too.
    result = run_promtool("check", "config", PROM_DIR / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout, result.stdout


def test_promtool_rejects_a_broken_rule_file(tmp_path: Path) -> None:
    """Control: the check above would notice a broken file."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "groups:\n  - name: x\n    rules:\n      - record: a:b:c\n        expr: sum(rate(x[1m])\n"
    )
    assert run_promtool("check", "rules", bad).returncode != 0


# --------------------------------------------------------------------------------------------
# The unit tests cover every alert, firing and not firing


def unit_test_cases() -> Iterator[dict[str, Any]]:
    for path in UNIT_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            yield from test.get("alert_rule_test", [])


def test_every_alert_has_a_firing_and_a_not_firing_case() -> None:
    cases = list(unit_test_cases())
    for rule in alerting_rules():
        name, severity = rule["alert"], rule["labels"]["severity"]
        fires = [
            c
            for c in cases
            if c["alertname"] == name
            and any(a["exp_labels"].get("severity") == severity for a in c.get("exp_alerts") or [])
        ]
        quiet = [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")]
        assert fires, f"no promtool case where {name} ({severity}) fires"
        assert quiet, f"no promtool case where {name} must not fire"


def test_unit_tests_check_the_rendered_annotations() -> None:
    """Every expected firing alert lists its annotations, so the templates are tested too."""
    for case in unit_test_cases():
        for alert in case.get("exp_alerts") or []:
            ann = alert.get("exp_annotations", {})
            assert {"summary", "description", "runbook_url"} <= ann.keys(), (
                case["alertname"],
                alert,
            )


def _mutations() -> list[tuple[str, int, str, dict[str, Any]]]:
    """(description, rule index, field, new rule) for each alert: each threshold and its hold
    moved. A threshold is every number an ordering comparison (``>``, ``>=``, ``<``, ``<=``)
    compares with: the alert's own, and any floor it applies first (a minimum request rate)."""
    out = []
    rules = load_rules(RULES_DIR / "loopwatch-alerts.yml")
    for i, rule in enumerate(rules):
        label = f"{rule['alert']}/{rule['labels']['severity']}"
        found = list(re.finditer(r"(>=?|<=?)\s*([0-9.]+)(?![\w.])", rule["expr"]))
        for m in found:
            value = float(m.group(2))
            moved = [value * 3, value / 3] if value else [1.0, -1.0]
            for new in moved:
                mutated = copy.deepcopy(rule)
                mutated["expr"] = rule["expr"][: m.start(2)] + repr(new) + rule["expr"][m.end(2) :]
                out.append((f"{label}: threshold {value} -> {new}", i, "expr", mutated))
        if "for" in rule:
            seconds = duration_seconds(rule["for"])
            for new_s in (seconds * 2, seconds / 2):
                mutated = copy.deepcopy(rule)
                mutated["for"] = f"{int(new_s)}s"
                out.append((f"{label}: for {rule['for']} -> {mutated['for']}", i, "for", mutated))
        if not found and "for" not in rule:
            raise AssertionError(f"{label}: no threshold and no for: to mutate")
    return out


def test_unit_tests_pin_every_threshold_and_hold_duration(tmp_path: Path) -> None:
    """Move any alert's threshold (x3, /3) or for: (x2, /2): the promtool unit tests must fail.

    Proves the unit tests constrain each alert's numbers, rather than passing for any value.
    """
    promtool()
    alerts_path = RULES_DIR / "loopwatch-alerts.yml"
    doc = yaml.safe_load(alerts_path.read_text())
    flat = [(g, j) for g, group in enumerate(doc["groups"]) for j in range(len(group["rules"]))]
    mutations = _mutations()
    assert len(mutations) >= 2 * len(flat)

    def run(n: int) -> tuple[str, int, str]:
        desc, i, _, mutated = mutations[n]
        base = tmp_path / f"m{n}"
        shutil.copytree(PROM_DIR / "rules", base / "rules")
        shutil.copytree(PROM_DIR / "tests", base / "tests")
        new_doc = copy.deepcopy(doc)
        g, j = flat[i]
        new_doc["groups"][g]["rules"][j] = mutated
        (base / "rules" / alerts_path.name).write_text(yaml.safe_dump(new_doc, sort_keys=False))
        tests = [base / "tests" / p.name for p in UNIT_TESTS]
        result = run_promtool("test", "rules", *tests)
        return desc, result.returncode, result.stdout

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(len(mutations))))
    survivors = [desc for desc, code, _ in results if code == 0]
    assert not survivors, "the promtool unit tests still pass with: " + "; ".join(survivors)


# --------------------------------------------------------------------------------------------
# Conventions


def _by_clauses(expr: str) -> list[set[str]]:
    return [
        {label.strip() for label in m.group(1).split(",") if label.strip()}
        for m in re.finditer(r"\bby\s*\(([^)]*)\)", expr)
    ]


def test_recording_rule_names_follow_level_metric_operations() -> None:
    level_labels = {"instance": {"job", "instance"}, "job": {"job"}}
    for rule in recording_rules():
        name, expr = rule["record"], rule["expr"]
        assert re.fullmatch(r"[a-z_]+:[a-z][a-z0-9_]*:[a-z][a-z0-9_]*", name), name
        level, metric, ops = name.split(":")
        assert metric.startswith("loopwatch_"), name
        assert not metric.endswith("_total"), f"{name}: drop _total once rate() is applied"
        assert level.split("_")[0] in level_labels, f"{name}: unknown level {level!r}"
        # The outer aggregation keeps exactly the level's labels (plus le for buckets); inner
        # ones may keep more.
        keep = set(level_labels[level.split("_")[0]]) | (set(level.split("_")[1:]) - {"quantile"})
        if metric.endswith("_bucket"):
            keep.add("le")
        clauses = _by_clauses(expr)
        if clauses:
            assert all(c >= keep for c in clauses), f"{name}: by {clauses}, level says {keep}"
            assert clauses[0] == keep, f"{name}: by {clauses[0]}, level says {keep}"
        else:  # built from another recorded series of the same level
            assert re.search(rf"\b{level.split('_')[0]}:", expr), name
        if "rate" in ops:
            window = re.search(r"rate(\d+[smh])", ops).group(1)
            assert all(w == window for w in re.findall(r"\[(\d+[smh])\]", expr)), name
            # increase(x[w]) / seconds of w, not rate(): see the rule file's header and
            # test_rate_rules_read_the_window_mean_on_victoriametrics.
            assert "rate(" not in expr, name
            divisors = re.findall(r"\[\d+[smh]\]\)\s*/\s*(\d+)", expr)
            ranges = re.findall(r"\[\d+[smh]\]", expr)
            assert len(divisors) == len(ranges), name
            assert all(int(d) == duration_seconds(window) for d in divisors), name
        if "quantile" in level:
            assert "quantile" in rule.get("labels", {}), name


def test_aggregations_keep_job_and_instance() -> None:
    """Every ``by`` keeps job (and instance where the result is per target), never pid."""
    for rule in all_rules():
        name = rule.get("record") or rule["alert"]
        for clause in _by_clauses(rule["expr"]):
            assert "job" in clause, f"{name}: by {clause} drops job"
            assert "pid" not in clause, f"{name}: by {clause} keeps worker pids apart"
        # No aggregation without `by`: `sum(...)` would fold every target into one series.
        for m in re.finditer(
            r"\b(sum|avg|max|min|count|group|topk)\s*(by|without)?\s*\(", rule["expr"]
        ):
            assert m.group(2) == "by", f"{name}: {m.group(0)!r} aggregates without `by`"


def test_rate_windows_are_at_least_four_scrapes() -> None:
    for rule in all_rules():
        for window in re.findall(r"\[(\d+[smhdwy])(?::[^\]]*)?\]", rule["expr"]):
            assert duration_seconds(window) >= MIN_WINDOW_SECONDS, (
                rule.get("record") or rule["alert"],
                window,
            )


def test_rules_use_only_contract_metrics_or_recorded_series() -> None:
    recorded = {r["record"] for r in recording_rules()}
    contract = series_names()
    for rule in all_rules():
        for name in re.findall(
            r"\b(loopwatch_[a-z_]+|[a-z_]+:[a-z0-9_]+:[a-z0-9_]+)\b", rule["expr"]
        ):
            if ":" in name:
                assert name in recorded, f"{name} is not recorded by any rule"
            else:
                assert name in contract, f"{name} is not in loopwatch's metric contract"


def test_alerts_have_severity_summary_description_and_runbook() -> None:
    anchors = runbook_anchors()
    for rule in alerting_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Loopwatch[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        ann = rule["annotations"]
        assert {"summary", "description", "runbook_url"} <= ann.keys(), name
        assert "{{ $labels." in ann["description"], f"{name}: description names no label"
        if not re.match(r"\s*up\s*==\s*0", rule["expr"]):  # there $value is always 0
            assert re.search(
                r"\{\{ \$value \| humanize\w* \}\}", ann["summary"] + ann["description"]
            ), name
        url = ann["runbook_url"]
        m = re.fullmatch(r"docs/runbook\.md#([a-z0-9-]+)", url)
        assert m, f"{name}: runbook_url {url!r} is not docs/runbook.md#anchor"
        assert m.group(1) in anchors, f"{name}: docs/runbook.md has no section #{m.group(1)}"
        assert m.group(1) == github_anchor(name), (
            f"{name}: runbook section should be named after the alert"
        )


def test_alert_holds_are_sensible() -> None:
    holds = {
        r["alert"] + "/" + r["labels"]["severity"]: duration_seconds(r.get("for", "0s"))
        for r in alerting_rules()
    }
    assert holds["LoopwatchEventLoopLagHigh/warning"] == 300
    assert holds["LoopwatchEventLoopLagHigh/critical"] == 300
    assert holds["LoopwatchEventLoopSaturated/warning"] == 600


def test_alertmanager_config() -> None:
    path = ROOT / "dashboards" / "alertmanager" / "alertmanager.yml"
    config = yaml.safe_load(path.read_text())
    names = {r["alert"] for r in alerting_rules()}
    for rule in config.get("inhibit_rules", []):
        for matcher in rule.get("source_matchers", []) + rule.get("target_matchers", []):
            m = re.fullmatch(r'alertname="(\w+)"', matcher)
            if m:
                assert m.group(1) in names, f"inhibit rule names unknown alert {m.group(1)}"
            m = re.fullmatch(r'severity="(\w+)"', matcher)
            if m:
                assert m.group(1) in SEVERITIES
    amtool = shutil.which("amtool")
    if amtool:
        result = subprocess.run(
            [amtool, "check-config", str(path)], check=False, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# The capped copies the local stacks evaluate


def test_capped_rule_files_differ_only_in_alert_holds(tmp_path: Path) -> None:
    """``write_rule_files(alert_for=...)`` edits text, not YAML (the demo's set-up has no
    PyYAML): parsed back, each alert's ``for:`` is min(original, cap) and nothing else moved."""
    from dashboards.stack.rules import cap_alert_holds, write_rule_files

    written = write_rule_files(tmp_path, alert_for="10s")
    assert [p.name for p in written] == [p.name for p in RULE_FILES]
    for original, capped in zip(RULE_FILES, written, strict=True):
        want = yaml.safe_load(original.read_text())
        for group in want["groups"]:
            for rule in group["rules"]:
                if "for" in rule and duration_seconds(rule["for"]) > 10:
                    rule["for"] = "10s"
        assert yaml.safe_load(capped.read_text()) == want
        assert run_promtool("check", "rules", capped).returncode == 0
    capped_fors = [r.get("for") for p in written for r in load_rules(p) if "alert" in r]
    assert "10s" in capped_fors and not any(f and duration_seconds(f) > 10 for f in capped_fors)
    with pytest.raises(ValueError, match="cannot cap"):
        cap_alert_holds("groups:\n  - rules:\n      - {alert: X, expr: up, for: 5m}\n", "10s")


def test_rate_rules_read_the_window_mean_on_victoriametrics(tmp_path: Path) -> None:
    """A route first blocks (0.3 s, then 0.6 s more) and the instance stops 4 s later. On a
    real VictoriaMetrics, every per-second rule reads the window's mean (0.9 s / 60 s), as
    Prometheus would — not the rate over the 4 s the samples span (0.15 s/s, over the blocked
    alert's 0.1: the fleet's canary was alerted on that way)."""
    from dashboards.stack.processes import Processes, find_binary
    from dashboards.stack.promapi import query, wait_for
    from harness.servers import free_port

    try:
        binary = find_binary("victoria-metrics")
    except FileNotFoundError as exc:
        missing(str(exc))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    processes = Processes(tmp_path)
    processes.spawn("victoria-metrics", [
        binary, f"-storageDataPath={tmp_path / 'data'}", f"-httpListenAddr=127.0.0.1:{port}",
        "-search.latencyOffset=0s", "-search.disableCache",
    ])
    try:
        processes.wait_ready("victoria-metrics", f"{base}/health", timeout=30)
        t = int(time.time()) - 120  # the instance stopped at t + 6
        target = {"job": "canary", "instance": "canary-1:8000"}
        block = {**target, "method": "GET", "route": "/block"}
        series = [  # (name, labels, [(seconds after t, value)])
            ("loopwatch_event_loop_busy_seconds_total", target,
             [(s, 0.01 * (s + 60)) for s in range(-60, 7, 2)]),
            ("loopwatch_event_loop_block_duration_seconds_sum", block,
             [(2, 0.3), (4, 0.9), (6, 0.9)]),
            ("loopwatch_event_loop_block_duration_seconds_count", block,
             [(2, 1.0), (4, 3.0), (6, 3.0)]),
        ]
        lines = "".join(json.dumps({
            "metric": {"__name__": name, **labels},
            "values": [v for _, v in points],
            "timestamps": [(t + s) * 1000 for s, _ in points],
        }) + "\n" for name, labels, points in series)
        urllib.request.urlopen(f"{base}/api/v1/import", data=lines.encode(), timeout=10).close()
        urllib.request.urlopen(f"{base}/internal/force_flush", timeout=10).close()
        wait_for(lambda: query(base, "loopwatch_event_loop_block_duration_seconds_count",
                               at=t + 6), timeout=30, what="the imported samples")
        expected = {
            "instance:loopwatch_event_loop_block_duration_seconds_sum:rate1m": 0.9 / 60,
            "instance:loopwatch_event_loop_block_duration_seconds_count:rate1m": 3 / 60,
        }
        rules = {r["record"]: r["expr"] for r in recording_rules()}
        for name, value in expected.items():
            for after in (10, 30, 50):  # seconds after the stop, all within a window
                result = query(base, rules[name], at=t + 6 + after)
                assert len(result) == 1, (name, result)
                assert float(result[0]["value"][1]) == pytest.approx(value), (name, after)
        blocked = next(r for r in alerting_rules() if r["alert"] == "LoopwatchEventLoopBlocked")
        threshold = float(blocked["expr"].split(">")[1])
        assert 0.9 / 60 < threshold < 0.9 / 6  # the scenario tells the two readings apart
    finally:
        processes.stop_all()
