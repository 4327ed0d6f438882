"""Latency percentiles in bounded memory, for a load generator that may run for days.

Keeping every sample would grow without bound (200 requests/s is 17 million samples a
day); a histogram with logarithmic buckets keeps a few hundred counters and answers any
percentile within 1 %.
"""

from __future__ import annotations

import math
from collections import Counter

__all__ = ["LatencyHistogram"]

_GROWTH = 1.01  # each bucket is 1 % wider than the one below it
_LOG_GROWTH = math.log(_GROWTH)
_FLOOR = 1e-6  # 1 µs: anything faster lands in the first bucket


class LatencyHistogram:
    """Counts of latencies (in seconds) in buckets ``(g**(i-1), g**i]`` with ``g = 1.01``."""

    __slots__ = ("_buckets", "count", "max", "total")

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        self._buckets[math.ceil(math.log(max(seconds, _FLOOR)) / _LOG_GROWTH)] += 1
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0 < q <= 1) by nearest rank, at most 1 % above the true value.

        Raises ``ValueError`` when nothing was recorded: there is no latency to report.
        """
        if not 0 < q <= 1:
            raise ValueError(f"q={q!r} is invalid: expected 0 < q <= 1, e.g. 0.99")
        if not self.count:
            raise ValueError("no latency was recorded")
        rank = math.ceil(q * self.count)
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                return min(_GROWTH**index, self.max)
        raise AssertionError("unreachable: the buckets hold count samples")

    def __repr__(self) -> str:
        return f"<LatencyHistogram count={self.count} max={self.max:.6f}>"
