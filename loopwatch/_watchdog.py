"""The watchdog thread: samples the loop thread's stack while the loop is still blocked.

After the fact, a task's frame points at its next ``await``; only a stack read while the
blocking call is still running names the line that blocked. The watchdog polls the monitor's
``step_start`` (written by the loop thread around every timed step); when one step has run
longer than the threshold it reads ``sys._current_frames()[loop_thread]``.

A C call that never releases the GIL starves this thread: it can only run once the call has
returned, when the stack no longer shows the culprit. The watchdog notices that it woke late
and records that no stack could be taken instead of reporting a wrong line.
"""

from __future__ import annotations

import asyncio
import linecache
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._events import Frame
from ._hints import GIL_HINT, hint_for

if TYPE_CHECKING:
    from ._monitor import Monitor

__all__ = ["DEAD", "Sample", "Watchdog"]

logger = logging.getLogger("loopwatch")

_clock = time.perf_counter

GIL_HELD = (
    "unavailable: the watchdog thread could not run while the loop was blocked (the loop "
    "thread held the GIL, as a C call that does not release it does, or the machine was "
    "too overloaded to schedule it)"
)
NOT_SAMPLED = "unavailable: the watchdog did not get to sample this block"
DISABLED = "unavailable: stack sampling is disabled (sample_stacks=False)"
DEAD = "unavailable: the watchdog thread is not running (it died; loopwatch logged why)"


@dataclass(frozen=True, slots=True)
class Sample:
    step_start: float  #: identifies the step: the monitor's step_start when sampled
    frames: tuple[Frame, ...]
    hint: str | None  #: set when the hint is already known (no stack); else see hint_at()
    status: str
    task: str | None
    lines: tuple[str, ...] = ()  #: source of the innermost frames
    moved: bool = False  #: the bytecode position changed between two looks
    cpu0: float | None = None  #: the loop thread's CPU clock when sampled
    wall0: float = 0.0  #: perf_counter() when sampled

    def hint_at(self, cpu_now: float | None, wall_now: float) -> str | None:
        """The hint, judged when the block has ended (on the loop thread).

        Whether the block was CPU-bound is judged over the whole stretch from the sample
        to the end of the block: a thread waiting in the kernel (sleep, a socket) uses no
        CPU, one computing uses nearly all it gets even on an overloaded machine.
        """
        if self.status != "sampled":
            return self.hint
        cpu_bound = self.moved
        if not cpu_bound and self.cpu0 is not None and cpu_now is not None:
            cpu_bound = (cpu_now - self.cpu0) >= 0.25 * (wall_now - self.wall0)
        return hint_for(self.frames, self.lines, cpu_bound)


