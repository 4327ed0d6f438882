"""A block is the loop's delay, whatever the OS did meanwhile: on a loaded host, steps that
hold the loop past the threshold are reported in full, with their route and line, and say how
much of them the loop thread waited for a CPU (``preempted``); a pause of the whole process
(SIGSTOP here; VM steal alike) in the middle of a short step is reported as what it is: route
``<paused>``, not the step's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import loopwatch
import loopwatch._monitor as monitor_module
from loopwatch._sched import SchedReader, inside, open_reader
from tests.needs import IN_CI

ROOT = Path(__file__).resolve().parent.parent
HAS_SCHEDSTAT = open_reader(threading.get_native_id()) is not None
# Skipped elsewhere; under CI (Linux) these run, and fail if schedstat is missing.
needs_schedstat = pytest.mark.skipif(
    not IN_CI and (not HAS_SCHEDSTAT or not hasattr(os, "sched_setaffinity")),
    reason="needs Linux /proc/<pid>/task/<tid>/schedstat and sched_setaffinity",
)


def _burners(count: int, seconds: float, cpu: int | None = None) -> list[subprocess.Popen[bytes]]:
    pin = f"os.sched_setaffinity(0, {{{cpu}}})\n" if cpu is not None else ""
    # A deadline of their own: they end even if this process dies.
    burn = (f"import os, time\n{pin}end = time.monotonic() + {seconds + 5}\n"
            "while time.monotonic() < end: pass\n")
    return [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(count)]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


@contextlib.contextmanager
def saturated_host(seconds: float, per_core: int = 2) -> Iterator[None]:
    """Busy processes (same priority), ``per_core`` for each core: every core is saturated
    and the loop thread gets a fraction of one."""
    procs = _burners(per_core * (os.cpu_count() or 1), seconds)
    try:
        time.sleep(0.3)  # let them start burning
        yield
    finally:
        _stop(procs)


@contextlib.contextmanager
def one_contended_cpu(seconds: float, competitors: int = 6) -> Iterator[None]:
    """Pin this thread (and the threads it starts) to one CPU shared with ``competitors``
    busy processes; undone after."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    procs = _burners(competitors, seconds, cpu)
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.2)
        yield
    finally:
        os.sched_setaffinity(0, before)
        _stop(procs)


