"""Preemption is no block: steps that took long only because the OS kept the loop thread off
the CPU (Linux runqueue wait, /proc/self/task/<tid>/schedstat) are counted, not reported;
real blocks (time.sleep, CPU-bound code) under the same contention still are, in full.

The contention tests pin this thread (and so the loop and watchdog threads it starts) to one
CPU shared with CPU-burning processes of the same priority, for about 1.5 s each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import loopwatch
import loopwatch._monitor as monitor_module
from loopwatch._sched import SchedReader, held_at_most, open_reader
from tests.needs import IN_CI

HAS_SCHEDSTAT = open_reader(threading.get_native_id()) is not None
# Skipped elsewhere; under CI (Linux) these run, and fail if schedstat is missing.
needs_schedstat = pytest.mark.skipif(
    not IN_CI and (not HAS_SCHEDSTAT or not hasattr(os, "sched_setaffinity")),
    reason="needs Linux /proc/<pid>/task/<tid>/schedstat and sched_setaffinity",
)

THRESHOLD = 0.02
COMPETITORS = 6  # on one CPU: the loop thread waits ~6 time slices, well over 20 ms
SECONDS = 1.5


@contextlib.contextmanager
def one_contended_cpu(seconds: float, competitors: int = COMPETITORS) -> Iterator[None]:
    """Pin this thread to one CPU and run ``competitors`` busy processes on it (same
    priority); threads started inside inherit the pinning. Everything is undone after."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    # A deadline of their own: they end even if this process dies.
    burn = (
        f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\n"
        f"end = time.monotonic() + {seconds + 5}\nwhile time.monotonic() < end: pass\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(competitors)]
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.2)  # let them start burning
        yield
    finally:
        os.sched_setaffinity(0, before)
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def sleeper(seconds: float) -> None:
    time.sleep(seconds)


def burn_cpu(cpu_seconds: float) -> None:
    """Compute for ``cpu_seconds`` of this thread's CPU time (longer in wall time when the
    CPU is shared)."""
    end = time.thread_time() + cpu_seconds
    x = 0
    while time.thread_time() < end:
        x += 1


# -- under real contention ---------------------------------------------------------------


@needs_schedstat
def test_preempted_short_steps_are_no_blocks(run: Any) -> None:
    """Short non-blocking steps on a CPU shared with busy processes: many of them take more
    than the threshold in wall time (the loop thread waits for the CPU), none is a block."""
    long_steps: list[float] = []

    async def worker(until: float) -> None:
        while time.perf_counter() < until:
            t = time.perf_counter()
            busy(0.0005)
            elapsed = time.perf_counter() - t
            if elapsed >= THRESHOLD:  # a part of a step: that step was longer still
                long_steps.append(elapsed)
            await asyncio.sleep(0)

    async def main() -> loopwatch.Monitor:
        monitor = loopwatch.Monitor(
            block_threshold=THRESHOLD, probe_interval=0.002, log_blocks=False
        ).start()
        await asyncio.sleep(0.05)
        until = time.perf_counter() + SECONDS
        try:
            await asyncio.gather(*(asyncio.create_task(worker(until)) for _ in range(2)))
        finally:
            monitor.stop()
        return monitor

    with one_contended_cpu(SECONDS):
        monitor = run(main())

    # The contention was real: steps the worker itself timed took longer than the
    # threshold, and the probe saw the lag. (Without schedstat each would be a block.)
    assert len(long_steps) >= 3, long_steps
    assert monitor.lag_max >= THRESHOLD, monitor.lag_max
    assert monitor.block_count == 0, [(e.duration, e.stack_status) for e in monitor.blocks]
    assert monitor.preempted_count >= len(long_steps), (monitor.preempted_count, long_steps)
    assert monitor.internal_errors == 0


@needs_schedstat
def test_real_blocks_under_contention_are_reported_in_full(run: Any, loop_kind: str) -> None:
    elapsed: dict[str, float] = {}

    async def block(kind: str) -> None:
        t = time.perf_counter()
        if kind == "sleep":
            sleeper(0.1)
        else:
            burn_cpu(0.04)  # 40 ms of CPU: several times that in wall time here
        elapsed[kind] = time.perf_counter() - t

    async def main() -> tuple[loopwatch.Monitor, list[loopwatch.BlockEvent]]:
        monitor = loopwatch.Monitor(
            block_threshold=THRESHOLD, probe_interval=0.002, log_blocks=False
        ).start()
        await asyncio.sleep(0.05)
        by_kind = {}
        try:
            for kind in ("sleep", "cpu"):
                before = monitor.block_count
                await asyncio.create_task(block(kind))
                await asyncio.sleep(0.05)
                new = list(monitor.blocks)[before - monitor.block_count:] if (
                    monitor.block_count > before) else []
                by_kind[kind] = new
            untimed = []
            if loop_kind == "uvloop":
                # A plain callback: not timed on uvloop, found from the probe's lateness.
                before = monitor.block_count
                loop = asyncio.get_running_loop()
                done = loop.create_future()
                loop.call_soon(lambda: (sleeper(0.1), done.set_result(None)))
                await done
                await asyncio.sleep(0.1)
                untimed = list(monitor.blocks)[before - monitor.block_count:] if (
                    monitor.block_count > before) else []
        finally:
            monitor.stop()
        for kind in ("sleep", "cpu"):
            events = by_kind[kind]
            # Exactly one event, holding the whole step (the wall time the OS took from the
            # loop included: it is the loop's delay all the same).
            assert len(events) == 1, (kind, [(e.duration, e.timed) for e in events])
            duration = events[0].duration
            assert duration >= elapsed[kind] - 0.001, (kind, duration, elapsed[kind])
            assert duration <= elapsed[kind] + 0.1, (kind, duration, elapsed[kind])
        assert elapsed["sleep"] >= 0.1
        if loop_kind == "uvloop":
            assert [e for e in untimed if not e.timed and e.duration >= 0.08], [
                (e.duration, e.timed) for e in untimed]
        return monitor, by_kind["cpu"]

    with one_contended_cpu(SECONDS):
        monitor, _ = run(main())
    assert monitor.internal_errors == 0


