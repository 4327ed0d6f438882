"""Generates dashboards/loopwatch.json, the Grafana dashboard, with the Grafana Foundation SDK.

    python -m dashboards.loopwatch_dashboard           # write dashboards/loopwatch.json
    python -m dashboards.loopwatch_dashboard --check   # exit 1 if the file is not what this makes

The panels are listed below in dashboard order; each says what it shows (its description,
which docs/sre.md expands), its queries and its unit. Everything else follows from the panel's
kind: layout flows left to right in rows of 24 columns, every query is filtered by the Job
and Instance variables (``$sel``) and, where the metric has a ``route`` label, by Route too;
thresholds are the alerts' (orange for warning, red for critical: tests/test_dashboards.py
checks that they agree with dashboards/prometheus/rules/loopwatch-alerts.yml).
Needs the ``dashboards`` extra (``pip install -e .[dashboards]``, in ``dev`` too).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge as bargauge_
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.builders import stat as stat_
from grafana_foundation_sdk.builders import table as table_
from grafana_foundation_sdk.builders import timeseries as timeseries_
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

from dashboards.contract import CONTRACT

__all__ = ["PATH", "build", "main", "render"]

PATH = Path(__file__).resolve().parent / "loopwatch.json"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
SELECT = 'job=~"$job", instance=~"$instance"'
ROUTED = tuple(name for name, metric in CONTRACT.items() if "route" in metric.labels)

# The alerts' thresholds, as drawn: value -> colour (warning orange, critical red).
LAG_HIGH = {0.1: "orange", 0.5: "red"}  # LoopwatchEventLoopLagHigh
SATURATED = {0.9: "orange"}  # LoopwatchEventLoopSaturated
BLOCKED = {0.1: "orange"}  # LoopwatchEventLoopBlocked
LONG_BLOCK = {1: "orange"}  # LoopwatchEventLoopLongBlock
POOL_SATURATED = {0.9: "orange"}  # LoopwatchThreadPoolSaturated
DELAYED_BY_OTHERS = {0.5: "orange"}  # LoopwatchRouteDelayedByOthers


def select(expr: str) -> str:
    """``metric{..., $sel}`` -> the Job/Instance (and, for per-route metrics, Route) filter."""

    def sub(m: re.Match[str]) -> str:
        # A per-route metric, or a series recorded per route (a level like instance_method_route).
        routed = m.group(1).startswith(ROUTED) or "route" in m.group(1).split(":")[0].split("_")
        return m.group(0).replace("$sel", SELECT + (', route=~"$route"' if routed else ""))

    out = re.sub(r"([a-z_:0-9]+)\{[^}]*\$sel\}", sub, expr)
    if "$sel" in out:
        raise ValueError(f"$sel outside a selector in {expr!r}")
    return out


@dataclass
class Panel:
    kind: str
    title: str
    description: str
    queries: Sequence[tuple[str, str]]
    unit: str
    w: int
    h: int
    thresholds: dict[float, str] = field(default_factory=dict)
    decimals: int | None = None
    value: str = ""  # tables: the value column's name
    columns: tuple[str, ...] = ("job", "instance")  # tables: the label columns
    stacked: bool = False  # timeseries: stacked areas
    dashed: str = ""  # timeseries: series (regex) drawn as a dashed red line


def row(title: str) -> Panel:
    return Panel("row", title, "", (), "", 24, 1)


def stat(title: str, description: str, queries: Sequence[tuple[str, str]], **kw: Any) -> Panel:
    return Panel("stat", title, description, queries, **kw)


def table(title: str, description: str, queries: Sequence[tuple[str, str]], **kw: Any) -> Panel:
    return Panel("table", title, description, queries, **kw)


def timeseries(
    title: str, description: str, queries: Sequence[tuple[str, str]], **kw: Any
) -> Panel:
    return Panel("timeseries", title, description, queries, **kw)


def bargauge(
    title: str, description: str, queries: Sequence[tuple[str, str]], **kw: Any
) -> Panel:
    return Panel("bargauge", title, description, queries, **kw)


PANELS: list[Panel] = [
    row('Fleet overview'),
    stat(
        'Targets up',
        (
            'Scrape targets of the selected jobs and instances that answered their last scrape, '
            'out of all of them. A target whose event loop is blocked for longer than the scrape '
            'timeout shows as down too.\n\nAlert: LoopwatchTargetDown.'
        ),
        [
            ('sum(up{$sel})', 'up'),
            ('count(up{$sel})', 'scraped'),
        ],
        unit='short', w=4, h=4,
    ),
    stat(
        'Worst event-loop lag p99',
        (
            'The highest p99 event-loop lag of any selected instance (recorded over 1-minute '
            'windows). This is the value LoopwatchEventLoopLagHigh evaluates.\n\nThresholds: '
            'LoopwatchEventLoopLagHigh (warning above 100 ms, critical above 500 ms, for 5 '
            'minutes).'
        ),
        [
            (
                'max(instance_quantile:loopwatch_event_loop_lag_seconds:histogram_quantile_rate1m'
                '{quantile="0.99", $sel})',
                'worst p99',
            ),
        ],
        unit='s', w=4, h=4, thresholds=LAG_HIGH,
    ),
    stat(
        'Busiest event loop',
        (
            'The highest event-loop utilization of any selected instance: seconds spent running '
            'callbacks per second.\n\nThresholds: LoopwatchEventLoopSaturated (above 90 % for 10 '
            'minutes).'
        ),
        [
            ('max(instance:loopwatch_event_loop_busy_seconds:rate1m{$sel})', 'busiest'),
        ],
        unit='percentunit', w=4, h=4, thresholds=SATURATED,
    ),
    stat(
        'Blocks per minute, all targets',
        (
            'Blocks per minute over all selected instances: callbacks or task steps that each held '
            'the event loop longer than the block threshold (100 ms by default).'
        ),
        [
            (
                'sum(instance:loopwatch_event_loop_block_duration_seconds_count:rate1m{$sel}) * 60',
                'blocks/min',
            ),
        ],
        unit='cpm', w=4, h=4, decimals=1,
    ),
    stat(
        'Busiest thread pool',
        (
            "The highest share of busy worker threads of any selected instance (AnyIO's default "
            'thread limiter, which runs sync `def` routes).\n\nThresholds: '
            'LoopwatchThreadPoolSaturated (90 % or more of the threads busy for 5 minutes).'
        ),
        [
            ('max(instance:loopwatch_threadpool_threads_busy:ratio{$sel})', 'busiest'),
        ],
        unit='percentunit', w=4, h=4, thresholds=POOL_SATURATED,
    ),
    stat(
        'loopwatch internal errors',
        (
            "Errors loopwatch caught in its own code over the dashboard's time range, all selected "
            'instances. The app is unaffected; measurements may be missing.\n\nAlert: '
            'LoopwatchInternalErrors (any increase in 5 minutes).'
        ),
        [
            ('sum(increase(loopwatch_internal_errors_total{$sel}[$__range]))', 'errors'),
        ],
        unit='short', w=4, h=4, decimals=0,
    ),
    table(
        'Worst instances: event-loop lag p99',
        (
            'The 5 instances with the highest p99 event-loop lag right now (1-minute window): '
            'where to look first. Computed with topk over the per-instance recording rule, so it '
            'stays cheap on a large fleet.\n\nThresholds: LoopwatchEventLoopLagHigh (warning above '
            '100 ms, critical above 500 ms, for 5 minutes).'
        ),
        [
            ((
                'topk(5, '
                'instance_quantile:loopwatch_event_loop_lag_seconds:histogram_quantile_rate1m'
                '{quantile="0.99", $sel})'
            ), '__auto'),
        ],
        unit='s', w=8, h=7, thresholds=LAG_HIGH, value='lag p99',
    ),
    table(
        'Worst instances: event-loop utilization',
        (
            'The 5 instances whose event loop is busiest right now (1-minute '
            'window).\n\nThresholds: LoopwatchEventLoopSaturated (above 90 % for 10 minutes).'
        ),
        [
            ('topk(5, instance:loopwatch_event_loop_busy_seconds:rate1m{$sel})', '__auto'),
        ],
        unit='percentunit', w=8, h=7, thresholds=SATURATED, value='utilization',
    ),
    table(
        'Worst instances: time blocked',
        (
            'The 5 instances whose event loop spent the largest share of the last minute frozen '
            'inside blocks.\n\nThresholds: LoopwatchEventLoopBlocked (above 10 % of the time for 2 '
            'minutes).'
        ),
        [
            (
                'topk(5, instance:loopwatch_event_loop_block_duration_seconds_sum:rate1m{$sel})',
                '__auto',
            ),
        ],
        unit='percentunit', w=8, h=7, thresholds=BLOCKED, value='time blocked',
    ),
    row('Loop health'),
    timeseries(
        'Event-loop lag p50 / p99 / max',
        (
            "How late loopwatch's probe timer (scheduled every ~10 ms) fires: the delay any "
            '`await` on this loop suffers before it resumes. Quantiles are computed from the lag '
            'histogram over all probes of the selected instances (1-minute windows, worker '
            'processes and instances pooled); pick one instance to see it alone, and use the '
            '\'Worst instances\' table to find outliers that a fleet-wide p99 can hide.\n\n"max" '
            'is histogram_quantile(1, ...): the upper bound of the highest histogram bucket that '
            'received a probe in the window. It is an upper bound at bucket resolution, not the '
            'exact worst probe.\n\nThresholds: LoopwatchEventLoopLagHigh (warning above 100 ms, '
            'critical above 500 ms, for 5 minutes).'
        ),
        [
            ((
                'histogram_quantile(0.5, sum by (job, le) '
                '(instance:loopwatch_event_loop_lag_seconds_bucket:rate1m{$sel}))'
            ), '{{job}} p50'),
            ((
                'histogram_quantile(0.99, sum by (job, le) '
                '(instance:loopwatch_event_loop_lag_seconds_bucket:rate1m{$sel}))'
            ), '{{job}} p99'),
            ((
                'histogram_quantile(1, sum by (job, le) '
                '(instance:loopwatch_event_loop_lag_seconds_bucket:rate1m{$sel}))'
            ), '{{job}} max (bucket bound)'),
        ],
        unit='s', w=12, h=8, thresholds=LAG_HIGH,
    ),
    timeseries(
        'Event-loop utilization',
        (
            'Seconds the event loop spent running callbacks per second of wall time (rate of '
            'loopwatch_event_loop_busy_seconds_total over 1 minute): 0 = idle, 1 = never idle. '
            'Shown as the mean over the selected instances and the busiest one. A target running N '
            "worker processes in prometheus_client's multiprocess mode exports the sum of its N "
            'loops, so it can read up to N.\n\nThresholds: LoopwatchEventLoopSaturated (above 90 % '
            'for 10 minutes).'
        ),
        [
            (
                'avg by (job) (instance:loopwatch_event_loop_busy_seconds:rate1m{$sel})',
                '{{job}} mean',
            ),
            (
                'max by (job) (instance:loopwatch_event_loop_busy_seconds:rate1m{$sel})',
                '{{job}} busiest instance',
            ),
        ],
        unit='percentunit', w=12, h=8, thresholds=SATURATED,
    ),
    timeseries(
        'Blocks per minute',
        (
            'How many times per minute a single callback or task step held the event loop longer '
            'than the block threshold (100 ms by default), summed over the selected instances. '
            'Blocks outside any request count too (route "<none>").'
        ),
        [
            ((
                'sum by (job) '
                '(instance:loopwatch_event_loop_block_duration_seconds_count:rate1m{$sel}) * 60'
            ), '{{job}}'),
        ],
        unit='cpm', w=8, h=8,
    ),
    timeseries(
        'Time the loop spent blocked',
        (
            'Share of wall time the event loop spent inside blocks (rate of the block-duration '
            "histogram's sum over 1 minute): while it is frozen in a block nothing else on that "
            'loop runs. Mean over the selected instances and the worst instance.\n\nThresholds: '
            'LoopwatchEventLoopBlocked (above 10 % of the time for 2 minutes).'
        ),
        [
            (
                'avg by (job) '
                '(instance:loopwatch_event_loop_block_duration_seconds_sum:rate1m{$sel})',
                '{{job}} mean',
            ),
            (
                'max by (job) '
                '(instance:loopwatch_event_loop_block_duration_seconds_sum:rate1m{$sel})',
                '{{job}} worst instance',
            ),
        ],
        unit='percentunit', w=8, h=8, thresholds=BLOCKED,
    ),
    timeseries(
        'Longest block (bucket upper bound)',
        (
            'histogram_quantile(1, ...) of the block-duration histogram over 5-minute windows: the '
            'upper bound of the highest bucket that holds a block, i.e. "the longest block was at '
            'most this long", at bucket resolution. Empty when there was no block. A block is '
            'observed when it ends, so a block still in progress is not here yet.\n\nThresholds: '
            'LoopwatchEventLoopLongBlock (a block longer than 1 s in the last 5 minutes).'
        ),
        [
            ((
                'histogram_quantile(1, sum by (job, le) '
                '(instance:loopwatch_event_loop_block_duration_seconds_bucket:rate5m{$sel}))'
            ), '{{job}}'),
        ],
        unit='s', w=8, h=8, thresholds=LONG_BLOCK,
    ),
    row('Who blocks'),
    timeseries(
        'Loop time held by route',
        (
            'Seconds of event-loop time that requests of each route held per second (rate of '
            'loopwatch_request_blocking_seconds_sum), summed over the selected instances. It '
            'counts every task step a request ran on the loop, short or long: a route high here is '
            'what keeps the loop busy.'
        ),
        [
            ((
                'sum by (method, route) '
                '(rate(loopwatch_request_blocking_seconds_sum{$sel}[$__rate_interval]))'
            ), '{{method}} {{route}}'),
        ],
        unit='s', w=12, h=8, stacked=True,
    ),
    bargauge(
        'Share of loop time by route',
        (
            "Each route's share of the time the event loop was busy, averaged over the dashboard's "
            "time range: loop time held by the route's requests divided by the loop's busy time, "
            'per job. What is left to 100 % ran outside requests (background tasks, the probe, '
            'scrapes).'
        ),
        [
            ((
                'sum by (job, method, route) '
                '(rate(loopwatch_request_blocking_seconds_sum{$sel}[$__rate_interval]))\n/ on '
                '(job) group_left ()\nsum by (job) '
                '(rate(loopwatch_event_loop_busy_seconds_total{$sel}[$__rate_interval]))'
            ), '{{method}} {{route}}'),
        ],
        unit='percentunit', w=12, h=8,
    ),
    timeseries(
        'Blocks per minute by route',
        (
            'Blocks per minute attributed to each route: a block is charged to the request whose '
            'task step held the loop. route="<none>" are blocks outside any request (startup, '
            'background tasks, timers).'
        ),
        [
            ((
                'sum by (method, route) '
                '(rate(loopwatch_event_loop_block_duration_seconds_count{$sel}[$__rate_interval])) '
                '* 60'
            ), '{{method}} {{route}}'),
        ],
        unit='cpm', w=12, h=8,
    ),
    timeseries(
        'Longest block by route (bucket upper bound)',
        (
            'Per route, the upper bound of the highest block-duration bucket that holds a block in '
            'the window (histogram_quantile(1, ...)): at bucket resolution, not an exact '
            'maximum.\n\nThresholds: LoopwatchEventLoopLongBlock (a block longer than 1 s in the '
            'last 5 minutes).'
        ),
        [
            ((
                'histogram_quantile(1, sum by (method, route, le) '
                '(rate(loopwatch_event_loop_block_duration_seconds_bucket{$sel}[$__rate_interval])))'
            ), '{{method}} {{route}}'),
        ],
        unit='s', w=12, h=8, thresholds=LONG_BLOCK,
    ),
    table(
        'Routes ranked by loop time held',
        (
            "Total event-loop seconds held by each route's requests over the dashboard's time "
            'range, all selected instances, highest first: the first routes to fix.'
        ),
        [
            ((
                'topk(10, sum by (method, route) '
                '(increase(loopwatch_request_blocking_seconds_sum{$sel}[$__range])))'
            ), '__auto'),
        ],
        unit='s', w=24, h=7, value='loop time held', columns=('method', 'route'),
    ),
    row('HTTP'),
    timeseries(
        'Request rate by route',
        'Requests per second by route template, summed over the selected instances.',
        [
            (
                'sum by (method, route) (rate(loopwatch_requests_total{$sel}[$__rate_interval]))',
                '{{method}} {{route}}',
            ),
        ],
        unit='reqps', w=6, h=8,
    ),
    timeseries(
        'Error rate by route (5xx share)',
        (
            "Share of each route's responses with a 5xx status. Routes without any 5xx show 0 "
            'rather than nothing.'
        ),
        [
            ((
                '(\n  sum by (method, route) (rate(loopwatch_requests_total{status=~"5..", '
                '$sel}[$__rate_interval]))\n  or\n  sum by (method, route) '
                '(rate(loopwatch_requests_total{$sel}[$__rate_interval])) * 0\n)\n/ sum by '
                '(method, route) (rate(loopwatch_requests_total{$sel}[$__rate_interval]))'
            ), '{{method}} {{route}}'),
        ],
        unit='percentunit', w=6, h=8,
    ),
    timeseries(
        'Request duration p50 / p99 by route',
        (
            'Request duration quantiles by route from loopwatch_request_duration_seconds (all '
            'selected instances pooled). Compare with the event-loop lag: a route slow only '
            'because the loop was blocked by another route shows high duration here but little '
            'loop time of its own in "Who blocks".'
        ),
        [
            ((
                'histogram_quantile(0.5, sum by (method, route, le) '
                '(rate(loopwatch_request_duration_seconds_bucket{$sel}[$__rate_interval])))'
            ), 'p50 {{method}} {{route}}'),
            ((
                'histogram_quantile(0.99, sum by (method, route, le) '
                '(rate(loopwatch_request_duration_seconds_bucket{$sel}[$__rate_interval])))'
            ), 'p99 {{method}} {{route}}'),
        ],
        unit='s', w=6, h=8,
    ),
    timeseries(
        'Requests in progress by route',
        (
            'Requests being served right now, by route, summed over the selected instances and '
            'their workers.'
        ),
        [
            (
                'sum by (method, route) (loopwatch_requests_in_progress{$sel})',
                '{{method}} {{route}}',
            ),
        ],
        unit='short', w=6, h=8,
    ),
    row('Thread pool'),
    timeseries(
        'Thread pool: threads busy vs limit',
        (
            "Worker threads of AnyIO's default thread limiter that are running sync (`def`) routes "
            'or run_in_threadpool calls, against the limit (40 per process by default), summed '
            'over the selected instances and workers.'
        ),
        [
            ('sum by (job) (loopwatch_threadpool_threads_busy{$sel})', '{{job}} busy'),
            ('sum by (job) (loopwatch_threadpool_threads_limit{$sel})', '{{job}} limit'),
        ],
        unit='short', w=8, h=8, dashed='.* limit',
    ),
    timeseries(
        'Thread pool utilization',
        (
            'Threads busy divided by the limit, per instance (recording rule '
            'instance:loopwatch_threadpool_threads_busy:ratio): mean over the selected instances '
            'and the busiest one.\n\nThresholds: LoopwatchThreadPoolSaturated (90 % or more of the '
            'threads busy for 5 minutes).'
        ),
        [
            (
                'avg by (job) (instance:loopwatch_threadpool_threads_busy:ratio{$sel})',
                '{{job}} mean',
            ),
            (
                'max by (job) (instance:loopwatch_threadpool_threads_busy:ratio{$sel})',
                '{{job}} busiest instance',
            ),
        ],
        unit='percentunit', w=8, h=8, thresholds=POOL_SATURATED,
    ),
    timeseries(
        'Tasks waiting for a thread',
        (
            'Sync calls queued because every thread of the limiter is taken, summed over the '
            "selected instances. Anything above 0 adds its wait to those requests' latency."
        ),
        [
            ('sum by (job) (loopwatch_threadpool_tasks_waiting{$sel})', '{{job}} waiting'),
        ],
        unit='short', w=8, h=8,
    ),
    row('Load shedding'),
    timeseries(
        'Shed requests by route',
        (
            "Requests per second that loopwatch's admission answered 503 because the event loop "
            'was overloaded, by route, summed over the selected instances (recording rule '
            'instance_method_route:loopwatch_requests_shed:rate1m, 1-minute windows). The app '
            'never saw them: they are not in the request rate. Only instances that run with '
            'admission= shed; routes that shed nothing show 0 rather than nothing.'
        ),
        [
            ((
                'sum by (method, route) '
                '(instance_method_route:loopwatch_requests_shed:rate1m{$sel})\nor\n'
                'sum by (method, route) (rate(loopwatch_requests_total{$sel}[$__rate_interval])) '
                '* 0'
            ), '{{method}} {{route}}'),
        ],
        unit='reqps', w=12, h=8, stacked=True,
    ),
    timeseries(
        'Instances shedding',
        (
            'Per instance, 1 while its admission sheds new requests (loopwatch_shedding), else 0; '
            "the legend's mean is the share of the time range spent shedding. Instances that run "
            'without admission= never shed and show 0 too. Shedding hides the cause, it does not '
            'fix it: look at the loop health and "Who blocks" rows for the same instance. Alert: '
            'LoopwatchShedding (seen shedding in every minute for 5 minutes).'
        ),
        [
            ((
                'max by (job, instance) (loopwatch_shedding{$sel})\nor\n'
                'max by (job, instance) (instance:loopwatch_event_loop_busy_seconds:rate1m{$sel}) '
                '* 0'
            ), '{{job}} {{instance}}'),
        ],
        unit='short', w=12, h=8,
    ),
    row('Who waited on whom'),
    timeseries(
        'Delay suffered from others by route',
        (
            "Seconds per second that each route's requests were ready to run but waited because "
            'other code held the event loop (requests of other routes or of the same route, or '
            'code outside any request), summed over the selected instances (recording rule '
            'instance_method_route:loopwatch_request_delayed_seconds_sum:rate1m, 1-minute '
            'windows). A request is never charged for waiting on itself. Requests wait at the '
            "same time, so the sum can exceed 1. Counted from the request's first step on the "
            'loop, for requests through the middleware. A wake-up by a timer (asyncio.sleep) is '
            'timed exactly; one by I/O that arrived while the loop was held is an upper bound, '
            'counted from the start of that busy stretch.'
        ),
        [
            ((
                'sum by (method, route) '
                '(instance_method_route:loopwatch_request_delayed_seconds_sum:rate1m{$sel})'
            ), '{{method}} {{route}}'),
        ],
        unit='s', w=8, h=8,
    ),
    timeseries(
        'Loop time held by route, beside the delay',
        (
            "Seconds of event-loop time each route's requests held per second, over the same "
            "1-minute windows as the delay next to it (recording rule "
            'instance_method_route:loopwatch_request_blocking_seconds_sum:rate1m): while one '
            'held the loop, every other ready request waited. A route high here while others '
            'suffer delay is whom they waited on. Code outside any request holds the loop too '
            'and is not here: its blocks are route "<none>" in "Blocks per minute by route".'
        ),
        [
            ((
                'sum by (method, route) '
                '(instance_method_route:loopwatch_request_blocking_seconds_sum:rate1m{$sel})'
            ), '{{method}} {{route}}'),
        ],
        unit='s', w=8, h=8, stacked=True,
    ),
    timeseries(
        'Share of latency spent waiting on others',
        (
            "Per route, the share of its requests' duration spent waiting on other code: delay "
            "suffered divided by request duration, both summed over the route's requests in "
            'each 1-minute window (recording rule '
            'instance_method_route:loopwatch_request_delayed_seconds_per_duration_seconds:'
            'ratio_rate1m). Shown for the selected instance where it is highest, as the alert '
            'judges each instance alone. A route near 100 % is slow because of others, not '
            'because of its own code or its dependencies.\n\nThresholds: '
            'LoopwatchRouteDelayedByOthers (above 50 % for 10 minutes, at 1 request a second or '
            'more and over 50 ms of delay per request).'
        ),
        [
            ((
                'max by (method, route) (instance_method_route:'
                'loopwatch_request_delayed_seconds_per_duration_seconds:ratio_rate1m{$sel})'
            ), '{{method}} {{route}}'),
        ],
        unit='percentunit', w=8, h=8, thresholds=DELAYED_BY_OTHERS,
    ),
]


# --------------------------------------------------------------------------------------------
# From the list above to Grafana's model


def _thresholds(steps: dict[float, str]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=None, color="green")]
               + [dm.Threshold(value=v, color=c) for v, c in steps.items()])
    )


def _targets(p: Panel) -> list[prom.Dataquery]:
    out = []
    for ref, (expr, legend) in zip("ABCDEFGH", p.queries, strict=False):
        q = (
            prom.Dataquery().ref_id(ref).datasource(DATASOURCE)
            .editor_mode(pm.QueryEditorMode.CODE).expr(select(expr)).legend_format(legend)
        )
        out.append(q.instant().format(pm.PromQueryFormat.TABLE) if p.kind == "table" else q.range())
    return out


def _stat(p: Panel) -> Any:
    panel = (
        stat_.Panel().color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False))
        .color_mode(cm.BigValueColorMode.VALUE).graph_mode(cm.BigValueGraphMode.AREA)
        .justify_mode(cm.BigValueJustifyMode.AUTO)
        .text_mode(cm.BigValueTextMode.VALUE_AND_NAME)
        .orientation(cm.VizOrientation.AUTO).wide_layout(True).show_percent_change(False)
    )
    return panel.decimals(p.decimals) if p.decimals is not None else panel


def _table(p: Panel) -> Any:
    color_cells = [dm.DynamicConfigValue(
        id_val="custom.cellOptions",
        value=cm.TableColoredBackgroundCellOptions(mode=cm.TableCellBackgroundDisplayMode.BASIC),
    )]
    organize = {
        "excludeByName": {"Time": True, "__name__": True, "quantile": True},
        "indexByName": {**{c: i for i, c in enumerate(p.columns)}, "Value": len(p.columns)},
        "renameByName": {"Value": p.value},
    }
    return (
        table_.Panel().color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .align(cm.FieldTextAlignment.AUTO).cell_options(cm.TableAutoCellOptions())
        .override_by_name(p.value, color_cells)
        .with_transformation(dm.DataTransformerConfig(id_val="organize", options=organize))
        .show_header(True).cell_height(cm.TableCellHeight.SM)
        .sort_by([cb.TableSortByFieldState().display_name(p.value).desc(True)])
        .footer(cb.TableFooterOptions().show(False).reducer(["sum"]).count_rows(False))
    )


def _timeseries(p: Panel) -> Any:
    panel = (
        timeseries_.Panel().color_scheme(db.FieldColor().mode(dm.FieldColorModeId.PALETTE_CLASSIC))
        .draw_style(cm.GraphDrawStyle.LINE).line_width(1).fill_opacity(40 if p.stacked else 10)
        .gradient_mode(cm.GraphGradientMode.NONE).show_points(cm.VisibilityMode.NEVER)
        .span_nulls(False).axis_soft_min(0)
        .stacking(cb.StackingConfig()
                  .mode(cm.StackingMode.NORMAL if p.stacked else cm.StackingMode.NONE).group("A"))
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(
            cm.GraphThresholdsStyleMode.DASHED if p.thresholds
            else cm.GraphThresholdsStyleMode.OFF))
        .legend(cb.VizLegendOptions().show_legend(True).display_mode(cm.LegendDisplayMode.TABLE)
                .placement(cm.LegendPlacement.BOTTOM).calcs(["mean", "max", "lastNotNull"]))
        .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI)
                 .sort(cm.SortOrder.DESCENDING))
    )
    if p.dashed:
        dash = {"fill": "dash", "dash": [10, 10]}
        panel = panel.override_by_regexp(p.dashed, [
            dm.DynamicConfigValue(id_val="custom.lineStyle", value=dash),
            dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
            dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
        ])
    return panel


def _bargauge(p: Panel) -> Any:
    return (
        bargauge_.Panel().min(0).max(1)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.CONTINUOUS_GR_YL_RD))
        .orientation(cm.VizOrientation.HORIZONTAL).display_mode(cm.BarGaugeDisplayMode.GRADIENT)
        .show_unfilled(True).value_mode(cm.BarGaugeValueMode.COLOR)
        .name_placement(cm.BarGaugeNamePlacement.AUTO).sizing(cm.BarGaugeSizing.AUTO)
        .min_viz_height(16).max_viz_height(300).min_viz_width(8)
        .reduce_options(cb.ReduceDataOptions().calcs(["mean"]).fields("").values(False))
    )


_KINDS = {"stat": _stat, "table": _table, "timeseries": _timeseries, "bargauge": _bargauge}


def _variable(name: str, label: str, query: str, all_value: str | None) -> db.QueryVariable:
    var = (
        db.QueryVariable(name).label(label).datasource(DATASOURCE)
        .query({"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"})
        .multi(True).include_all(True)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)
        .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"]))
    )
    return var.all_value(all_value) if all_value else var


def build() -> dict[str, Any]:
    """The dashboard, as the JSON object Grafana reads."""
    dash = (
        db.Dashboard("loopwatch: asyncio event loop").uid("loopwatch")
        .description("Event-loop lag, utilization and blocking per route, HTTP and thread "
                     "pool, across a fleet. Panels and alerts are explained in docs/sre.md.")
        .tags(["loopwatch", "asyncio", "python"]).editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("10s").time("now-30m", "now").timezone("browser").version(1).week_start("")
        .fiscal_year_start_month(0).live_now(False).links([])
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(_variable(
            "job", "Job", "label_values(loopwatch_event_loop_busy_seconds_total, job)", None))
        .with_variable(_variable(
            "instance", "Instance",
            'label_values(loopwatch_event_loop_busy_seconds_total{job=~"$job"}, instance)', ".+"))
        .with_variable(_variable(
            "route", "Route",
            'label_values(loopwatch_requests_total{job=~"$job", instance=~"$instance"}, route)',
            ".*"))
        .annotation(
            db.AnnotationQuery().name("Annotations & Alerts").built_in(1).enable(True).hide(True)
            .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .icon_color("rgba(0, 211, 255, 1)").type("dashboard"))
        .annotation(
            db.AnnotationQuery().name("loopwatch alerts").datasource(DATASOURCE).enable(True)
            .hide(False).icon_color("red")
            # Job-level alerts (no instance label) show whatever instances are selected.
            .expr('ALERTS{alertname=~"Loopwatch.*", alertstate="firing", job=~"$job", '
                  'instance=~"$instance|"}'))
    )
    x = y = line_h = 0
    for ident, p in enumerate(PANELS, start=1):
        if p.kind == "row" or x + p.w > 24:  # a new line
            x, y, line_h = 0, y + line_h, 0
        grid = dm.GridPos(h=p.h, w=p.w, x=x, y=y)
        if p.kind == "row":
            dash = dash.with_row(db.Row(p.title).id(ident).grid_pos(grid))
            y += 1
            continue
        panel = (
            _KINDS[p.kind](p).id(ident).title(p.title).description(p.description)
            .datasource(DATASOURCE).grid_pos(grid).unit(p.unit)
            .thresholds(_thresholds(p.thresholds)).targets(_targets(p))
        )
        dash = dash.with_panel(panel)
        x, line_h = x + p.w, max(line_h, p.h)
    out: dict[str, Any] = json.loads(json.dumps(dash.build(), cls=JSONEncoder))
    # Fields the SDK's generic models do not carry: the query text Grafana shows for a
    # variable, and the Prometheus annotation's step and texts.
    for var in out["templating"]["list"]:
        if var["type"] == "query":
            var["definition"] = var["query"]["query"]
    out["annotations"]["list"][1].update(
        step="30s", titleFormat="{{alertname}}", textFormat="{{severity}} {{job}} {{instance}}",
        useValueForTime=False,
    )
    return out


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--check"]):
        print("usage: python -m dashboards.loopwatch_dashboard [--check]", file=sys.stderr)
        return 2
    text = render()
    if args == ["--check"]:
        if PATH.read_text() != text:
            print(f"{PATH} is not what the generator makes: run "
                  "python -m dashboards.loopwatch_dashboard", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
