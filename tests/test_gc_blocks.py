"""A full garbage collection inside a step is the collector's block, not the step's code."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import loopwatch
from loopwatch import _gc

THRESHOLD = 0.05


@pytest.fixture(scope="module")
def big_heap() -> Iterator[float]:
    """Enough long-lived container objects that a full collection takes well over the
    threshold; yields how long one takes here."""
    heap = [[i] for i in range(4_000_000)]
    gc.collect()
    t = time.perf_counter()
    gc.collect()
    took = time.perf_counter() - t
    if took < 2 * THRESHOLD:
        heap.extend([[i] for i in range(int(4_000_000 * (2.5 * THRESHOLD / took)))])
        t = time.perf_counter()
        gc.collect()
        took = time.perf_counter() - t
    yield took
    del heap
    gc.collect()


def _watch(run: Any, step: Any) -> tuple[loopwatch.Watch, float]:
    took = 0.0

    async def blocked() -> None:
        nonlocal took
        t = time.perf_counter()
        step()
        took = time.perf_counter() - t

    async def main() -> loopwatch.Watch:
        async with loopwatch.watch(block_threshold=THRESHOLD, log_blocks=False) as w:
            await asyncio.create_task(blocked(), name="step")
            await asyncio.sleep(0.02)
        return w

    return run(main()), took


def test_a_full_collection_is_reported_as_the_collectors_block(run: Any, big_heap: float) -> None:
    w, took = _watch(run, gc.collect)
    assert took >= THRESHOLD
    assert len(w.blocks) == 1, w.blocks
    event = w.blocks[0]
    assert event.route == _gc.GC_ROUTE and event.method is None
    assert event.hint == _gc.GC_HINT and event.stack_status == _gc.GC_STATUS
    assert event.frames == ()
    # The collector's own time is nearly the whole step (the rest: two callbacks, the call).
    assert event.gc_seconds <= event.duration
    assert event.duration - event.gc_seconds < 0.005, (event.duration, event.gc_seconds)
    assert "garbage collector" in event.summary()
    assert event.as_dict()["gc_seconds"] == event.gc_seconds


def test_a_real_block_with_a_collection_in_it_stays_the_codes(run: Any, big_heap: float) -> None:
    def sleep_then_collect() -> None:
        time.sleep(2 * THRESHOLD)  # the code's own block, over the threshold by itself
        gc.collect()

    w, took = _watch(run, sleep_then_collect)
    assert len(w.blocks) == 1, w.blocks
    event = w.blocks[0]
    assert event.route != _gc.GC_ROUTE
    assert event.hint != _gc.GC_HINT
    # The collection is noted: the whole step minus the sleep, give or take a few ms.
    assert abs(event.gc_seconds - (took - 2 * THRESHOLD)) < 0.01, (event.gc_seconds, took)


def test_a_collection_in_another_thread_does_not_make_a_block_the_collectors(
    run: Any, big_heap: float
) -> None:
    """The loop thread sleeps (no GIL needed) while another thread runs a full collection
    that lasts about as long: the block is still the code's."""
    def sleep_while_another_thread_collects() -> None:
        collector = threading.Thread(target=gc.collect)
        collector.start()
        time.sleep(2 * THRESHOLD)
        collector.join()

    w, _ = _watch(run, sleep_while_another_thread_collects)
    assert len(w.blocks) == 1, w.blocks
    event = w.blocks[0]
    assert event.route != _gc.GC_ROUTE and event.gc_seconds == 0.0, event


def test_a_block_without_a_collection_has_no_collector_time(run: Any) -> None:
    w, _ = _watch(run, lambda: time.sleep(2 * THRESHOLD))
    assert len(w.blocks) == 1, w.blocks
    assert w.blocks[0].gc_seconds == 0.0 and w.blocks[0].route != _gc.GC_ROUTE


def test_the_collector_callback_is_removed_with_the_last_monitor(run: Any) -> None:
    before = list(gc.callbacks)

    async def main() -> None:
        async with loopwatch.watch(log_blocks=False):
            assert gc.callbacks.count(_gc._pauses) == 1
            async with loopwatch.watch(log_blocks=False):  # shares the running monitor
                assert gc.callbacks.count(_gc._pauses) == 1
        assert gc.callbacks == before

    run(main())
