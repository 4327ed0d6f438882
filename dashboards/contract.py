"""The metric names the dashboard and the rules are built on: loopwatch's metric contract.

Names as they appear in Prometheus (counters with ``_total``), their type and their labels
besides the target's own (``job``, ``instance``). The tests check the dashboard and the rules
against this table, and this table against what ``loopwatch`` exports.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CONTRACT", "Metric"]


class Metric(NamedTuple):
    type: str  # "counter", "gauge" or "histogram"
    labels: tuple[str, ...]


CONTRACT: dict[str, Metric] = {
    "loopwatch_event_loop_lag_seconds": Metric("histogram", ()),
    "loopwatch_event_loop_busy_seconds_total": Metric("counter", ()),
    "loopwatch_event_loop_block_duration_seconds": Metric("histogram", ("method", "route")),
    "loopwatch_request_blocking_seconds": Metric("histogram", ("method", "route")),
    # Seconds each request's own steps were ready to run but waited while other code held the
    # loop: what the route suffered, where request_blocking is what it held.
    "loopwatch_request_delayed_seconds": Metric("histogram", ("method", "route")),
    "loopwatch_request_duration_seconds": Metric("histogram", ("method", "route")),
    "loopwatch_requests_total": Metric("counter", ("method", "route", "status")),
    "loopwatch_requests_in_progress": Metric("gauge", ("method", "route")),
    "loopwatch_threadpool_threads_busy": Metric("gauge", ()),
    "loopwatch_threadpool_threads_limit": Metric("gauge", ()),
    "loopwatch_threadpool_tasks_waiting": Metric("gauge", ()),
    "loopwatch_internal_errors_total": Metric("counter", ()),
    # Only with the opt-in admission (LoopWatchMiddleware(admission=...)): requests answered 503
    # while the loop was overloaded (the app never saw them), and 1 while shedding, else 0.
    "loopwatch_requests_shed_total": Metric("counter", ("method", "route")),
    "loopwatch_shedding": Metric("gauge", ()),
}


def series_names() -> set[str]:
    """Every series name the contract produces (histograms with _bucket, _sum and _count)."""
    names = set()
    for name, metric in CONTRACT.items():
        if metric.type == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names