class Watchdog:
    """A daemon thread that samples the loop thread's stack during long steps."""

    def __init__(self, monitor: Monitor, loop_thread_id: int) -> None:
        self._monitor = monitor
        self._loop_thread_id = loop_thread_id
        cfg = monitor.config
        self._threshold = cfg.block_threshold
        self._depth = cfg.stack_depth
        # Any poll period below the threshold sees every block-to-be before it crosses the
        # threshold (and then wakes exactly at the crossing), at ~13 wake-ups a second.
        self._poll = max(cfg.block_threshold * 0.75, 0.001)
        # How late a wake-up may be before we conclude the GIL was held: Python threads
        # hand the GIL over within the switch interval, so lateness far beyond it means a
        # C call kept it.
        self._slack = max(0.025, cfg.block_threshold / 4, 4 * sys.getswitchinterval())
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="loopwatch-watchdog", daemon=True
        )
        self.samples_taken = 0
        self.next_wake = _clock()
        self._cpu_clock: int | None = None
        if hasattr(time, "pthread_getcpuclockid"):
            try:
                self._cpu_clock = time.pthread_getcpuclockid(loop_thread_id)
            except OSError:
                self._cpu_clock = None

    def start(self) -> None:
        self._thread.start()

    def _thread_cpu(self) -> float | None:
        """CPU seconds used so far by the loop thread, where the platform can tell."""
        if self._cpu_clock is None:
            return None
        try:
            return time.clock_gettime(self._cpu_clock)
        except OSError:
            self._cpu_clock = None
            return None

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def starved_during(self, start: float, end: float) -> bool:
        """Whether this thread should have sampled a step running from start to end but
        could not run: the loop thread held the GIL.

        Had it run after its planned wake-up it would have sampled the step or planned a
        later wake-up; the GIL is handed over within the switch interval.
        """
        should_sample_by = max(self.next_wake, start + self._threshold)
        return end > should_sample_by + 2 * sys.getswitchinterval()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            logger.exception("loopwatch watchdog thread crashed; stacks will not be sampled")
            raise

    def _loop(self) -> None:
        monitor = self._monitor
        threshold = self._threshold
        untimed = monitor.mode == "task-factory"
        sampled = 0.0  # identifies the last stretch we sampled
        wake_at = _clock() + self._poll
        while True:
            self.next_wake = wake_at
            if self._stop.wait(max(wake_at - _clock(), 0.0)):
                break
            loop = monitor.loop
            if loop is not None and loop.is_closed():
                # Closed without stop() (a server without lifespan never stops it): let go.
                monitor.loop_closed()
                break
            now = _clock()
            start = monitor.step_start
            if not start and untimed:
                # On uvloop, steps of tasks created before the monitor started and plain
                # callbacks are not timed. If the probe is overdue and no timed step runs,
                # such code holds the loop: sample it too, keyed by the probe's deadline.
                deadline = monitor.probe_deadline
                if deadline and now - deadline >= threshold and -deadline != sampled:
                    sampled = -deadline
                    late = now - max(deadline + threshold, wake_at)
                    monitor.untimed_sample = self._sample(-deadline, late)
                wake_at = now + self._poll
            elif start and start != sampled:
                due = start + threshold
                if now >= due:
                    sampled = start
                    late = now - max(due, wake_at)
                    monitor.sample = self._sample(start, late)
                    wake_at = _clock() + self._poll
                else:
                    # A step is running: wake exactly when it would become a block.
                    wake_at = min(now + self._poll, due)
            else:
                wake_at = now + self._poll

    def _sample(self, start: float, late: float) -> Sample:
        loop = self._monitor.loop
        task = _task_name(loop) if loop is not None else None
        if late > self._slack:
            return Sample(start, (), GIL_HINT, GIL_HELD, task)
        frame = sys._current_frames().get(self._loop_thread_id)
        if frame is None:
            return Sample(start, (), None, NOT_SAMPLED, task)
        first = (frame.f_code, frame.f_lasti)
        frames = _extract(frame, self._depth)
        del frame
        self.samples_taken += 1
        # A second look a moment later tells CPU-bound Python (the bytecode position moves)
        # from a call that waits; the loop thread's CPU clock settles it at the block's end.
        cpu0, wall0 = self._thread_cpu(), _clock()
        time.sleep(0.005)
        moved = False
        if self._monitor.step_start == start or start < 0:
            again = sys._current_frames().get(self._loop_thread_id)
            if again is not None:
                moved = (again.f_code, again.f_lasti) != first
                del again
        lines = tuple(linecache.getline(f.file, f.line).strip() for f in frames[:3])
        return Sample(start, frames, None, "sampled", task, lines, moved, cpu0, wall0)


def _extract(frame: Any, depth: int) -> tuple[Frame, ...]:
    """Innermost-first frames; file, line, function and module only — never locals."""
    out: list[Frame] = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        name = getattr(code, "co_qualname", code.co_name)
        module = frame.f_globals.get("__name__", "")
        out.append(Frame(code.co_filename, frame.f_lineno or 0, name, module or ""))
        frame = frame.f_back
    return tuple(out)


def _task_name(loop: asyncio.AbstractEventLoop) -> str | None:
    try:
        task = asyncio.current_task(loop)
    except Exception:  # noqa: BLE001 - a foreign loop may not support it
        return None
    return task.get_name() if task is not None else None