# -- without schedstat, or when it fails ---------------------------------------------------


class _BrokenReader(SchedReader):
    """Reads fine at first (so the monitor keeps it), then fails."""

    def __init__(self, fail_after: int) -> None:
        self.left = fail_after
        self.reads = 0

    def wait(self) -> float | None:
        self.reads += 1
        self.left -= 1
        if self.left < 0:
            raise OSError("gone")
        return 0.0

    def close(self) -> None:
        pass


def _fake_readers(monkeypatch: pytest.MonkeyPatch) -> list[_BrokenReader]:
    """Make monitors open a _BrokenReader that never fails (until told); the list gets each."""
    readers: list[_BrokenReader] = []

    def fake_open(native_tid: int) -> Any:
        readers.append(_BrokenReader(fail_after=10**9))
        return readers[-1]

    monkeypatch.setattr(monitor_module, "open_reader", fake_open)
    return readers


@pytest.mark.parametrize("reader", ["none", "broken"])
def test_without_schedstat_blocks_are_reported_as_before(
    run: Any, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    readers = [] if reader == "none" else _fake_readers(monkeypatch)
    if reader == "none":
        monkeypatch.setattr(monitor_module, "open_reader", lambda native_tid: None)

    async def main() -> loopwatch.Monitor:
        monitor = loopwatch.Monitor(block_threshold=0.02, log_blocks=False).start()
        await asyncio.sleep(0.05)
        try:
            if readers:
                readers[0].left = 0  # the next read fails: at the block's end, or a probe's
            await asyncio.create_task(_sleepy(0.05))
            await asyncio.sleep(0.02)
        finally:
            monitor.stop()
        return monitor

    monitor = run(main())
    assert monitor.block_count == 1, list(monitor.blocks)
    assert monitor.blocks[0].duration >= 0.05
    assert monitor.preempted_count == 0
    assert monitor.internal_errors == 0
    if reader == "broken":
        assert len(readers) == 1 and readers[0].left == -1  # it failed once, and was let go


async def _sleepy(seconds: float) -> None:
    sleeper(seconds)


@needs_schedstat
def test_reader_reads_this_threads_runqueue_wait() -> None:
    reader = open_reader(threading.get_native_id())
    assert reader is not None
    first = reader.wait()
    busy(0.01)
    second = reader.wait()
    assert first is not None and second is not None
    assert 0.0 <= first <= second
    reader.close()
    assert reader.wait() is None
    reader.close()  # twice is fine


def test_reader_of_a_missing_thread_is_none() -> None:
    assert open_reader(2**31 - 2) is None


def test_reader_is_read_on_the_probe_not_per_step(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of short steps cost no read; the probe reads once per firing."""
    readers = _fake_readers(monkeypatch)

    async def main() -> loopwatch.Monitor:
        monitor = loopwatch.Monitor(block_threshold=0.05, log_blocks=False).start()
        await asyncio.sleep(0.01)
        try:
            for _ in range(2000):
                await asyncio.sleep(0)
        finally:
            monitor.stop()
        return monitor

    monitor = run(main())
    assert len(readers) == 1
    # open_reader's own check is not counted here; one read per probe plus the first.
    assert readers[0].reads <= monitor.lag_count + 1, (readers[0].reads, monitor.lag_count)


# -- the bound ---------------------------------------------------------------------------


def test_bound_subtracts_only_proven_wait() -> None:
    # A mark 5 ms before a 50 ms step; 44 ms of wait since the mark: at least 39 ms of it
    # inside the step, so the code held the loop for at most 11 ms.
    marks = [(0.995, 1.0)]
    assert held_at_most(marks, 1.0, 1.05, 1.044) == pytest.approx(0.011)
    # The same wait, but the mark 40 ms before: it may all have been before the step.
    assert held_at_most([(0.96, 1.0)], 1.0, 1.05, 1.044) == pytest.approx(0.046)
    # No wait at all: the whole stretch (a sleep, or computing).
    assert held_at_most(marks, 1.0, 1.05, 1.0) == pytest.approx(0.05)
    # A mark inside the stretch proves its wait whole; the best mark wins.
    assert held_at_most([(0.9, 0.99), (1.01, 1.0)], 1.0, 1.05, 1.03) == pytest.approx(0.02)
    # Never more than the stretch, whatever the marks.
    assert held_at_most([(0.5, 1.0)], 1.0, 1.05, 1.01) == pytest.approx(0.05)
    assert held_at_most([], 1.0, 1.05, 2.0) == pytest.approx(0.05)


@needs_schedstat
def test_a_reader_is_only_read_by_its_own_thread(run: Any) -> None:
    """Were the loop run by another thread (a forked child's), the reader would read the
    wrong thread's counter: it is dropped, and blocks are reported as without it."""

    async def main() -> loopwatch.Monitor:
        monitor = loopwatch.Monitor(block_threshold=0.02, log_blocks=False).start()
        await asyncio.sleep(0.05)
        try:
            assert monitor._sched is not None  # read on Linux
            monitor.native_thread_id = -1  # as if another thread now ran the loop
            await asyncio.create_task(_sleepy(0.05))
            await asyncio.sleep(0.02)
        finally:
            monitor.stop()
        assert monitor._sched is None
        return monitor

    monitor = run(main())
    assert monitor.block_count == 1 and monitor.preempted_count == 0
