"""Lag-aware admission: new requests get ``503`` while the event loop is overloaded.

:class:`Admission` holds the limits (validated when it is made); the middleware that is given
one makes a :class:`Shedder`, a monitor sink that reads every lag probe and decides whether
new requests are shed. The middleware reads one flag per request; without ``admission=``
nothing here runs.

When shedding starts: at the first probe that ran later than ``max_lag`` (the loop is
stalled now), or at the end of a window whose utilization passed ``max_utilization``. When
it stops: at the end of a window, at least one window after it started, in which the
largest lag and the utilization both stayed at or below ``resume`` times their limits
(hysteresis: it does not flap on a loop hovering at the limit).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._config import _coerce, _Option

__all__ = ["Admission", "Shedder"]

logger = logging.getLogger("loopwatch")
_clock = time.perf_counter


#: The limits of an Admission's settings (checked as Config's options are).
_LIMITS = {
    "max_lag": _Option(float, None, 0.0, 60.0, low_open=True,
                       allowed="a number of seconds > 0 and <= 60"),
    "max_utilization": _Option(float, None, 0.0, 1.0, low_open=True,
                               allowed="a fraction > 0 and <= 1"),
    "window": _Option(float, 1.0, 0.1, 60.0, allowed="a number of seconds from 0.1 to 60"),
    "resume": _Option(float, 0.5, 0.0, 1.0, low_open=True, allowed="a fraction > 0 and <= 1"),
    "retry_after": _Option(int, None, 1, 3600, allowed="whole seconds from 1 to 3600"),
}


def _check(name: str, value: Any) -> Any:
    return _coerce(name, _LIMITS[name], value, "Admission ")


class Admission:
    """Opt-in load shedding for :class:`~loopwatch.LoopWatchMiddleware` (``admission=``).

    * ``max_lag`` — shed when a lag probe runs this many seconds late (the loop is stalled);
    * ``max_utilization`` — shed when the loop was busy more than this fraction (0–1] of a
      window;
    * ``window`` — seconds over which utilization and recovery are judged (default 1 s);
    * ``resume`` — shedding stops after a whole window with the lag and the utilization at or
      below this fraction of their limits (default 0.5);
    * ``retry_after`` — the ``Retry-After`` header of a shed request, whole seconds (default:
      the window, rounded up);
    * ``exclude_paths`` — paths always served (health checks); the middleware's own
      ``exclude_paths`` (default ``/metrics``) are always served too.

    At least one of ``max_lag`` and ``max_utilization`` is needed. A bad value raises
    :class:`ValueError` naming it and what is allowed.
    """

    __slots__ = ("exclude_paths", "max_lag", "max_utilization", "resume", "retry_after",
                 "window")

    def __init__(
        self,
        *,
        max_lag: float | None = None,
        max_utilization: float | None = None,
        window: float = 1.0,
        resume: float = 0.5,
        retry_after: int | None = None,
        exclude_paths: Iterable[str] = (),
    ) -> None:
        if max_lag is None and max_utilization is None:
            raise ValueError("loopwatch: Admission needs max_lag (seconds) or max_utilization "
                             "(a fraction of the loop's time), or both")
        self.max_lag: float | None = None if max_lag is None else _check("max_lag", max_lag)
        self.max_utilization: float | None = (
            None if max_utilization is None else _check("max_utilization", max_utilization))
        self.window: float = _check("window", window)
        self.resume: float = _check("resume", resume)
        self.retry_after: int = _check(
            "retry_after", max(1, math.ceil(self.window)) if retry_after is None else retry_after)
        if isinstance(exclude_paths, str) or not all(
                isinstance(p, str) and p.startswith("/") for p in exclude_paths):
            raise ValueError(f"loopwatch: invalid Admission exclude_paths={exclude_paths!r}; "
                             "allowed: an iterable of paths starting with '/'")
        self.exclude_paths = frozenset(exclude_paths)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Admission({args})"


class Shedder:
    """One middleware's admission state: a monitor sink (``on_probe``) that calls
    ``on_change(shedding, reason)`` when shedding starts or stops."""

    def __init__(self, admission: Admission, on_change: Callable[[bool, str], None]) -> None:
        self.admission = admission
        self.shedding = False
        self._on_change = on_change
        self._since = 0.0
        self._window_start = _clock()
        self._busy = 0.0
        self._lag_max = 0.0

    def on_probe(self, lag: float, busy_delta: float) -> None:
        now = _clock()
        self._busy += busy_delta
        self._lag_max = max(self._lag_max, lag)
        limits = self.admission
        if not self.shedding and limits.max_lag is not None and lag > limits.max_lag:
            self._change(True, now, f"event loop lag {lag * 1e3:.0f} ms > max_lag "
                                    f"{limits.max_lag * 1e3:.0f} ms")
        elapsed = now - self._window_start
        if elapsed < limits.window:
            return
        utilization = min(self._busy / elapsed, 1.0)
        lag_max = self._lag_max
        self._window_start, self._busy, self._lag_max = now, 0.0, 0.0
        if not self.shedding:
            if limits.max_utilization is not None and utilization > limits.max_utilization:
                self._change(True, now, f"event loop utilization {utilization:.0%} > "
                                        f"max_utilization {limits.max_utilization:.0%}")
        elif now - self._since >= limits.window and self._calm(lag_max, utilization):
            self._change(False, now, f"largest lag {lag_max * 1e3:.0f} ms, utilization "
                                     f"{utilization:.0%} over the last {elapsed:.1f} s")

    def _calm(self, lag_max: float, utilization: float) -> bool:
        limits, resume = self.admission, self.admission.resume
        return ((limits.max_lag is None or lag_max <= limits.max_lag * resume)
                and (limits.max_utilization is None
                     or utilization <= limits.max_utilization * resume))

    def _change(self, shedding: bool, now: float, reason: str) -> None:
        self.shedding = shedding
        self._since = now
        self._on_change(shedding, reason)

    def reset(self) -> None:
        """Serve again (the monitor stopped: no signal to shed on)."""
        if self.shedding:
            self._change(False, _clock(), "the loop monitor stopped")
