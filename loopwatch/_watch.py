"""``async with loopwatch.watch(): ...`` — watch the running loop for the length of a block."""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import TYPE_CHECKING

from ._config import Config, ConfigOptions
from ._events import BlockEvent
from ._monitor import Monitor, get_monitor

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Watch", "watch"]


class Watch:
    """Collects what happens on the running loop between ``__aenter__`` and ``__aexit__``.

    If a monitor already runs on the loop (say, the middleware's), the watch joins it and
    sees the blocks at or above its own threshold; it cannot see below the running
    monitor's threshold and says so. Otherwise it starts, and later stops, its own monitor.

    After (or during) the block: ``blocks`` (the block events), ``max_lag``, ``busy``
    (seconds of loop time used) and ``monitor``.
    """

    __slots__ = (
        "_busy0",
        "_busy1",
        "_lag0",
        "_lagmax0",
        "_lagsum",
        "_own",
        "_state",
        "_t0",
        "_t1",
        "blocks",
        "config",
        "monitor",
    )

    def __init__(self, config: Config) -> None:
        self.config = config
        self.blocks: list[BlockEvent] = []
        self.monitor: Monitor | None = None
        self._own = False
        self._state = "new"
        self._busy0 = self._busy1 = 0.0
        self._lag0 = 0
        self._lagmax0 = 0.0
        self._lagsum = 0.0
        self._t0 = self._t1 = 0.0

    async def __aenter__(self) -> Watch:
        if self._state != "new":
            raise RuntimeError(f"loopwatch.watch() cannot be entered twice (it is {self._state})")
        loop = asyncio.get_running_loop()
        monitor = get_monitor(loop)
        if monitor is None:
            monitor = Monitor(loop, config=self.config).start()
            self._own = True
        elif monitor.config.block_threshold > self.config.block_threshold:
            raise ValueError(
                f"loopwatch: invalid block_threshold={self.config.block_threshold!r} for a "
                f"watch; allowed: a value >= {monitor.config.block_threshold!r}, the threshold "
                "of the monitor already running on this loop"
            )
        self.monitor = monitor
        monitor.add_sink(self)
        self._busy0 = monitor.busy
        self._state = "watching"
        self._t0 = time.perf_counter()
        # Let the monitor's first probe run, so the watchdog is up before the body blocks.
        await asyncio.sleep(0)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self._state != "watching":
            return
        monitor = self.monitor
        assert monitor is not None
        self._t1 = time.perf_counter()
        # The step running now (the watch ends inside it) counts too: its loop time so far,
        # and how late the probe is by now, which is the lag its users see.
        running = self._t1 - monitor.step_start if monitor.step_start else 0.0
        loop = monitor.loop
        if loop is not None and monitor._probe_due:
            self.on_probe(max(0.0, loop.time() - monitor._probe_due), 0.0)
        busy_end = monitor.busy + running
        if self._own:
            # A step still running that already blocked (the body ended in it, with no
            # await after the blocking call) is reported as the monitor stops: to us too.
            monitor.stop()
        else:
            # The monitor goes on, and will report that step when it ends: too late for us.
            try:
                block = monitor._running_block()
            except Exception:  # noqa: BLE001 - never break the code we watch
                monitor._internal_error("watch")
                block = None
            if block is not None:
                self.on_block(block)
        self._busy1 = busy_end
        monitor.remove_sink(self)
        self._state = "closed"

    # Sink interface ----------------------------------------------------------------------
    def on_probe(self, lag: float, busy_delta: float) -> None:
        self._lagmax0 = max(self._lagmax0, lag)
        self._lag0 += 1
        self._lagsum += lag

    def on_block(self, event: BlockEvent) -> None:
        if event.duration >= self.config.block_threshold:
            self.blocks.append(event)

    # Results ---------------------------------------------------------------------------
    @property
    def max_lag(self) -> float:
        """The largest probe lateness seen during the watch, in seconds."""
        return self._lagmax0

    @property
    def mean_lag(self) -> float:
        """The mean probe lateness during the watch, in seconds."""
        return self._lagsum / self._lag0 if self._lag0 else 0.0

    @property
    def owns_monitor(self) -> bool:
        """Whether this watch started (and stops) the monitor, rather than joining one."""
        return self._own

    @property
    def probes(self) -> int:
        return self._lag0

    @property
    def busy(self) -> float:
        """Seconds of loop time used by callbacks and task steps during the watch."""
        monitor = self.monitor
        if monitor is None:
            return 0.0
        end = self._busy1 if self._state == "closed" else monitor.busy
        return end - self._busy0

    @property
    def elapsed(self) -> float:
        end = self._t1 if self._state == "closed" else time.perf_counter()
        return end - self._t0 if self._t0 else 0.0

    def __repr__(self) -> str:
        return (f"<loopwatch.Watch {self._state} blocks={len(self.blocks)} "
                f"max_lag={self.max_lag:.4f}s>")


def watch(**options: Unpack[ConfigOptions]) -> Watch:
    """Watch the running loop for the duration of an ``async with`` block.

    ``options`` are those of :class:`~loopwatch.Config` and are validated here, when the
    watch is created::

        async with loopwatch.watch(block_threshold=0.05) as w:
            await handler()
        assert not w.blocks, w.blocks[0].summary()
    """
    return Watch(Config(**options))
