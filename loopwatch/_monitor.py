"""The loop monitor: lag probe, busy time, step timing and block events for one event loop.

It knows nothing of HTTP or Prometheus. Views onto it (the metrics, the middleware, the pytest
plugin, :func:`watch`) subscribe as *sinks* and get called on the loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ._accel import StepState
from ._attribution import Owner
from ._config import Config
from . import _gc
from ._events import BlockEvent
from ._hints import GIL_HINT
from ._hooks import (
    handle_hook_works,
    install_handle_hook,
    make_task_factory,
    uninstall_handle_hook,
)
from ._sched import Mark, SchedReader, held_at_most, open_reader
from ._watchdog import DEAD, DISABLED, GIL_HELD, NOT_SAMPLED, Sample, Watchdog

__all__ = ["Monitor", "Sink", "get_monitor"]

logger = logging.getLogger("loopwatch")

_clock = time.perf_counter
_monitors: dict[asyncio.AbstractEventLoop, Monitor] = {}
_TICK_SECONDS = 1.0
_EMPTY = contextvars.Context()
_thread_cpu = getattr(time, "thread_time", lambda: None)
_IDLE_BUSY = 0.0002  # seconds of loop work between two probes below which the loop is idle
_MARKS = 4  # runqueue-wait marks of the loop thread kept (see _sched)


class Sink(Protocol):
    """What the monitor calls, on the loop thread. Every method is optional."""

    def on_probe(self, lag: float, busy_delta: float) -> None: ...
    def on_block(self, event: BlockEvent) -> None: ...
    def on_tick(self) -> None: ...


def get_monitor(loop: asyncio.AbstractEventLoop | None = None) -> Monitor | None:
    """The monitor running on ``loop`` (default: the running loop), or None."""
    if loop is None:
        loop = asyncio.get_running_loop()
    return _monitors.get(loop)


class Monitor(StepState):
    """Watches one event loop.

    ``Monitor(loop, **options).start()`` on a running (or about to run) loop; ``stop()`` from
    the loop's thread. Options are those of :class:`~loopwatch.Config`, or pass ``config=``.

    Readable at any time: ``lag_count``/``lag_sum``/``lag_max`` (seconds), ``busy`` (seconds
    the loop ran callbacks or task steps), ``block_count`` and ``blocks`` (the most recent
    :class:`~loopwatch.BlockEvent` objects, up to ``ring_size``), ``preempted_count`` (steps
    longer than the threshold that are no block: the OS kept the loop thread off the CPU for
    so much of them that its code held the loop for less than the threshold; Linux only).
    """

    # Attributes written on every step (step_start, busy, threshold, active) and by every
    # request's end (_closing) are in the StepState base: C fields where the extension was
    # built, else plain slots.
    __slots__ = (
        "_block_sinks",
        "_busy_reported",
        "_error_sinks",
        "_factory",
        "_idle_interval",
        "_interval",
        "_next_tick",
        "_previous_factory",
        "_probe_due",
        "_probe_handle",
        "_probe_sinks",
        "_marks",
        "_sched",
        "_sinks",
        "_thread_id",
        "_tick_sinks",
        "_watchdog",
        "_watchdog_reported",
        "block_count",
        "blocks",
        "config",
        "internal_errors",
        "lag_count",
        "lag_max",
        "lag_sum",
        "loop",
        "mode",
        "native_thread_id",
        "preempted_count",
        "probe_deadline",
        "sample",
        "untimed_sample",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        config: Config | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise ValueError("loopwatch: pass either config= or options, not both")
        self.config = config if config is not None else Config(**options)
        self.loop = loop
        self.threshold = self.config.block_threshold
        self.step_start = 0.0
        self.busy = 0.0
        self.sample: Sample | None = None
        self.untimed_sample: Sample | None = None
        self.probe_deadline = 0.0
        self.active = False
        self.lag_count = 0
        self.lag_sum = 0.0
        self.lag_max = 0.0
        self.block_count = 0
        self.preempted_count = 0
        self.internal_errors = 0
        self.blocks: collections.deque[BlockEvent] = collections.deque(
            maxlen=self.config.ring_size
        )
        self.mode = ""
        self._closing: tuple[float, Owner | None] = (0.0, None)
        self._sinks: list[Any] = []
        self._probe_sinks: list[Callable[[float, float], None]] = []
        self._block_sinks: list[Callable[[BlockEvent], None]] = []
        self._tick_sinks: list[Callable[[], None]] = []
        self._error_sinks: list[Callable[[], None]] = []
        self._probe_handle: asyncio.Handle | None = None
        self._probe_due = 0.0
        self._busy_reported = 0.0
        self._watchdog: Watchdog | None = None
        self._thread_id: int | None = None
        self.native_thread_id: int | None = None
        # The loop thread's runqueue wait (Linux), read on the loop thread only.
        self._sched: SchedReader | None = None
        self._marks: collections.deque[Mark] = collections.deque(maxlen=_MARKS)
        self._next_tick = 0.0
        self._previous_factory: Any = None
        self._factory: Any = None
        self._watchdog_reported = False
        # The probe fires every probe_interval while the loop works, and backs off to this
        # while it is idle: on a VM every timer wake-up costs ~0.1 ms of CPU, and an idle
        # loop has no lag to measure.
        base = self.config.probe_interval
        self._interval = base
        self._idle_interval = max(base, min(base * 8, self.config.block_threshold * 0.75))

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Monitor:
        """Start watching. Call on the loop's thread (from a coroutine, or before it runs)."""
        if self.active:
            raise RuntimeError("loopwatch: this monitor is already started")
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        if loop.is_closed():
            raise RuntimeError("loopwatch: cannot start a monitor on a closed event loop")
        existing = _monitors.get(loop)
        if existing is not None:
            raise RuntimeError(
                "loopwatch: a monitor is already running on this loop; "
                "use loopwatch.get_monitor() to share it"
            )
        _monitors[loop] = self
        self.active = True
        _gc.track()
        if _uses_asyncio_handles(loop):
            self.mode = "handle"
            install_handle_hook(loop, self)
        else:
            self.mode = "task-factory"
            self._previous_factory = loop.get_task_factory()
            self._factory = make_task_factory(self, self._previous_factory)
            loop.set_task_factory(self._factory)
        # The first probe runs on the loop thread and starts the watchdog there, so that
        # start() works before run_forever() too.
        self._probe_due = loop.time()
        self._probe_handle = loop.call_soon(self._first_probe, context=contextvars.Context())
        return self

    def stop(self) -> None:
        """Stop watching: cancels the probe, joins the watchdog, removes the hooks."""
        if not self.active:
            return
        self.active = False
        _gc.untrack()
        loop = self.loop
        assert loop is not None
        if _monitors.get(loop) is self:
            del _monitors[loop]
        if self._probe_handle is not None:
            self._probe_handle.cancel()
            self._probe_handle = None
        if self.mode == "handle":
            uninstall_handle_hook(loop)
        elif not loop.is_closed() and loop.get_task_factory() is self._factory:
            loop.set_task_factory(self._previous_factory)
        # A factory someone installed on top of ours keeps calling it; inactive, it only
        # passes through.
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        self.step_start = 0.0
        self._close_sched()

    def loop_closed(self) -> None:
        """Called by the watchdog thread when the loop was closed while this monitor still
        ran: forget the loop, so that neither loopwatch nor this thread keeps it alive."""
        loop = self.loop
        if loop is None or not loop.is_closed() or not self.active:
            return
        self.active = False
        _gc.untrack()
        if _monitors.get(loop) is self:
            del _monitors[loop]
        if self.mode == "handle":
            uninstall_handle_hook(loop)
        self._close_sched()  # the loop thread no longer runs the loop: no concurrent read

    def _close_sched(self) -> None:
        sched, self._sched = self._sched, None
        if sched is not None:
            sched.close()

    def add_sink(self, sink: Any) -> None:
        """Subscribe ``sink``: any object with some of ``on_probe(lag, busy_delta)``,
        ``on_block(event)``, ``on_tick()`` (once a second) and ``on_internal_error()``."""
        if sink not in self._sinks:
            self._sinks.append(sink)
            self._rebuild_sinks()

    def remove_sink(self, sink: Any) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)
            self._rebuild_sinks()

    def _rebuild_sinks(self) -> None:
        def bound(name: str) -> list[Any]:
            return [m for m in (getattr(s, name, None) for s in self._sinks) if m is not None]

        self._probe_sinks = bound("on_probe")
        self._block_sinks = bound("on_block")
        self._tick_sinks = bound("on_tick")
        self._error_sinks = bound("on_internal_error")

    @property
    def watchdog_thread(self) -> threading.Thread | None:
        return self._watchdog.thread if self._watchdog is not None else None

    # -- probe -------------------------------------------------------------------------

    def _first_probe(self) -> None:
        self._thread_id = threading.get_ident()
        self.native_thread_id = threading.get_native_id()
        self._sched = open_reader(self.native_thread_id)
        self._mark()
        if self.config.sample_stacks:
            self._watchdog = Watchdog(self, self._thread_id)
            self._watchdog.start()
        self._next_tick = _clock() + _TICK_SECONDS
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        loop = self.loop
        assert loop is not None
        # From now, not from the last due time: after a block we want one late probe
        # that measures it, not a burst of catch-up probes.
        interval = self._interval
        self._probe_due = loop.time() + interval
        # An empty context: the probe belongs to no request, whoever started the monitor.
        self._probe_handle = loop.call_at(self._probe_due, self._probe, context=_EMPTY)
        # The same deadline on the watchdog's clock.
        self.probe_deadline = _clock() + interval

    def _mark(self) -> float | None:
        """Note the loop thread's runqueue wait now (on the loop thread)."""
        sched = self._sched
        if sched is None:
            return None
        clock = _clock()
        try:
            # Another thread (a forked child's) would read the wrong thread's counter.
            same = threading.get_native_id() == self.native_thread_id
            wait = sched.wait() if same else None
        except Exception:  # noqa: BLE001 - never break the probe: read no more
            wait = None
        if wait is None:
            self._close_sched()
            return None
        self._marks.append((clock, wait))
        return wait

    def _probe(self) -> None:
        loop = self.loop
        assert loop is not None
        self._mark()
        lag = loop.time() - self._probe_due
        lag = max(lag, 0.0)
        self.lag_count += 1
        self.lag_sum += lag
        self.lag_max = max(self.lag_max, lag)
        busy = self.busy
        delta = busy - self._busy_reported
        self._busy_reported = busy
        # Idle (nothing but the probe itself ran): back off; any work: full rate again.
        if delta < _IDLE_BUSY:
            self._interval = min(self._interval * 2, self._idle_interval)
        else:
            self._interval = self.config.probe_interval
        if lag - delta >= self.threshold and self.mode == "task-factory":
            # Untimed code (see the watchdog) held the loop: the probe's lateness is the
            # best measure we have, a lower bound accurate to the probe interval.
            self._untimed_block(lag)
        for on_probe in self._probe_sinks:
            try:
                on_probe(lag, delta)
            except Exception:  # noqa: BLE001 - a sink never breaks the loop
                self.internal_error("sink.on_probe")
        if _clock() >= self._next_tick:
            self._next_tick = _clock() + _TICK_SECONDS
            self._tick()
        if self.active:
            self._schedule_probe()

    def _tick(self) -> None:
        watchdog = self._watchdog
        if watchdog is not None and not watchdog.is_alive() and not self._watchdog_reported:
            self._watchdog_reported = True
            self.internal_error("watchdog thread died")
            logger.error(
                "loopwatch watchdog thread is dead: blocks are still timed, "
                "but their stacks can no longer be sampled"
            )
        for on_tick in self._tick_sinks:
            try:
                on_tick()
            except Exception:  # noqa: BLE001
                self.internal_error("sink.on_tick")

    # -- blocks ------------------------------------------------------------------------

    def note_finished(self, owner: Owner, now: float | None = None) -> float:
        """Called by an owner's code as it finishes, inside its last step.

        Returns the owner's loop time *including the step still running* (until ``now``, a
        ``perf_counter()`` the caller already read, or now), and remembers the owner so that,
        if this step turns out to be a block, the event still names it.
        """
        start = self.step_start
        if not start:
            return owner.busy
        self._closing = (start, owner)
        return owner.busy + ((_clock() if now is None else now) - start)

    def on_block(self, t0: float, duration: float, owner: Owner | None, callback: Any) -> None:
        """Called on the loop thread after a step that ran longer than the threshold."""
        if not self.active:  # the step that stopped the monitor
            return
        try:
            self._record_block(t0, duration, owner, callback)
        except Exception:  # noqa: BLE001 - never break the loop we watch
            self.internal_error("on_block")

    def _untimed_block(self, lag: float) -> None:
        try:
            t0 = _clock() - lag
            # Untimed code ran from when the probe was due: the same test as for a step.
            if self._preempted(t0, lag):
                return
            sample = self.untimed_sample
            if sample is not None and sample.step_start != -self.probe_deadline:
                sample = None
            self._emit(t0, lag, None, None, sample, timed=False)
        except Exception:  # noqa: BLE001
            self.internal_error("untimed block")

    def _record_block(
        self, t0: float, duration: float, owner: Owner | None, callback: Any
    ) -> None:
        if owner is None and self._closing[0] == t0:
            owner = self._closing[1]
        if self._preempted(t0, duration):
            return
        sample = self.sample
        if sample is not None and sample.step_start != t0:
            sample = None
        self._emit(t0, duration, owner, callback, sample, timed=True)

    def _preempted(self, t0: float, duration: float) -> bool:
        """Whether the loop thread provably spent so much of this stretch waiting for a CPU
        (runnable, but the OS ran something else) that the code held the loop for less than
        the threshold: then it is no block. False whenever it cannot tell."""
        if self._sched is None:
            return False
        try:
            marks = tuple(self._marks)
            wait_end = self._mark()
            if wait_end is None or not marks:
                return False
            held = held_at_most(marks, t0, _clock(), wait_end)
        except Exception:  # noqa: BLE001 - report the block as without schedstat
            self._close_sched()
            return False
        if held >= self.threshold:
            return False
        self.preempted_count += 1
        logger.debug(
            "loopwatch: a %.1f ms stretch of the loop is no block: the loop thread waited "
            "for a CPU for all but at most %.1f ms of it",
            duration * 1e3, held * 1e3,
        )
        return True

    def _emit(
        self, t0: float, duration: float, owner: Owner | None, callback: Any,
        sample: Sample | None, timed: bool,
    ) -> None:
        if sample is not None:
            frames, status, task = sample.frames, sample.status, sample.task
            hint = sample.hint_at(_thread_cpu(), _clock())
        else:
            frames, hint, task = (), None, None
            watchdog = self._watchdog
            if watchdog is None:
                status = DISABLED
            elif not watchdog.is_alive():
                status = DEAD  # not the GIL: nothing was there to sample
            elif watchdog.starved_during(t0, t0 + duration):
                status, hint = GIL_HELD, GIL_HINT
            else:
                status = NOT_SAMPLED
        task = _task_of(callback) or task
        method, route = owner.labels() if owner is not None else (None, None)
        gc_seconds = _gc.collector_time(t0, t0 + duration, self._thread_id)
        if gc_seconds and duration - gc_seconds < self.threshold:
            # The collector's block, not the code of the step it interrupted.
            method, route, frames, hint = None, _gc.GC_ROUTE, (), _gc.GC_HINT
            status = _gc.GC_STATUS
        event = BlockEvent(
            time=time.time() - (_clock() - t0),
            duration=duration,
            task=task,
            frames=frames,
            hint=hint,
            stack_status=status,
            method=method,
            route=route,
            timed=timed,
            gc_seconds=gc_seconds,
        )
        self.block_count += 1
        self.blocks.append(event)
        for on_block in self._block_sinks:
            try:
                on_block(event)
            except Exception:  # noqa: BLE001
                self.internal_error("sink.on_block")
        if self.config.log_blocks:
            _log_block(event)

    def internal_error(self, where: str) -> None:
        """Count a failure inside loopwatch; log its traceback only the first time."""
        self.internal_errors += 1
        if self.internal_errors == 1:
            # Not logger.exception: a failure found by a check (a dead watchdog) has no
            # traceback, and would log a "NoneType: None" one.
            logger.error(
                "loopwatch internal error in %s (further ones are only counted)", where,
                exc_info=sys.exc_info()[0] is not None,
            )
        for on_error in self._error_sinks:
            try:
                on_error()
            except Exception:  # noqa: BLE001
                pass

    def __repr__(self) -> str:
        state = "active" if self.active else "stopped"
        return f"<loopwatch.Monitor {state} mode={self.mode or '-'} {self.config!r}>"


def _uses_asyncio_handles(loop: asyncio.AbstractEventLoop) -> bool:
    """True when the loop runs its callbacks through asyncio.events.Handle._run."""
    return isinstance(loop, asyncio.BaseEventLoop) and handle_hook_works()


def _task_of(callback: Any) -> str | None:
    """The name of the task a step belongs to: a Task itself, or a Handle's step callback."""
    task = callback if isinstance(callback, asyncio.Task) else getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        return task.get_name()
    return None


def _log_block(event: BlockEvent) -> None:
    frame = event.blocking_frame
    logger.warning(
        event.summary(),
        extra={
            "loopwatch_event": event.as_dict(),
            "block_duration": event.duration,
            "block_task": event.task,
            "block_location": frame.location if frame else None,
            "block_function": frame.function if frame else None,
            "block_hint": event.hint,
            "block_method": event.method,
            "block_route": event.route,
            "block_stack_status": event.stack_status,
        },
    )