def busy_until(seconds: float) -> None:
    """A CPU-bound loop that runs for ``seconds`` of wall time, however little CPU it gets."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def burn_cpu(cpu_seconds: float) -> None:
    """Compute for ``cpu_seconds`` of this thread's CPU time (longer in wall time when the
    CPU is shared)."""
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


def sleeper(seconds: float) -> None:
    time.sleep(seconds)


# -- blocks on a saturated host ----------------------------------------------------------------

KINDS = {"busy": lambda: busy_until(0.15), "cpu": lambda: burn_cpu(0.12),
         "sleep": lambda: sleeper(0.15)}


@needs_schedstat
def test_every_block_on_a_saturated_host_is_reported_with_its_route(
    run: Any, loop_kind: str
) -> None:
    """Both cores saturated by busy processes of our own; 150 ms wall-time CPU loops (which
    get maybe half of that on a CPU), 120 ms of CPU work and 150 ms sleeps run on the loop,
    four of each. Every one is a block event of its own route, none is lost."""
    rounds = 4

    async def block(kind: str) -> float:
        with loopwatch.owner_scope(loopwatch.Owner("GET", f"/{kind}")):
            t = time.perf_counter()
            KINDS[kind]()
            return time.perf_counter() - t

    async def main() -> tuple[loopwatch.Monitor, dict[str, list[float]]]:
        monitor = loopwatch.Monitor(block_threshold=0.1, log_blocks=False).start()
        await asyncio.sleep(0.05)
        took: dict[str, list[float]] = {kind: [] for kind in KINDS}
        try:
            for _ in range(rounds):
                for kind in KINDS:
                    took[kind].append(await asyncio.create_task(block(kind)))
                    await asyncio.sleep(0.02)
        finally:
            monitor.stop()
        return monitor, took

    with saturated_host(seconds=rounds * 1.5 + 3):
        monitor, took = run(main())

    by_route: dict[str, list[loopwatch.BlockEvent]] = {}
    for event in monitor.blocks:
        by_route.setdefault(event.route or "", []).append(event)
    for kind in KINDS:
        events = by_route.get(f"/{kind}", [])
        # One event per block, none lost, each the step's full wall time.
        assert len(events) == rounds, (kind, took[kind], [(e.duration, e.preempted) for e in events])
        for event, wall in zip(events, took[kind], strict=True):
            assert wall - 0.001 <= event.duration <= wall + 0.05, (kind, event.duration, wall)
            assert event.method == "GET" and event.paused == 0.0
            # The stack is best effort on an overloaded host; when there is none, it says why.
            assert event.stack_status == "sampled" or event.stack_status.startswith("unavailable")
    busy_and_cpu = by_route["/busy"] + by_route["/cpu"]
    # The load was real: the CPU-bound blocks waited for a CPU, and say so.
    assert any(e.preempted >= 0.01 for e in busy_and_cpu), [e.preempted for e in busy_and_cpu]
    assert all(e.preempted <= e.duration for e in monitor.blocks)
    sampled = [e for e in busy_and_cpu if e.stack_status == "sampled"]
    for event in sampled:
        assert event.blocking_frame is not None
        assert event.blocking_frame.function in ("busy_until", "burn_cpu"), event.frames[:3]
    assert set(by_route) <= {f"/{k}" for k in KINDS}, set(by_route)
    assert monitor.internal_errors == 0


@needs_schedstat
def test_short_steps_stretched_by_preemption_say_so(run: Any) -> None:
    """Half-millisecond steps on one CPU shared with six busy processes: some take longer than
    the threshold in wall time. Those are reported (the loop was held), and each says that
    the loop thread waited for a CPU for nearly all of it."""
    threshold = 0.02
    long_steps: list[float] = []

    async def worker(until: float) -> None:
        with loopwatch.owner_scope(loopwatch.Owner("GET", "/short")):
            while time.perf_counter() < until:
                t = time.perf_counter()
                busy_until(0.0005)
                if time.perf_counter() - t >= threshold:
                    long_steps.append(time.perf_counter() - t)
                await asyncio.sleep(0)

    async def main() -> loopwatch.Monitor:
        monitor = loopwatch.Monitor(
            block_threshold=threshold, probe_interval=0.002, log_blocks=False
        ).start()
        await asyncio.sleep(0.05)
        until = time.perf_counter() + 1.5
        try:
            await asyncio.gather(*(asyncio.create_task(worker(until)) for _ in range(2)))
        finally:
            monitor.stop()
        return monitor

    with one_contended_cpu(1.5):
        monitor = run(main())

    assert len(long_steps) >= 3, long_steps  # the contention was real
    assert monitor.block_count >= len(long_steps), (monitor.block_count, long_steps)
    stretched = [e for e in monitor.blocks if e.route == "/short"]
    assert stretched
    for event in stretched:
        # The step computed for half a millisecond; the rest was waiting for a CPU. (The
        # proof is bounded by the probe's marks, 2 ms apart here; and the loop's thread may
        # also wait one GIL switch interval for the watchdog, which samples its stack once
        # the step passes the threshold: a wait for the GIL, not for a CPU.)
        assert event.preempted >= (event.duration - 0.005 - threshold / 2
                                   - sys.getswitchinterval()), (event.duration, event.preempted)
        assert "waiting for a CPU" in event.summary()
    assert monitor.internal_errors == 0


# -- a pause of the whole process --------------------------------------------------------------


@needs_schedstat
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_pause_of_the_whole_process_is_reported_as_a_pause(loop_kind: str) -> None:
    """A process running 20 ms steps back to back is stopped (SIGSTOP) for 400 ms, twice: the
    stretched steps are the pause's blocks (route <paused>), not /short's. A C call that
    sleeps holding the GIL, which leaves the watchdog as blind, is still its route's block."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.pause_child", loop_kind], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(2):
            time.sleep(0.3)
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(0.4)
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.3)
        proc.stdin.write("go on\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    lines = out.strip().splitlines()
    assert lines[-1] == "done", out
    *events, errors = (json.loads(line) for line in lines[:-1])
    assert errors == {"internal_errors": 0}
    routes = [e["route"] for e in events]
    assert "/short" not in routes, events
    paused = [e for e in events if e["route"] == "<paused>"]
    assert paused, events
    for event in paused:
        assert event["method"] is None and event["frames"] == []
        assert event["duration"] >= 0.35 and event["paused"] >= event["duration"] - 0.1, event
    gil = [e for e in events if e["route"] == "/gil-sleep"]
    assert len(gil) == 1 and gil[0]["paused"] == 0.0 and gil[0]["duration"] >= 0.15, events


# -- the bound, the reader -------------------------------------------------------------------


def test_inside_bounds_wait_and_off_cpu_time_from_marks() -> None:
    # A mark 5 ms before a 50 ms step; 44 ms of wait and 1 ms on a CPU since: at least 39 ms
    # of wait inside the step, and at least 50 - 45 = 5 ms neither running nor waiting.
    marks = [(0.995, (10.0, 1.0, 5))]
    waited, off = inside(marks, 1.0, 1.05, (10.001, 1.044, 9))
    assert waited == pytest.approx(0.039) and off == pytest.approx(0.005)
    # The same, the mark 40 ms before: the wait may all have been before the step.
    waited, off = inside([(0.96, (10.0, 1.0, 5))], 1.0, 1.05, (10.001, 1.044, 9))
    assert waited == pytest.approx(0.004) and off == pytest.approx(0.005)
    # A sleep: no CPU, no wait: the whole stretch is off the CPU.
    waited, off = inside(marks, 1.0, 1.05, (10.0, 1.0, 6))
    assert waited == 0.0 and off == pytest.approx(0.05)
    # A mark inside the stretch proves what follows it; the best mark wins each bound.
    waited, off = inside([(0.9, (9.9, 0.99, 1)), (1.01, (10.0, 1.0, 2))], 1.0, 1.05,
                         (10.0, 1.03, 3))
    assert waited == pytest.approx(0.03) and off == pytest.approx(0.01)
    # No marks: nothing proven.
    assert inside([], 1.0, 1.05, (99.0, 2.0, 1)) == (0.0, 0.0)


@needs_schedstat
def test_reader_reads_this_threads_counters() -> None:
    reader = open_reader(threading.get_native_id())
    assert reader is not None
    first = reader.read()
    burn_cpu(0.02)
    time.sleep(0.01)
    second = reader.read()
    assert first is not None and second is not None
    assert second[0] - first[0] >= 0.015  # on a CPU
    assert second[1] >= first[1] >= 0.0 and second[2] > first[2]
    reader.close()
    assert reader.read() is None
    reader.close()  # twice is fine


def test_reader_of_a_missing_thread_is_none() -> None:
    assert open_reader(2**31 - 2) is None


class _FakeReader(SchedReader):
    """Reads zeros (the counters of an idle thread) until told to fail."""

    def __init__(self) -> None:
        self.left = 10**9
        self.reads = 0

    def read(self) -> tuple[float, float, int] | None:
        self.reads += 1
        self.left -= 1
        if self.left < 0:
            raise OSError("gone")
        return (0.0, 0.0, 0)

    def close(self) -> None:
        pass


def _fake_readers(monkeypatch: pytest.MonkeyPatch) -> list[_FakeReader]:
    readers: list[_FakeReader] = []

    def fake_open(native_tid: int) -> Any:
        readers.append(_FakeReader())
        return readers[-1]

    monkeypatch.setattr(monitor_module, "open_reader", fake_open)
    return readers


async def _sleepy(seconds: float) -> None:
    sleeper(seconds)


@pytest.mark.parametrize("reader", ["none", "broken"])
def test_without_schedstat_blocks_are_reported_without_labels(
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
    event = monitor.blocks[0]
    assert event.duration >= 0.05 and event.preempted == 0.0 and event.paused == 0.0
    assert monitor.internal_errors == 0
    if reader == "broken":
        assert len(readers) == 1 and readers[0].left == -1  # it failed once, and was let go


def test_reader_is_read_on_the_probe_not_per_step(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of short steps cost no read; the probe reads once per firing."""
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
    assert readers[0].reads <= monitor.lag_count + 1, (readers[0].reads, monitor.lag_count)


@needs_schedstat
def test_a_reader_is_only_read_by_its_own_thread(run: Any) -> None:
    """Were the loop run by another thread (a forked child's), the reader would read the
    wrong thread's counters: it is dropped, and blocks are reported without its labels."""

    async def main() -> loopwatch.Monitor:
        monitor = loopwatch.Monitor(block_threshold=0.02, log_blocks=False).start()
        await asyncio.sleep(0.05)
        try:
            assert monitor._sched is not None  # read on Linux
            monitor._native_thread_id = -1  # as if another thread now ran the loop
            await asyncio.create_task(_sleepy(0.05))
            await asyncio.sleep(0.02)
        finally:
            monitor.stop()
        assert monitor._sched is None
        return monitor

    monitor = run(main())
    assert monitor.block_count == 1 and monitor.blocks[0].preempted == 0.0
