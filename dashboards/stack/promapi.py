"""The Prometheus HTTP API, as Prometheus, VictoriaMetrics and vmalert serve it.

Instant queries, label values and alerting-rule states, plus :func:`wait_for`, which polls a
condition against a deadline. Standard library only.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "PrometheusError",
    "alert_state",
    "alerting_rules",
    "get_json",
    "label_values",
    "query",
    "wait_for",
]

T = TypeVar("T")


class PrometheusError(RuntimeError):
    """The API answered with an error, or with something other than what was asked."""


def get_json(url: str, timeout: float = 10.0) -> Any:
    """GET ``url`` and return the ``data`` of a ``{"status": "success"}`` answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:  # bad queries are explained in a 400 body
        try:
            body = json.load(exc)
        except ValueError:
            raise PrometheusError(f"GET {url}: HTTP {exc.code}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(base_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Instant query via /api/v1/query; returns the ``result`` list (vector results only)."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = get_json(f"{base_url}/api/v1/query?{urllib.parse.urlencode(params)}")
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    if data["resultType"] != "vector":
        raise PrometheusError(f"{expr!r} returned a {data['resultType']}, not an instant vector")
    return list(data["result"])


def label_values(base_url: str, label: str, match: str | None = None) -> list[str]:
    params = {"match[]": match} if match else {}
    qs = f"?{urllib.parse.urlencode(params)}" if params else ""
    return sorted(get_json(f"{base_url}/api/v1/label/{label}/values{qs}"))


def alerting_rules(base_url: str) -> list[dict[str, Any]]:
    """Every alerting rule with its ``state`` and active ``alerts`` (Prometheus or vmalert)."""
    data = get_json(f"{base_url}/api/v1/rules?type=alert")
    return [
        rule
        for group in data["groups"]
        for rule in group["rules"]
        if rule.get("type", "alerting") == "alerting"
    ]


_STATE_ORDER = {"inactive": 0, "pending": 1, "firing": 2}


def alert_state(base_url: str, alertname: str) -> str:
    """``inactive``, ``pending`` or ``firing``: the worst state of the rules named ``alertname``."""
    states = [str(r["state"]) for r in alerting_rules(base_url) if r["name"] == alertname]
    if not states:
        raise PrometheusError(f"no alerting rule named {alertname!r} at {base_url}")
    return max(states, key=_STATE_ORDER.__getitem__)


def wait_for(
    predicate: Callable[[], T], *, timeout: float, interval: float = 0.5, what: str = "condition"
) -> T:
    """Call ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, PrometheusError) as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:.0f}s waiting for {what}"
            if last_exc is not None:
                msg += f" (last error: {last_exc})"
            raise TimeoutError(msg)
        time.sleep(interval)
