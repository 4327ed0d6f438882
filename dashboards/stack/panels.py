"""The Grafana dashboard's queries, with its variables substituted as Grafana would, run
against any server of the Prometheus query API (Prometheus, VictoriaMetrics).

:func:`panel_targets` reads every query out of the dashboard JSON, :func:`grafana_variables`
computes what Grafana substitutes for the dashboard's variables (each left at "All" or set
to chosen values), and :func:`check_panels` runs every panel query.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .durations import format_duration
from .promapi import PrometheusError, label_values, query

__all__ = [
    "DASHBOARD_PATH",
    "PanelResult",
    "PanelTarget",
    "check_panels",
    "expand_variables",
    "format_panel_results",
    "grafana_variables",
    "iter_panels",
    "load_dashboard",
    "panel_targets",
]

DASHBOARD_PATH = Path(__file__).resolve().parent.parent / "loopwatch.json"


@dataclass(frozen=True)
class PanelTarget:
    panel: str
    ref_id: str
    expr: str
    instant: bool

    @property
    def name(self) -> str:
        return f"{self.panel} [{self.ref_id}]"


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_targets(dashboard: Mapping[str, Any]) -> list[PanelTarget]:
    """Every PromQL query of every panel, in dashboard order."""
    out = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if not target.get("hide") and target.get("expr"):
                out.append(
                    PanelTarget(
                        panel=panel.get("title", f"panel {panel.get('id')}"),
                        ref_id=target.get("refId", "?"),
                        expr=target["expr"],
                        instant=bool(target.get("instant")) and not target.get("range"),
                    )
                )
    return out


_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]")
_REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")


def _grafana_regex_escape(value: str) -> str:
    """What Grafana does to one value of a multi-value variable in a Prometheus query."""
    return _REGEX_SPECIAL.sub(r"\\\\\1", value)  # escaped for the regex, then for the string


def expand_variables(expr: str, values: Mapping[str, str]) -> str:
    """Substitute ``$name``, ``${name}`` and ``[[name]]``; KeyError for an unknown variable."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(sub, expr)


def grafana_variables(
    prometheus_url: str,
    dashboard: Mapping[str, Any],
    *,
    scrape_interval: float,
    time_range: float = 900.0,
    max_data_points: int = 1000,
    selected: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, str]:
    """The values Grafana would substitute for the dashboard's template variables.

    Each variable named in ``selected`` gets the values given there (each must be one that
    the variable's query offers); every other one is left at "All". Query variables are
    resolved with the label-values API (what Grafana's ``label_values(metric{...}, label)``
    does), in dashboard order, so a variable sees the values chosen for the ones before it.
    "All" becomes the variable's ``allValue`` or, without one, ``(v1|v2|...)`` of the
    regex-escaped values; chosen values become ``v`` or ``(v1|v2)``, escaped the same way.
    The built-in interval variables follow Grafana's rules for a ``time_range``-second
    dashboard range whose datasource's scrape interval ("timeInterval") is
    ``scrape_interval``: ``$__rate_interval = max($__interval + scrape interval, 4 * scrape
    interval)``.
    """
    selected = dict(selected or {})
    interval = max(scrape_interval, time_range / max_data_points)
    values = {
        "__interval": format_duration(interval),
        "__rate_interval": format_duration(max(interval + scrape_interval, 4 * scrape_interval)),
        "__range": format_duration(time_range),
    }
    for var in dashboard.get("templating", {}).get("list", []):
        name, kind = var["name"], var.get("type")
        if kind == "datasource":
            values[name] = "prometheus"
            continue
        if kind != "query":
            raise ValueError(f"dashboard variable ${name} has type {kind!r}, which is not handled")
        q = var.get("query")
        text = q.get("query", "") if isinstance(q, dict) else str(q)
        m = re.fullmatch(r"\s*label_values\((?:(.*),\s*)?(\w+)\)\s*", text)
        if not m:
            raise ValueError(f"dashboard variable ${name}: cannot evaluate {text!r}")
        match = expand_variables(m.group(1), values) if m.group(1) else None
        found = label_values(prometheus_url, m.group(2), match)
        if not found:
            raise PrometheusError(f"dashboard variable ${name}: {text!r} found no values")
        chosen = selected.pop(name, None)
        if chosen is not None:
            unknown = sorted(set(chosen) - set(found))
            if unknown or not chosen:
                raise ValueError(
                    f"dashboard variable ${name} offers {found}; cannot select {list(chosen)}"
                )
            escaped = [_grafana_regex_escape(v) for v in chosen]
            values[name] = escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
        elif var.get("includeAll") and var.get("allValue"):
            values[name] = var["allValue"]
        else:
            values[name] = "(" + "|".join(_grafana_regex_escape(v) for v in found) + ")"
    if selected:
        raise KeyError(f"the dashboard has no variable {sorted(selected)}")
    return values


@dataclass
class PanelResult:
    target: PanelTarget
    expr: str
    series: int = 0
    finite: int = 0
    error: str | None = None
    samples: list[dict[str, Any]] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finite > 0


def check_panels(
    prometheus_url: str, dashboard: Mapping[str, Any], variables: Mapping[str, str]
) -> list[PanelResult]:
    """Run every panel query (variables substituted) as an instant query.

    A query passes when it returns at least one series with a finite value: a histogram
    quantile over windows without observations returns NaN, which Grafana draws as nothing.
    Each result keeps its samples, so a caller can check which series came back.
    """
    results = []
    for target in panel_targets(dashboard):
        expr = expand_variables(target.expr, variables)
        res = PanelResult(target=target, expr=expr)
        try:
            samples = query(prometheus_url, expr)
        except PrometheusError as exc:
            res.error = str(exc)
        else:
            res.samples = samples
            res.series = len(samples)
            res.finite = sum(1 for s in samples if math.isfinite(float(s["value"][1])))
        results.append(res)
    return results


def format_panel_results(results: Iterable[PanelResult]) -> str:
    lines = []
    for r in results:
        status = "ok  " if r.ok else "FAIL"
        detail = r.error or f"{r.series} series, {r.finite} finite"
        lines.append(f"{status} {r.target.name}: {detail}")
        if not r.ok:
            lines.append(f"       {r.expr}")
    return "\n".join(lines)
