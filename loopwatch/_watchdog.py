"""The watchdog thread: samples the loop thread's stack while the loop is still blocked.

After the fact, a task's frame points at its next ``await``; only a stack read while the
blocking call is still running names the line that blocked. The watchdog polls a narrow view
of the monitor (:class:`View`: the start of the step running now, the probe's deadline); when
one step has run longer than the threshold it reads the loop thread's stack (safely:
:mod:`._stacks`) and hands the :class:`Sample` to a callback.

A C call that never releases the GIL starves this thread: it can only run once the call has
returned, when the stack no longer shows the culprit. The watchdog notices that it woke late
and records that no stack could be taken instead of reporting a wrong line. It also notices
when it woke late because the whole process stood still (SIGSTOP, a debugger, a VM whose CPU
was taken away): then, unlike a thread waiting for the GIL, it did not get a CPU at all
(Linux: its own scheduling counters, :mod:`._sched`). Such pauses are kept for the monitor,
which reports a block they caused as what it is.
"""

from __future__ import annotations

import collections
import dataclasses
import linecache
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ._events import Frame
from ._hints import GIL_HINT, hint_for
from ._sched import Reading, open_reader
from ._stacks import StackReader, module_of, qualname

__all__ = ["DEAD", "DISABLED", "GIL_HELD", "NOT_SAMPLED", "Sample", "View", "Watchdog"]

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
NO_THREAD = (
    "unavailable: the loop thread's stack was not in the dump (it exited, or the process "
    "has more than the 100 threads that faulthandler dumps)"
)

_PAUSES = 32  # pauses of the whole process kept (start, end)


class View(Protocol):
    """What the watchdog reads of the monitor (from its own thread)."""

    #: perf_counter() at which the timed step running now started; 0.0 between steps.
    step_start: float
    #: perf_counter() by which the lag probe should have run (0.0 before the first probe).
    probe_deadline: float


#: Identifies the stretch a sample belongs to: ("step", step_start) for a timed step,
#: ("untimed", probe_deadline) for code that ran outside timed steps (uvloop).
Key = tuple[str, float]


