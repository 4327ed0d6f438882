"""The live page's memory of the last minutes: loop lag and utilization per second.

A :class:`History` is a monitor sink. Once :func:`loopwatch.ui_app` has been called, every
monitor that starts gets one (:func:`enable`), so the charts have data before anyone opens
the page; a process that never builds the page never pays for it. Per probe it keeps a
maximum and a sum; once a second it appends one point to a ring of ``seconds`` points.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
import weakref
from typing import Any

from . import _monitor
from ._events import BlockEvent
from ._metrics import NONE

__all__ = ["History", "Point", "enable", "history_for"]

logger = logging.getLogger("loopwatch")

#: One second of the loop: (sequence number, wall time at its end, the largest probe lag in
#: it, its utilization (busy seconds per second), the blocks that ended in it).
Point = tuple[int, float, float, float, int]

_clock = time.perf_counter
#: Distinct (method, route) keys whose worst block is remembered (labels are bounded by the
#: middleware already; this only guards against a monitor fed by something else).
_MAX_ROUTES = 10_000

_lock = threading.Lock()
_seconds = 0  # the longest history any ui_app asked for; 0 until one did
_histories: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, History] = (
    weakref.WeakKeyDictionary()
)


class History:
    """Per-second loop lag and utilization, fed by one monitor on its loop thread."""

    __slots__ = ("_blocks", "_busy", "_lag_max", "_next", "_since", "epoch", "monitor_id",
                 "points", "worst")

    def __init__(self, seconds: int, monitor_id: int = 0) -> None:
        self.points: collections.deque[Point] = collections.deque(maxlen=seconds)
        #: The worst block of each (method, route) label, in seconds.
        self.worst: dict[tuple[str, str], float] = {}
        #: Tells one monitor's history (and its events' numbering) from the next one's.
        self.epoch = f"{os.getpid()}-{os.urandom(4).hex()}"
        self.monitor_id = monitor_id
        self._lag_max = 0.0
        self._busy = 0.0
        self._blocks = 0
        self._next = 0
        self._since = _clock()

    # -- monitor sink (loop thread) --------------------------------------------------------

    def on_probe(self, lag: float, busy_delta: float) -> None:
        if lag > self._lag_max:
            self._lag_max = lag
        self._busy += busy_delta

    def on_block(self, event: BlockEvent) -> None:
        key = (event.method or NONE, event.route or NONE)
        worst = self.worst.get(key)
        if worst is None:
            if len(self.worst) < _MAX_ROUTES:
                self.worst[key] = event.duration
        elif event.duration > worst:
            self.worst[key] = event.duration
        self._blocks += 1

    def on_tick(self) -> None:
        now = _clock()
        elapsed = now - self._since
        utilization = min(self._busy / elapsed, 1.0) if elapsed > 0 else 0.0
        self.points.append((self._next, time.time(), self._lag_max, utilization, self._blocks))
        self._next += 1
        self._since = now
        self._lag_max = 0.0
        self._busy = 0.0
        self._blocks = 0

    @property
    def seconds(self) -> int:
        return self.points.maxlen or 0


def enable(seconds: int) -> None:
    """Give every monitor that starts from now on a history of at least ``seconds``."""
    global _seconds
    with _lock:
        first = _seconds == 0
        _seconds = max(_seconds, seconds)
        if first:
            _monitor._start_hooks.append(_attach_at_start)


def _attach_at_start(monitor: Any) -> None:
    try:
        _attach(monitor)
    except Exception:  # noqa: BLE001 - never stop a monitor from starting
        logger.exception("loopwatch: could not attach the live page's history")


def _attach(monitor: Any) -> History:
    history = History(_seconds or 60, id(monitor))
    _histories[monitor.loop] = history
    monitor.add_sink(history)
    return history


def history_for(monitor: Any) -> History:
    """The history of ``monitor`` (on its loop thread); attached now if it started before
    any ``ui_app`` was built, in which case it starts empty."""
    history = _histories.get(monitor.loop)
    if history is None or history.monitor_id != id(monitor):
        history = _attach(monitor)
    return history
