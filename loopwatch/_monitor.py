"""The loop monitor: lag probe, busy time, step timing and block events for one event loop.

It knows nothing of HTTP or Prometheus. Views onto it (the metrics, the middleware, the pytest
plugin, :func:`watch`) subscribe as *sinks* and get called on the loop thread.

A block's way from the blocking line to the metric: the step hooks (:mod:`._hooks`) time every
step and call :meth:`Monitor.on_block` after one that held the loop for ``block_threshold`` or
more; the watchdog (:mod:`._watchdog`) has meanwhile sampled the loop thread's stack while it
was still blocked; :meth:`Monitor.on_block` builds the :class:`~loopwatch.BlockEvent` from both
and hands it to the sinks, the Prometheus metrics (:mod:`._metrics`) among them.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from . import _gc
from ._accel import StepState
from ._attribution import AnyOwner, current_owner
from ._config import Config, ConfigOptions
from ._events import BlockEvent
from ._hints import GIL_HINT, PAUSE_HINT
from ._hooks import (
    handle_hook_works,
    install_handle_hook,
    make_task_factory,
    uninstall_handle_hook,
)
from ._sched import Mark, SchedReader, inside, open_reader
from ._waiting import IDLE_GAP, LOOK_AFTER, wake_due
from ._watchdog import DEAD, DISABLED, GIL_HELD, NOT_SAMPLED, Sample, Watchdog

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["PAUSED_ROUTE", "Monitor", "Sink", "get_monitor"]

logger = logging.getLogger("loopwatch")

_clock = time.perf_counter
#: The running monitor of each loop (loops are held weakly: a closed loop is let go).
_monitors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Monitor] = (
    weakref.WeakKeyDictionary()
)
_TICK_SECONDS = 1.0
_EMPTY = contextvars.Context()
_thread_cpu = getattr(time, "thread_time", lambda: None)
_IDLE_BUSY = 0.0002  # seconds of loop work between two probes below which the loop is idle
_MARKS = 4  # scheduling marks of the loop thread kept (see _sched)

#: The route of a block that the whole process standing still caused, not the step's code.
PAUSED_ROUTE = "<paused>"
PAUSED_STATUS = "unavailable: the whole process was paused for most of it"

#: Called with each monitor as it starts, on the loop thread (the live page's history).
_start_hooks: list[Callable[[Monitor], None]] = []


class Sink(Protocol):
    """What :meth:`Monitor.add_sink` takes: an object with any of these methods, which the
    monitor calls on the loop thread (a method the sink does not have is not called; one
    that raises is counted as loopwatch's internal error and never reaches the loop).

    * ``on_probe(lag, busy_delta)`` -- each lag probe: how late it ran, and the loop's busy
      seconds since the previous probe;
    * ``on_block(event)`` -- each :class:`~loopwatch.BlockEvent`;
    * ``on_tick()`` -- once a second;
    * ``on_internal_error()`` -- each internal error.
    """

    def on_probe(self, lag: float, busy_delta: float) -> None: ...
    def on_block(self, event: BlockEvent) -> None: ...
    def on_tick(self) -> None: ...
    def on_internal_error(self) -> None: ...


def get_monitor(loop: asyncio.AbstractEventLoop | None = None) -> Monitor | None:
    """The monitor running on ``loop`` (default: the running loop), or None."""
    if loop is None:
        loop = asyncio.get_running_loop()
    return _monitors.get(loop)


class Monitor(StepState):
    """Watches one event loop.

    ``Monitor(loop, **options).start()`` on a running (or about to run) loop; ``stop()`` from
    the loop's thread. Options are those of :class:`~loopwatch.Config`, or pass ``config=``;
    ``meter_provider=`` (an OpenTelemetry ``MeterProvider``) sends the loop's lag, busy time,
    blocks and internal errors through it.

    Readable at any time: ``lag_count``/``lag_sum``/``lag_max`` (seconds), ``busy`` (seconds
    the loop ran callbacks or task steps), ``block_count`` and ``blocks`` (the most recent
    :class:`~loopwatch.BlockEvent` objects, up to ``ring_size``).

    The monitor holds its loop weakly: a loop that is closed and dropped without ``stop()``
    (a server run without lifespan) takes the monitor's hooks with it.
    """

    # Attributes written on every step (step_start, busy, threshold, active, and the loop's
    # waiting: last_end, idle, run_start, last_gap, long_end, due, idle_gap, look_after) are in the
    # StepState base: C fields where the extension was built, else plain slots.
    __slots__ = (
        "_block_sinks",
        "_busy_reported",
        "_closing",
        "_error_sinks",
        "_factory",
        "_finalizer",
        "_idle_interval",
        "_interval",
        "_loop_ref",
        "_marks",
        "_next_tick",
        "_native_thread_id",
        "_previous_factory",
        "_probe_due",
        "_probe_handle",
        "_probe_sinks",
        "_sample",
        "_sched",
        "_sinks",
        "_stops_with_users",
        "_thread_id",
        "_tick_sinks",
        "_untimed_sample",
        "_users",
        "_watchdog",
        "_watchdog_reported",
        "__weakref__",
        "block_count",
        "blocks",
        "config",
        "internal_errors",
        "lag_count",
        "lag_max",
        "lag_sum",
        "mode",
        "probe_deadline",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        config: Config | None = None,
        meter_provider: Any = None,
        **options: Unpack[ConfigOptions],
    ) -> None:
        if config is not None and options:
            raise ValueError("loopwatch: pass either config= or options, not both")
        self.config = config if config is not None else Config(**options)
        otel = None
        if meter_provider is not None:
            from ._otel import OtelMetrics

            otel = OtelMetrics(meter_provider)
        self._loop_ref: weakref.ref[asyncio.AbstractEventLoop] | None = (
            weakref.ref(loop) if loop is not None else None
        )
        self.threshold = self.config.block_threshold
        self.step_start = 0.0
        self.busy = 0.0
        self.last_end = 0.0
        self.idle = 0.0
        self.run_start = 0.0
        self.last_gap = 0.0
        self.long_end = 0.0
        self.due = 0.0
        self.idle_gap = IDLE_GAP
        self.look_after = LOOK_AFTER
        self._sample: Sample | None = None
        self._untimed_sample: Sample | None = None
        self.probe_deadline = 0.0
        self.active = False
        self.lag_count = 0
        self.lag_sum = 0.0
        self.lag_max = 0.0
        self.block_count = 0
        self.internal_errors = 0
        self.blocks: collections.deque[BlockEvent] = collections.deque(
            maxlen=self.config.ring_size
        )
        self.mode = ""
        self._closing: tuple[float, AnyOwner | None] = (0.0, None)
        self._sinks: list[Any] = []
        self._probe_sinks: list[Callable[[float, float], None]] = []
        self._block_sinks: list[Callable[[BlockEvent], None]] = []
        self._tick_sinks: list[Callable[[], None]] = []
        self._error_sinks: list[Callable[[], None]] = []
        self._probe_handle: weakref.ref[Any] | None = None
        self._probe_due = 0.0
        self._busy_reported = 0.0
        self._watchdog: Watchdog | None = None
        self._thread_id: int | None = None
        self._native_thread_id: int | None = None
        # The loop thread's scheduling counters (Linux), read on the loop thread only.
        self._sched: SchedReader | None = None
        self._marks: collections.deque[Mark] = collections.deque(maxlen=_MARKS)
        self._next_tick = 0.0
        self._previous_factory: Any = None
        self._factory: Any = None
        self._watchdog_reported = False
        self._finalizer: weakref.finalize[Any, Any] | None = None
        #: Who keeps this monitor running (see _shared/_leave), and whether it stops with
        #: the last of them.
        self._users: list[Any] = []
        self._stops_with_users = False
        if otel is not None:
            self.add_sink(otel)
        # The probe fires every probe_interval while the loop works, and backs off to this
        # while it is idle: on a VM every timer wake-up costs ~0.1 ms of CPU, and an idle
        # loop has no lag to measure.
        base = self.config.probe_interval
        self._interval = base
        self._idle_interval = max(base, min(base * 8, self.config.block_threshold * 0.75))

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The watched loop (None once it is gone)."""
        ref = self._loop_ref
        return ref() if ref is not None else None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Monitor:
        """Start watching. Call on the loop's thread (from a coroutine, or before it runs)."""
        if self.active:
            raise RuntimeError("loopwatch: this monitor is already started")
        loop = self.loop
        if loop is None:
            loop = asyncio.get_running_loop()
            self._loop_ref = weakref.ref(loop)
        if loop.is_closed():
            raise RuntimeError("loopwatch: cannot start a monitor on a closed event loop")
        _sweep()
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
        # A loop dropped without stop(): undo the hooks when it is collected.
        self._finalizer = weakref.finalize(loop, _loop_collected, weakref.ref(self))
        self._finalizer.atexit = False
        # The first probe runs on the loop thread and starts the watchdog there, so that
        # start() works before run_forever() too.
        self._probe_due = loop.time()
        handle = loop.call_soon(self._first_probe, context=contextvars.Context())
        self._probe_handle = weakref.ref(handle)
        for hook in _start_hooks:
            hook(self)
        return self

    def stop(self) -> None:
        """Stop watching: cancels the probe, joins the watchdog, removes the hooks.

        Called from inside a step that has already held the loop for the threshold or more
        (a test that blocks and then ends its watch), that block is reported first.
        """
        if not self.active:
            return
        if threading.get_ident() == self._thread_id:
            try:
                event = self._running_block()
                if event is not None:
                    self._publish(event)
            except Exception:  # noqa: BLE001 - never break the loop we watch
                self._internal_error("stop")
        self.active = False
        _gc.untrack()
        loop = self.loop
        if loop is not None and _monitors.get(loop) is self:
            del _monitors[loop]
        handle = self._probe_handle() if self._probe_handle is not None else None
        if handle is not None:
            handle.cancel()
        self._probe_handle = None
        if self.mode == "handle":
            uninstall_handle_hook(loop)
        elif loop is not None and not loop.is_closed() and \
                loop.get_task_factory() is self._factory:
            loop.set_task_factory(self._previous_factory)
        # A factory someone installed on top of ours keeps calling it; inactive, it only
        # passes through.
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        self.step_start = 0.0
        self._close_sched()
        self._users.clear()

    def _let_go(self) -> None:
        """The loop was closed (seen by the watchdog) or collected while this monitor still
        ran: forget it, so that neither loopwatch nor its threads keep anything alive. On
        any thread; the loop thread no longer runs the loop."""
        if not self.active:
            return
        self.active = False
        _gc.untrack()
        loop = self.loop
        if loop is not None and _monitors.get(loop) is self:
            del _monitors[loop]
        if self.mode == "handle":
            uninstall_handle_hook(loop)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.stop()  # (does not join itself when called on its own thread)
        self._close_sched()
        self._users.clear()

    def _close_sched(self) -> None:
        sched, self._sched = self._sched, None
        if sched is not None:
            sched.close()

    @classmethod
    def _shared(cls, loop: asyncio.AbstractEventLoop, config: Config, user: Any) -> Monitor:
        """The loop's monitor for ``user`` (a middleware): the running one, or a new one that
        stops when the last of its users leaves (:meth:`_leave`)."""
        monitor = _monitors.get(loop)
        if monitor is None:
            monitor = cls(loop, config=config).start()
            monitor._stops_with_users = True
        if not any(u is user for u in monitor._users):
            monitor._users.append(user)
        return monitor

    def _leave(self, user: Any) -> None:
        self._users = [u for u in self._users if u is not user]
        if not self._users and self._stops_with_users:
            self.stop()

    def add_sink(self, sink: Sink | Any) -> None:
        """Subscribe ``sink``: any object with some of the methods of :class:`Sink`."""
        if sink not in self._sinks:
            self._sinks.append(sink)
            self._rebuild_sinks()

    def remove_sink(self, sink: Sink | Any) -> None:
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
        self._native_thread_id = threading.get_native_id()
        self._sched = open_reader(self._native_thread_id)
        self._mark()
        if self.config.sample_stacks:
            self._watchdog = Watchdog(
                self,
                loop_thread_id=self._thread_id,
                threshold=self.config.block_threshold,
                depth=self.config.stack_depth,
                untimed=self.mode == "task-factory",
                on_sample=self._on_sample,
                task_name=self._task_name,
                loop_closed=self._loop_closed,
                on_loop_closed=self._let_go,
            )
            self._watchdog.start()
        self._next_tick = _clock() + _TICK_SECONDS
        self._schedule_probe()

    def _on_sample(self, sample: Sample) -> None:
        # On the watchdog thread: only store it (one attribute write each).
        if sample.key[0] == "step":
            self._sample = sample
        else:
            self._untimed_sample = sample

    def _task_name(self) -> str | None:
        loop = self.loop
        return _task_name(loop) if loop is not None else None

    def _loop_closed(self) -> bool:
        loop = self.loop
        return loop is None or loop.is_closed()

    def _schedule_probe(self) -> None:
        loop = self.loop
        if loop is None:
            return
        # From now, not from the last due time: after a block we want one late probe
        # that measures it, not a burst of catch-up probes.
        interval = self._interval
        self._probe_due = loop.time() + interval
        # An empty context: the probe belongs to no request, whoever started the monitor.
        handle = loop.call_at(self._probe_due, self._probe, context=_EMPTY)
        self._probe_handle = weakref.ref(handle)
        # The same deadline on the watchdog's clock.
        self.probe_deadline = _clock() + interval

    def _mark(self) -> None:
        """Note the loop thread's scheduling counters now (on the loop thread)."""
        sched = self._sched
        if sched is None:
            return
        clock = _clock()
        try:
            # Another thread (a forked child's) would read the wrong thread's counters.
            same = threading.get_native_id() == self._native_thread_id
            reading = sched.read() if same else None
        except Exception:  # noqa: BLE001 - never break the probe: read no more
            reading = None
        if reading is None:
            self._close_sched()
            return
        self._marks.append((clock, reading))

    def _probe(self) -> None:
        loop = self.loop
        if loop is None or not self.active:
            return
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
                self._internal_error("sink.on_probe")
        if _clock() >= self._next_tick:
            self._next_tick = _clock() + _TICK_SECONDS
            self._tick()
        if self.active:
            self._schedule_probe()

    def _tick(self) -> None:
        watchdog = self._watchdog
        if watchdog is not None and not watchdog.is_alive() and not self._watchdog_reported:
            self._watchdog_reported = True
            self._internal_error("watchdog thread died")
            logger.error(
                "loopwatch watchdog thread is dead: blocks are still timed, "
                "but their stacks can no longer be sampled"
            )
        for on_tick in self._tick_sinks:
            try:
                on_tick()
            except Exception:  # noqa: BLE001
                self._internal_error("sink.on_tick")

    # -- blocks ------------------------------------------------------------------------

    def _note_finished(self, owner: AnyOwner, now: float | None = None) -> float:
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

    def _wake_due(self, t0: float, what: Any) -> float:
        """Called by the step hooks before a step that a late timer may have woken: the
        timer's due time, else 0 (see :mod:`._waiting`)."""
        try:
            return wake_due(what, self._loop_ref() if self._loop_ref is not None else None)
        except Exception:  # noqa: BLE001 - never break the step we time
            self._internal_error("step accounting")
            return 0.0

    def _on_block(self, t0: float, duration: float, owner: AnyOwner | None, callback: Any) -> None:
        """Called on the loop thread after a step that ran longer than the threshold."""
        if not self.active:  # the step that stopped the monitor reported itself then
            return
        try:
            self._publish(self._event(t0, duration, owner, callback, timed=True))
        except Exception:  # noqa: BLE001 - never break the loop we watch
            self._internal_error("on_block")

    def _untimed_block(self, lag: float) -> None:
        try:
            self._publish(self._event(_clock() - lag, lag, None, None, timed=False))
        except Exception:  # noqa: BLE001
            self._internal_error("untimed block")

    def _running_block(self) -> BlockEvent | None:
        """The block the loop is in right now, when called inside a step (or untimed code)
        that has already held the loop for the threshold or more: the event it would get
        were it to end now. On the loop thread."""
        now = _clock()
        start = self.step_start
        if start:
            if now - start < self.threshold:
                return None
            loop = self.loop
            task = asyncio.current_task(loop) if loop is not None else None
            return self._event(start, now - start, current_owner.get(), task, timed=True)
        loop = self.loop
        if self.mode != "task-factory" or loop is None or not self._probe_due:
            return None
        lag = loop.time() - self._probe_due
        if lag - (self.busy - self._busy_reported) < self.threshold:
            return None
        return self._event(now - lag, lag, None, None, timed=False)

    def _event(
        self, t0: float, duration: float, owner: AnyOwner | None, callback: Any, timed: bool,
    ) -> BlockEvent:
        """The event of a block of ``duration`` seconds from ``t0`` (perf_counter)."""
        if owner is None and self._closing[0] == t0:
            owner = self._closing[1]  # a request that finished in this very step
        t_end = t0 + duration
        if timed:
            key = ("step", t0)
            sample = self._sample
        else:
            key = ("untimed", self.probe_deadline)
            sample = self._untimed_sample
        watchdog = self._watchdog
        if (sample is None or sample.key != key) and watchdog is not None:
            # The watchdog's look at this block is overdue: it is waiting for the GIL, or has
            # yet to notice that the whole process stood still (both threads resume at once
            # after a pause). Let it look: a block that ends just after the threshold is
            # sampled, and a pause is told from a C call that sleeps holding the GIL.
            watchdog.catch_up(4 * sys.getswitchinterval() + 0.005)
            sample = self._sample if timed else self._untimed_sample
        if sample is not None and sample.key != key:
            sample = None
        preempted, off_cpu = self._scheduling(t0, t_end)
        paused = watchdog.paused_during(t0, t_end) if watchdog is not None else 0.0
        if paused:
            # The watchdog saw the process stand still; how long, the loop thread's own
            # counters tell best (neither on a CPU nor waiting for one).
            paused = min(duration, max(paused, off_cpu))
        if sample is not None:
            frames, status, task = sample.frames, sample.status, sample.task
            hint = sample.hint_at(_thread_cpu(), _clock())
        else:
            frames, hint, task = (), None, None
            if watchdog is None:
                status = DISABLED
            elif not watchdog.is_alive():
                status = DEAD  # not the GIL: nothing was there to sample
            elif watchdog.starved_during(t0, t_end):
                status, hint = GIL_HELD, GIL_HINT
            else:
                status = NOT_SAMPLED
        task = _task_of(callback) or task
        method, route = owner.labels() if owner is not None else (None, None)
        gc_seconds = _gc.collector_time(t0, t_end, self._thread_id)
        if gc_seconds and duration - gc_seconds < self.threshold:
            # The collector's block, not the code of the step it interrupted.
            method, route, frames, hint = None, _gc.GC_ROUTE, (), _gc.GC_HINT
            status = _gc.GC_STATUS
        elif paused and duration - paused < self.threshold:
            # The process stood still (SIGSTOP, a debugger, a VM's CPU taken away) in the
            # middle of a short step: the pause's block, not the step's.
            method, route, frames, hint = None, PAUSED_ROUTE, (), PAUSE_HINT
            status = PAUSED_STATUS
        return BlockEvent(
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
            preempted=preempted,
            paused=paused,
        )

    def _scheduling(self, t0: float, t_end: float) -> tuple[float, float]:
        """(runqueue wait, time neither on a CPU nor waiting for one) of the loop thread
        within the block, lower bounds; (0, 0) where it cannot tell (see _sched)."""
        sched = self._sched
        if sched is None or threading.get_ident() != self._thread_id:
            return 0.0, 0.0
        try:
            marks = tuple(self._marks)
            end = sched.read()
            if end is None or not marks:
                if end is None:
                    self._close_sched()
                return 0.0, 0.0
            self._marks.append((_clock(), end))
            return inside(marks, t0, t_end, end)
        except Exception:  # noqa: BLE001 - report the block without it
            self._close_sched()
            return 0.0, 0.0

    def _publish(self, event: BlockEvent) -> None:
        self.block_count += 1
        self.blocks.append(event)
        for on_block in self._block_sinks:
            try:
                on_block(event)
            except Exception:  # noqa: BLE001
                self._internal_error("sink.on_block")
        if self.config.log_blocks:
            _log_block(event)

    def _internal_error(self, where: str) -> None:
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


def _sweep() -> None:
    """Let go of monitors whose loops were closed without stop() (servers run without
    lifespan, and without the watchdog that would notice): each new start tidies up."""
    for loop, monitor in list(_monitors.items()):
        if loop.is_closed():
            monitor._let_go()


def _loop_collected(monitor_ref: weakref.ref[Monitor]) -> None:
    monitor = monitor_ref()
    if monitor is not None:
        monitor._let_go()


def _uses_asyncio_handles(loop: asyncio.AbstractEventLoop) -> bool:
    """True when the loop runs its callbacks through asyncio.events.Handle._run."""
    return isinstance(loop, asyncio.BaseEventLoop) and handle_hook_works()


def _task_of(callback: Any) -> str | None:
    """The name of the task a step belongs to: a Task itself, or a Handle's step callback."""
    task = callback if isinstance(callback, asyncio.Task) else getattr(callback, "__self__", None)
    if isinstance(task, asyncio.Task):
        return task.get_name()
    return None


def _task_name(loop: asyncio.AbstractEventLoop) -> str | None:
    task = asyncio.current_task(loop)
    return task.get_name() if task is not None else None


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
