"""What the loop monitor costs: idle CPU, and time added per callback and per task step.

Side by side in one run, alternating rounds, medians: a bare loop against the same loop with
a loopwatch monitor, on asyncio and on uvloop.

    python benchmarks/monitor_cost.py [--rounds 7] [--idle-seconds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import uvloop  # noqa: E402

import loopwatch  # noqa: E402

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(kind: str, coro_fn: Callable[[], Any], monitored: bool) -> Any:
    async def main() -> Any:
        monitor = None
        if monitored:
            monitor = loopwatch.Monitor(log_blocks=False).start()
            await asyncio.sleep(0.02)  # the first probe starts the watchdog
        try:
            return await coro_fn()
        finally:
            if monitor is not None:
                monitor.stop()

    with asyncio.Runner(loop_factory=LOOPS[kind]) as runner:
        return runner.run(main())


def idle(seconds: float) -> Callable[[], Any]:
    async def body() -> float:
        cpu0 = time.process_time()
        await asyncio.sleep(seconds)
        return (time.process_time() - cpu0) / seconds  # fraction of one core

    return body


def callbacks(n: int) -> Callable[[], Any]:
    """n plain callbacks, each scheduling the next: the cost of the loop's own dispatch."""

    async def body() -> float:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        left = n

        def cb() -> None:
            nonlocal left
            left -= 1
            if left:
                loop.call_soon(cb)
            else:
                done.set_result(None)

        t = time.perf_counter()
        loop.call_soon(cb)
        await done
        return (time.perf_counter() - t) / n

    return body


def task_steps(n: int, tasks: int = 100) -> Callable[[], Any]:
    """Tasks created under the monitor, each doing n/tasks `await asyncio.sleep(0)` steps."""

    async def worker(k: int) -> None:
        for _ in range(k):
            await asyncio.sleep(0)

    async def body() -> float:
        per = n // tasks
        t = time.perf_counter()
        await asyncio.gather(*(asyncio.create_task(worker(per)) for _ in range(tasks)))
        return (time.perf_counter() - t) / (per * tasks)

    return body


def measure(kind: str, bench: Callable[[], Any], rounds: int) -> tuple[list[float], list[float]]:
    bare: list[float] = []
    watched: list[float] = []
    for i in range(rounds):
        # Alternate which goes first so drift on a shared machine hits both alike.
        order = (False, True) if i % 2 == 0 else (True, False)
        for monitored in order:
            (watched if monitored else bare).append(run(kind, bench, monitored))
    return bare, watched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--callbacks", type=int, default=200_000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    results: dict[str, Any] = {"python": sys.version.split()[0], "rounds": args.rounds}
    print(
        f"loopwatch monitor cost — Python {results['python']}, {os.cpu_count()} CPUs, "
        f"{args.rounds} alternating rounds, medians\n"
    )
    print(f"{'loop':8} {'measure':28} {'bare':>12} {'monitored':>12} {'added':>12}")
    for kind in LOOPS:
        rows = [
            (
                "idle CPU (% of one core)",
                idle(args.idle_seconds),
                100.0,
                "%",
                max(3, args.rounds // 2),
            ),
            ("per callback (µs)", callbacks(args.callbacks), 1e6, "µs", args.rounds),
            ("per task step (µs)", task_steps(args.callbacks), 1e6, "µs", args.rounds),
        ]
        for name, bench, scale, unit, rounds in rows:
            bare, watched = measure(kind, bench, rounds)
            b, w = statistics.median(bare) * scale, statistics.median(watched) * scale
            results[f"{kind}/{name}"] = {"bare": b, "monitored": w, "added": w - b, "unit": unit}
            print(f"{kind:8} {name:28} {b:12.3f} {w:12.3f} {w - b:+12.3f}")
    print("\nTargets: idle ≤ 0.5 % of one core; ≤ 1 µs added per callback or task step on asyncio.")
    print("On uvloop plain callbacks are not timed (see README), so their added cost is ~0;")
    print("task steps are timed by wrapping each task's coroutine.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
