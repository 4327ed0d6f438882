"""A process for the pause test: its loop runs short CPU-bound steps back to back under the
route /short, while the test stops and continues the whole process; then one step that sleeps
holding the GIL (a C call through ctypes.PyDLL) under /gil-sleep. Prints the block events as
JSON lines, then "done".

    python -m tests.apps.pause_child asyncio|uvloop
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import sys
import time

import loopwatch


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def short_steps(stop: asyncio.Event) -> None:
    with loopwatch.owner_scope(loopwatch.Owner("GET", "/short")):
        while not stop.is_set():
            spin(0.02)  # 20 ms of CPU: far below the threshold
            await asyncio.sleep(0)


async def gil_sleep() -> None:
    with loopwatch.owner_scope(loopwatch.Owner("GET", "/gil-sleep")):
        ctypes.PyDLL(None).usleep(150_000)  # off the CPU, not runnable, the GIL held


async def main() -> None:
    monitor = loopwatch.Monitor(block_threshold=0.1, log_blocks=False).start()
    await asyncio.sleep(0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(short_steps(stop))
    await asyncio.sleep(0.05)
    print("ready", flush=True)
    # The test pauses us now and then; it says "go on" on stdin when it is done.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    await task
    await asyncio.create_task(gil_sleep())
    await asyncio.sleep(0.05)
    monitor.stop()
    for event in monitor.blocks:
        print(json.dumps(event.as_dict()), flush=True)
    print(json.dumps({"internal_errors": monitor.internal_errors}), flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
