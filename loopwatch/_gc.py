"""Garbage-collector pauses: telling a block by the code from one by the collector.

A full (generation 2) collection of a large heap runs for tens of milliseconds inside
whichever step happened to allocate the object that triggered it, holding the GIL: a real
stall of the loop, but not that step's code. ``gc.callbacks`` tells when each collection
started and stopped; the recent ones are kept, and a block is compared with them after the
fact. Collections are rare in a steady state (they follow the net growth of container
objects), so two small calls per collection cost nothing measurable; nothing runs per step.
"""

from __future__ import annotations

import collections
import gc
import threading
import time
from typing import Any

__all__ = ["GC_HINT", "GC_ROUTE", "GC_STATUS", "collector_time", "track", "untrack"]

_clock = time.perf_counter

GC_ROUTE = "<gc>"
GC_HINT = (
    "Python's garbage collector held the loop: fewer long-lived objects, "
    "`gc.freeze()` after startup, or higher `gc.set_threshold()` make full collections "
    "rarer"
)
GC_STATUS = "unavailable: Python's garbage collector ran (and held the GIL) for most of it"


class _Pauses:
    """The last collections, as (start, stop, thread) on perf_counter's clock."""

    def __init__(self, size: int = 64) -> None:
        self.recent: collections.deque[tuple[float, float, int]] = collections.deque(
            maxlen=size)
        self._started = 0.0

    def __call__(self, phase: str, info: Any) -> None:
        # Collections never overlap (they hold the GIL), whatever thread triggers them.
        if phase == "start":
            self._started = _clock()
        else:
            self.recent.append((self._started, _clock(), threading.get_ident()))


_pauses = _Pauses()
_users = 0
_lock = threading.Lock()


def track() -> None:
    """Start recording collections (once for any number of monitors)."""
    global _users
    with _lock:
        _users += 1
        if _pauses not in gc.callbacks:
            gc.callbacks.append(_pauses)


def untrack() -> None:
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if not _users and _pauses in gc.callbacks:
            gc.callbacks.remove(_pauses)


def collector_time(start: float, end: float, thread: int | None) -> float:
    """Seconds of ``[start, end]`` (perf_counter) the garbage collector ran in ``thread``.

    Only the loop thread's own collections count: one run by another thread while the loop
    thread waits in a call of its own (``time.sleep``, a socket) does not hold the loop up
    any longer, and one that made the loop thread wait for the GIL is like any other thread
    holding the GIL.
    """
    total = 0.0
    for began, stopped, ident in tuple(_pauses.recent):
        overlap = min(stopped, end) - max(began, start)
        if overlap > 0.0 and ident == thread:
            total += overlap
    return total