@dataclass(frozen=True, slots=True)
class Sample:
    key: Key
    frames: tuple[Frame, ...]
    hint: str | None  #: set when the hint is already known (no stack); else see hint_at()
    status: str
    task: str | None
    lines: tuple[str, ...] = ()  #: source of the innermost frames
    moved: bool = False  #: the innermost line changed between two looks
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
    """A daemon thread that samples the loop thread's stack during long steps.

    ``view`` is read, never written; each sample goes to ``on_sample`` (called on this
    thread: it must only store it); ``task_name()`` names the running task (or None);
    ``loop_closed()`` tells when to let go of a loop that was closed without stopping the
    monitor, and ``on_loop_closed`` is then called, once, on this thread.
    """

    def __init__(
        self,
        view: View,
        *,
        loop_thread_id: int,
        threshold: float,
        depth: int,
        untimed: bool,
        on_sample: Callable[[Sample], None],
        task_name: Callable[[], str | None],
        loop_closed: Callable[[], bool],
        on_loop_closed: Callable[[], None],
    ) -> None:
        self._view = view
        self._loop_thread_id = loop_thread_id
        self._threshold = threshold
        self._depth = depth
        self._untimed = untimed
        self._on_sample = on_sample
        self._task_name = task_name
        self._loop_closed = loop_closed
        self._on_loop_closed = on_loop_closed
        # Any poll period below the threshold sees every block-to-be before it crosses the
        # threshold (and then wakes exactly at the crossing), at ~13 wake-ups a second.
        self._poll = max(threshold * 0.75, 0.001)
        # How late a wake-up may be before we conclude the GIL was held: Python threads
        # hand the GIL over within the switch interval, so lateness far beyond it means a
        # C call kept it.
        self._slack = max(0.025, threshold / 4, 4 * sys.getswitchinterval())
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="loopwatch-watchdog", daemon=True
        )
        self._lock = threading.Lock()
        #: Notified after each look (see catch_up).
        self._looked = threading.Condition(self._lock)
        #: Late wake-ups, (planned, woke), on perf_counter's clock: the process stood still
        #: (pauses), or this thread could not get the GIL (starved).
        self._pauses: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=_PAUSES)
        self._starved: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=_PAUSES)
        self.samples_taken = 0
        #: When this thread plans to look next; its first look is planned now, so that a
        #: block that keeps it from even starting is seen as starving it.
        self.next_wake = _clock() + self._poll
        self._cpu_clock: int | None = None
        if hasattr(time, "pthread_getcpuclockid"):
            try:
                self._cpu_clock = time.pthread_getcpuclockid(loop_thread_id)
            except OSError:
                self._cpu_clock = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def starved_during(self, start: float, end: float) -> bool:
        """Whether this thread should have sampled a step running from start to end but
        could not run: the loop thread held the GIL.

        Had it run at its planned wake-up it would have sampled the step (or planned a later
        wake-up); the GIL is handed over within the switch interval. Either it woke late
        during the step, or it has not woken yet although it should have.
        """
        due = start + self._threshold
        with self._lock:
            late = tuple(self._starved)
        if any(planned <= due + self._slack and woke > due for planned, woke in late):
            return True
        should_sample_by = max(self.next_wake, due)
        return end > should_sample_by + 2 * sys.getswitchinterval()

    def catch_up(self, timeout: float) -> None:
        """If this thread's planned look is overdue (it has not run since: the GIL, or a pause
        it has yet to notice), wait up to ``timeout`` for it to take that look. Releases the
        GIL while it waits; for the loop thread at the end of a block."""
        with self._looked:
            if self.next_wake < _clock() and self._thread.is_alive():
                self._looked.wait(timeout)

    def paused_during(self, start: float, end: float) -> float:
        """Seconds of ``[start, end]`` (perf_counter) in which this thread saw the whole
        process stand still; 0.0 when it saw no pause (or cannot tell: not Linux)."""
        with self._lock:
            pauses = tuple(self._pauses)
        total = 0.0
        for began, ended in pauses:
            total += max(0.0, min(ended, end) - max(began, start))
        return total

    def _thread_cpu(self) -> float | None:
        """CPU seconds used so far by the loop thread, where the platform can tell."""
        if self._cpu_clock is None:
            return None
        try:
            return time.clock_gettime(self._cpu_clock)
        except OSError:
            self._cpu_clock = None
            return None

    def _run(self) -> None:
        reader = None
        try:
            reader = StackReader(self._loop_thread_id)
            self._loop(reader)
        except BaseException:
            logger.exception("loopwatch watchdog thread crashed; stacks will not be sampled")
            raise
        finally:
            if reader is not None:
                reader.close()

    def _loop(self, reader: StackReader) -> None:
        # (No local reference to the view: the monitor's reference count does not depend on
        # how far this thread has got.)
        threshold = self._threshold
        own = open_reader(threading.get_native_id())
        before = own.read() if own is not None else None
        sampled: Key | None = None  # the last stretch we sampled
        wake_at = self.next_wake
        while True:
            # Only a wait that really slept (the wake-up still ahead when it began) tells a
            # pause from waiting for the GIL: a late start with nothing left to wait for
            # (this thread held up on its way here) shows neither.
            slept = wake_at - _clock() > 0.001
            if self._stop.wait(max(wake_at - _clock(), 0.0)):
                break
            now = _clock()
            paused = False
            if own is not None:
                after = own.read()
                if slept and before is not None and after is not None:
                    paused = self._note_pause(wake_at, now, before, after)
                before = after
            if not paused and now - wake_at > self._slack:
                with self._lock:
                    self._starved.append((wake_at, now))
            if self._loop_closed():
                # Closed without stop() (a server without lifespan never stops it): let go.
                self._on_loop_closed()
                break
            start = self._view.step_start
            if not start and self._untimed:
                # On uvloop, steps of tasks created before the monitor started and plain
                # callbacks are not timed. If the probe is overdue and no timed step runs,
                # such code holds the loop: sample it too, keyed by the probe's deadline.
                deadline = self._view.probe_deadline
                key: Key = ("untimed", deadline)
                due = deadline + threshold
                if deadline and now >= due and key != sampled:
                    sampled = key
                    late = now - max(due, wake_at)
                    self._look(key, 0.0 if paused else late, reader)
                    wake_at = _clock() + self._poll
                elif deadline and now < due and key != sampled:
                    # The probe may be held up by untimed code: look when that would be a
                    # block.
                    wake_at = min(now + self._poll, due)
                else:
                    wake_at = now + self._poll
            elif start and ("step", start) != sampled:
                due = start + threshold
                if now >= due:
                    sampled = ("step", start)
                    late = now - max(due, wake_at)
                    # Late because the process stood still, not for the GIL: sample now.
                    self._look(sampled, 0.0 if paused else late, reader)
                    wake_at = _clock() + self._poll
                else:
                    # A step is running: wake exactly when it would become a block.
                    wake_at = min(now + self._poll, due)
            else:
                wake_at = now + self._poll
            if own is not None:
                before = own.read()  # after our own work: the next wait starts here
            with self._looked:
                self.next_wake = wake_at
                self._looked.notify_all()

    def _note_pause(self, planned: float, now: float, before: Reading, after: Reading) -> bool:
        """A late wake-up with (almost) no CPU in between: the process stood still.

        A thread waiting for the GIL wakes every switch interval to ask for it again, and
        one that waits for a CPU accumulates runqueue wait; a stopped process does neither.
        """
        late = now - planned
        if late <= self._slack:
            return False
        runs = after[2] - before[2]
        waited = after[1] - before[1]
        # runs == 0: this thread never left the CPU in between (it had no wait to make,
        # having been kept from starting by the GIL): nothing to tell.
        if 1 <= runs <= max(3.0, late / (4 * sys.getswitchinterval())) and waited < late / 2:
            with self._lock:
                self._pauses.append((planned, now))
            return True
        return False

    def _look(self, key: Key, late: float, reader: StackReader) -> None:
        """Sample the stretch ``key`` and hand the sample over at once (the block may end any
        moment); then look again to tell CPU-bound code from a call that waits."""
        sample = self._sample(key, late, reader)
        self._on_sample(sample)
        with self._looked:
            self._looked.notify_all()  # a loop thread waiting in catch_up() has it now
        if sample.status != "sampled" or not sample.frames:
            return
        # A second look a moment later: the innermost line moved, CPU-bound Python; the loop
        # thread's CPU clock settles it for the rest at the block's end (Sample.hint_at).
        time.sleep(0.005)
        again = reader.snapshot(1)
        if self._still_in(key) and again:
            first = sample.frames[0]
            if (again[0][0], again[0][1]) != (first.file, first.line):
                self._on_sample(dataclasses.replace(sample, moved=True))

    def _still_in(self, key: Key) -> bool:
        """Whether the loop thread is still in the stretch ``key``."""
        view = self._view
        if key[0] == "step":
            return view.step_start == key[1]
        return not view.step_start and view.probe_deadline == key[1]

    def _sample(self, key: Key, late: float, reader: StackReader) -> Sample:
        task = self._safe_task_name()
        if late > self._slack:
            return Sample(key, (), GIL_HINT, GIL_HELD, task)
        cpu0, wall0 = self._thread_cpu(), _clock()
        raw = reader.snapshot(self._depth)
        if not self._still_in(key):
            # The stretch ended before the dump (the loop thread ran on between our look at
            # step_start and the dump): the stack shows whatever came next. Steps are
            # contiguous and a step_start never repeats, so a stretch still running now was
            # running throughout the dump.
            return Sample(key, (), None, NOT_SAMPLED, task)
        if raw is None:
            return Sample(key, (), None, NO_THREAD, task)
        self.samples_taken += 1
        frames = []
        for file, line, name in raw:
            module = module_of(file)
            frames.append(Frame(file, line, qualname(module, line, name), module))
        lines = tuple(linecache.getline(f.file, f.line).strip() for f in frames[:3])
        return Sample(key, tuple(frames), None, "sampled", task, lines, False, cpu0, wall0)

    def _safe_task_name(self) -> str | None:
        try:
            return self._task_name()
        except Exception:  # noqa: BLE001 - a foreign loop may not support it
            return None
