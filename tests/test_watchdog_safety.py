"""The watchdog reads the loop thread's stack safely: never walking another thread's frames
itself (which crashed CPython 3.11, python/cpython#99110 and getsentry/sentry-python#2386), at
every allowed stack depth, with many threads, and with ``sys._current_frames`` out of reach.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import loopwatch
from tests.events import of_code
from loopwatch._stacks import MAX_FRAMES, StackReader
from loopwatch._watchdog import NO_THREAD

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sampling_stacks_that_unwind_never_crashes() -> None:
    """2,000 blocks of 21-30 ms at the bottom of 900-frame recursions (plain and coroutine
    calls), threshold 20 ms, the deepest stacks allowed: the old walk died with SIGSEGV on
    3.11 in each of six runs (after 50 to 1,550 blocks). Every block is reported; the watchdog
    gets to a block this short before it ends about half the time, and its stacks are right."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.apps.deep_blocks", "2000"], cwd=ROOT,
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["blocks"] == 2000, result
    assert result["internal_errors"] == 0
    assert result["max_frames"] == MAX_FRAMES
    # Blocks end 1-10 ms after the threshold, and the watchdog needs up to a switch interval
    # (5 ms) to get the GIL from the busy loop thread: many end before it looks (178-655 of
    # the 2,000 sampled in runs on Python 3.10 and 3.13, the fewest on a loaded host).
    assert result["sampled"] >= 100, result
    # A sample is of the block's own step: mostly at the blocking call; now and then that
    # step is already past it (the recursion unwinding, back in the task's coroutine `one`
    # as it returns, asyncio scheduling callbacks as the coroutine ends, the garbage
    # collector's callback): 75-97 % at the call in those runs. Never a frame from anywhere
    # else (`main`, which awaits each task, runs in steps of its own).
    assert result["innermost_spin"] >= 0.6 * result["sampled"], result
    for where in result["innermost"]:
        module, function = where.split(":", 1)
        assert (module == "__main__" and function in ("spin", "deep", "adeep", "one")
                or module.split(".")[0] in ("asyncio", "loopwatch")), result


class Handler:
    def handle(self) -> None:
        self.inner(5)

    def inner(self, n: int) -> None:
        if n:
            self.inner(n - 1)
        else:
            time.sleep(0.12)


@pytest.mark.parametrize("depth", [1, 3, MAX_FRAMES])
def test_the_innermost_frames_with_their_class_names(run: Any, depth: int) -> None:
    async def main() -> loopwatch.Watch:
        async with loopwatch.watch(stack_depth=depth, log_blocks=False) as w:
            await asyncio.create_task(asyncio.sleep(0, result=None))
            await asyncio.create_task(_handle())
        return w

    async def _handle() -> None:
        Handler().handle()

    w = run(main())
    blocks = of_code(w.blocks)
    assert len(blocks) == 1
    frames = blocks[0].frames
    assert 1 <= len(frames) <= depth
    assert frames[0].function == "Handler.inner" and frames[0].module == __name__
    if depth >= 8:
        names = [f.function for f in frames[:8]]
        assert names[6] == "Handler.handle" and names[7].endswith("_handle"), names


def test_sampling_never_touches_other_threads_frames(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden() -> Any:
        raise AssertionError("sys._current_frames() called")

    monkeypatch.setattr(sys, "_current_frames", forbidden)

    async def main() -> loopwatch.Watch:
        async with loopwatch.watch(log_blocks=False) as w:
            await asyncio.create_task(_sleeper())
        return w

    w = run(main())
    blocks = of_code(w.blocks)
    assert len(blocks) == 1 and blocks[0].stack_status == "sampled"
    assert blocks[0].blocking_frame is not None
    assert blocks[0].blocking_frame.function == "_sleeper"
    assert w.monitor is not None and w.monitor.internal_errors == 0


async def _sleeper() -> None:
    time.sleep(0.12)


def test_a_loop_thread_beyond_faulthandlers_100_threads_says_so(run: Any) -> None:
    """faulthandler dumps the newest 100 threads; the loop thread (here the main thread, the
    oldest) is then not among them: the block is reported in full, without a stack."""
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(110)]
    for thread in threads:
        thread.start()
    try:
        async def main() -> loopwatch.Watch:
            async with loopwatch.watch(log_blocks=False) as w:
                await asyncio.create_task(_sleeper())
            return w

        w = run(main())
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    blocks = of_code(w.blocks)
    assert len(blocks) == 1
    event = blocks[0]
    assert event.duration >= 0.12 and event.frames == () and event.stack_status == NO_THREAD


def test_reader_of_a_thread_that_is_gone_reads_nothing() -> None:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    assert thread.ident is not None
    reader = StackReader(thread.ident)
    try:
        assert reader.snapshot() is None
        mine = StackReader(threading.get_ident()).snapshot()
        assert mine and mine[0][2] == "snapshot"
    finally:
        reader.close()
    with pytest.raises(RuntimeError):
        reader.snapshot()


def test_stack_depth_is_bounded_by_what_can_be_read_safely() -> None:
    with pytest.raises(ValueError, match=r"stack_depth=101; allowed: an integer from 1 to 100"):
        loopwatch.Config(stack_depth=101)
    assert loopwatch.Config(stack_depth=100).stack_depth == 100
