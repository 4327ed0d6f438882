"""The live page's table of routes, read from the Prometheus registry (in a worker thread).

With ``PROMETHEUS_MULTIPROC_DIR`` set and no registry of its own, it reads every worker's
files, as ``metrics_app`` does: the table then covers all workers, not only the one that
served the page.
"""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from ._metrics import flush_all

__all__ = ["MAX_ROUTES", "live_workers", "routes"]

#: The table's rows, at most: the routes with the most loop time first.
MAX_ROUTES = 200

_REQUESTS = "loopwatch_requests_total"
_BLOCKING = "loopwatch_request_blocking_seconds_sum"
_BLOCK_COUNT = "loopwatch_event_loop_block_duration_seconds_count"
_BLOCK_BUCKET = "loopwatch_event_loop_block_duration_seconds_bucket"
_BUSY = "loopwatch_event_loop_busy_seconds_total"
_NAMES = (_REQUESTS, _BLOCKING, _BLOCK_COUNT, _BLOCK_BUCKET, _BUSY)
_PID_IN_FILE = re.compile(r"_(\d+)\.db$")

Key = tuple[str, str]


def _samples(registry: CollectorRegistry | None) -> tuple[Iterable[Any], bool]:
    """The samples the table needs, and whether they cover all workers."""
    flush_all()  # requests finished since the last probe
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if registry is None and directory:
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, directory)  # type: ignore[no-untyped-call]
        families = merged.collect()
        every_worker = True
    else:
        families = (REGISTRY if registry is None else registry).restricted_registry(
            _NAMES).collect()
        every_worker = False
    wanted = set(_NAMES)
    return (s for f in families for s in f.samples if s.name in wanted), every_worker


def routes(registry: CollectorRegistry | None, worst_here: Mapping[Key, float],
           ) -> dict[str, Any]:
    """The rows of the table (``MAX_ROUTES`` at most, most loop time first), the loop's busy
    seconds, and which processes they cover.

    ``worst_here`` is this process's exact worst block per route. The registry only knows
    the histogram bucket of the worst block; where this process's worst block falls in that
    bucket it is the worst of all, and the row says so exactly (``worst``); otherwise the
    row gives the bucket's bounds (``worst_range``).
    """
    samples, every_worker = _samples(registry)
    requests: dict[Key, float] = {}
    blocking: dict[Key, float] = {}
    blocks: dict[Key, float] = {}
    buckets: dict[Key, list[tuple[float, float]]] = {}
    busy = 0.0
    for sample in samples:
        name, labels, value = sample.name, sample.labels, sample.value
        if name == _BUSY:
            busy += value
            continue
        key = (labels.get("method", ""), labels.get("route", ""))
        if name == _REQUESTS:
            requests[key] = requests.get(key, 0.0) + value
        elif name == _BLOCKING:
            blocking[key] = blocking.get(key, 0.0) + value
        elif name == _BLOCK_COUNT:
            blocks[key] = blocks.get(key, 0.0) + value
        else:
            buckets.setdefault(key, []).append((float(labels["le"]), value))
    keys = sorted(
        {*requests, *blocking, *(k for k, n in blocks.items() if n)},
        key=lambda k: (-blocking.get(k, 0.0), -blocks.get(k, 0.0), -requests.get(k, 0.0), k),
    )
    rows = []
    for key in keys[:MAX_ROUTES]:
        method, route = key
        row: dict[str, Any] = {
            "method": method,
            "route": route,
            "requests": int(requests.get(key, 0)),
            "blocks": int(blocks.get(key, 0)),
            "blocking_seconds": blocking.get(key, 0.0),
            "share": blocking.get(key, 0.0) / busy if busy > 0 else 0.0,
            "worst": None,
            "worst_range": None,
        }
        if row["blocks"]:
            low, high = _worst_bucket(buckets.get(key, []))
            here = worst_here.get(key)
            if here is not None and low < here <= high:
                row["worst"] = here
            else:
                row["worst_range"] = [low, None if math.isinf(high) else high]
        rows.append(row)
    return {
        "rows": rows,
        "more": max(len(keys) - MAX_ROUTES, 0),
        "busy_seconds": busy,
        "all_workers": every_worker,
    }


def _worst_bucket(buckets: list[tuple[float, float]]) -> tuple[float, float]:
    """The bounds (exclusive, inclusive) of the bucket that holds a histogram's largest
    observation, from its cumulative buckets (summed over workers: cumulative still)."""
    merged: dict[float, float] = {}
    for bound, count in buckets:
        merged[bound] = merged.get(bound, 0.0) + count
    ordered = sorted(merged.items())
    if not ordered:
        return 0.0, math.inf
    total = ordered[-1][1]
    low = 0.0
    for bound, count in ordered:
        if count >= total:
            return low, bound
        low = bound
    return low, math.inf


def live_workers() -> list[int]:
    """The pids of the live processes that wrote to ``PROMETHEUS_MULTIPROC_DIR`` (empty
    without it), this one included."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return []
    pids = set()
    for path in glob.glob(os.path.join(directory, "*.db")):
        match = _PID_IN_FILE.search(path)
        if match:
            pids.add(int(match.group(1)))
    alive = []
    for pid in sorted(pids):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except OSError:  # someone else's process: alive
            pass
        alive.append(pid)
    return alive
