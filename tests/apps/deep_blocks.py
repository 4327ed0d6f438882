"""Blocks at the bottom of deep recursions, sampled as the loop thread unwinds: the pattern that
crashed CPython 3.11 when the watchdog walked the loop thread's frames (f_back) itself.

    python -m tests.apps.deep_blocks BLOCKS [asyncio|uvloop]

Prints one JSON line with the block count and what the events looked like.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import sys
import time

import loopwatch

DEPTH = 900


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def deep(n: int, seconds: float) -> int:
    if n == 0:
        spin(seconds)
        return 0
    return deep(n - 1, seconds) + 1


async def adeep(n: int, seconds: float) -> int:
    if n == 0:
        spin(seconds)
        return 0
    return await adeep(n - 1, seconds) + 1


async def one(i: int) -> None:
    seconds = random.uniform(0.021, 0.030)  # just over the threshold: sampled, then unwound
    if i % 2:
        await adeep(DEPTH, seconds)
    else:
        deep(DEPTH, seconds)


async def main(blocks: int) -> None:
    sys.setrecursionlimit(10 * DEPTH)
    monitor = loopwatch.Monitor(block_threshold=0.02, stack_depth=100, ring_size=blocks,
                                log_blocks=False).start()
    await asyncio.sleep(0.05)
    for i in range(blocks):
        await asyncio.create_task(one(i))
    monitor.stop()
    events = list(monitor.blocks)
    print(json.dumps({
        "blocks": monitor.block_count,
        "sampled": sum(e.stack_status == "sampled" for e in events),
        "max_frames": max((len(e.frames) for e in events), default=0),
        "innermost_spin": sum(bool(e.frames) and e.frames[0].function == "spin"
                              for e in events),
        # where the other samples were: the recursion unwinding, or the task machinery
        "innermost": collections.Counter(f"{e.frames[0].module}:{e.frames[0].function}"
                                         for e in events
                                         if e.stack_status == "sampled" and e.frames),
        "internal_errors": monitor.internal_errors,
    }), flush=True)


if __name__ == "__main__":
    count = int(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "uvloop":
        import uvloop

        uvloop.run(main(count))
    else:
        asyncio.run(main(count))
