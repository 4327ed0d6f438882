"""What the loop monitor costs: idle CPU, per callback and task step, and per request as
requests await more or as more of them are in flight.

Side by side in one run, alternating rounds, medians and interquartile ranges, on asyncio and
uvloop:

* idle CPU: a loop that sleeps, bare vs watched by a Monitor (its probe and watchdog thread);
* per callback: a chain of ``call_soon`` callbacks, bare vs watched;
* per task step: tasks doing ``await asyncio.sleep(0)``, bare vs watched;
* per request: the FastAPI app of bench_apps, bare vs with LoopWatchMiddleware (everything on),
  on a route that awaits ``asyncio.sleep(0)`` 1, 10 or 100 times (50 requests in flight), and
  with 1, 100 or 1,000 requests in flight (1 await each), driven in process.

    python -m benchmarks.monitor_cost [--rounds 5] [--idle-seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from . import bench_apps
from ._common import command_line, log, paired_diff, summary, write_result
from ._inprocess import LOOPS, run_app

import loopwatch


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


def alternate(rounds: int, a: Callable[[], float], b: Callable[[], float],
              ) -> tuple[list[float], list[float]]:
    """a() and b() once per round, which goes first alternating (drift hits both alike)."""
    xs: list[float] = []
    ys: list[float] = []
    for i in range(rounds):
        if i % 2 == 0:
            xs.append(a())
            ys.append(b())
        else:
            ys.append(b())
            xs.append(a())
    return xs, ys


def row(bare: list[float], watched: list[float], unit: str) -> dict[str, Any]:
    return {"bare": summary(bare), "monitored": summary(watched),
            "added": paired_diff(bare, watched), "unit": unit}


def loop_rows(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    idle_rounds = max(2, args.rounds // 2)
    for name, bench, scale, unit, rounds in (
        ("idle CPU", idle(args.idle_seconds), 100.0, "% of one core", idle_rounds),
        ("per callback", callbacks(args.callbacks), 1e6, "µs", args.rounds),
        ("per task step", task_steps(args.callbacks), 1e6, "µs", args.rounds),
    ):
        bare, watched = alternate(rounds, lambda b=bench, s=scale: run(kind, b, False) * s,
                                  lambda b=bench, s=scale: run(kind, b, True) * s)
        out[name] = row(bare, watched, unit)
        r = out[name]
        log(f"  {kind:8} {name:34} {r['bare']['median']:10.3f} {r['monitored']['median']:10.3f}"
            f" {r['added']['median']:+10.3f} ± {r['added']['iqr'] / 2:.3f} {unit}")
    return out


def request_rows(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """µs per request (process CPU time), bare vs loopwatch, across awaits and in-flight."""
    out: dict[str, Any] = {"awaits": {}, "in_flight": {}}
    grid = [("awaits", k, 50) for k in (1, 10, 100)]
    grid += [("in_flight", 1, c) for c in (1, 100, 1000)]
    for axis, k, conc in grid:
        # About the same time per sample whatever k: more awaits, fewer requests.
        n = max(args.requests // max(1, k // 4), 2 * conc, 200)
        def sample(factory: Callable[..., Any], n: int = n, conc: int = conc,
                   k: int = k) -> tuple[float, float]:
            w, c = run_app(kind, lambda: factory(awaits=True), n, conc,
                           path=lambda i: f"/awaits/{k}", warmup=min(n, max(500, conc)))
            return w * 1e6, c * 1e6

        pairs_b: list[tuple[float, float]] = []
        pairs_w: list[tuple[float, float]] = []
        for i in range(args.rounds):
            order = [(bench_apps.bare, pairs_b), (bench_apps.with_loopwatch, pairs_w)]
            for factory, sink in (order if i % 2 == 0 else order[::-1]):
                sink.append(sample(factory))
        key = str(k if axis == "awaits" else conc)
        res = {
            "awaits": k, "in_flight": conc, "requests": n,
            "cpu": row([c for _, c in pairs_b], [c for _, c in pairs_w], "µs/request"),
            "wall": row([w for w, _ in pairs_b], [w for w, _ in pairs_w], "µs/request"),
        }
        cpu = res["cpu"]
        cpu["added_ratio"] = cpu["added"]["median"] / cpu["bare"]["median"]
        out[axis][key] = res
        log(f"  {kind:8} {axis + ' = ' + key:34} {cpu['bare']['median']:10.1f} "
            f"{cpu['monitored']['median']:10.1f} {cpu['added']['median']:+10.1f} "
            f"± {cpu['added']['iqr'] / 2:.1f} µs/request CPU ({cpu['added_ratio']:+.1%})")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--callbacks", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=2000, help="per sample, 1 await")
    parser.add_argument("--loops", default="asyncio,uvloop")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"config": vars(args), "loops": {}}
    log(f"loopwatch monitor cost, {args.rounds} alternating rounds, medians; "
        f"added = median of per-round differences ± half its IQR")
    log(f"  {'loop':8} {'measure':34} {'bare':>10} {'monitored':>10} {'added':>10}")
    for kind in args.loops.split(","):
        res = loop_rows(kind, args)
        res["requests"] = request_rows(kind, args)
        results["loops"][kind] = res
    log("\nTargets: idle ≤ 0.5 % of one core; ≤ 1 µs added per callback on asyncio.")
    log("On uvloop plain callbacks are not timed (see README), so their added cost is ~0;")
    log("task steps are timed by wrapping each task's coroutine.")
    path = write_result("monitor_cost", results, command_line())
    log(f"written to {path}")
    return results


if __name__ == "__main__":
    main()
