"""Per-request CPU time in process, finely interleaved: a tighter estimate than overhead.py's.

overhead.py builds a fresh app and loop for each sample (3,000 requests, about half a second),
so a shared machine's drift over seconds lands in whole samples, and 25 rounds leave the
median uncertain by a few percent. Here every variant is built once, each on its own event
loop in one process (only one loop runs at a time, as ``run_until_complete`` allows), and
they take turns in short batches (300 requests, tens of milliseconds) for hundreds of rounds,
the order reversed every other round. Each batch is timed with the main thread's CPU clock
(``time.thread_time``), so time the OS gives to other processes is not counted. The result
is the median over rounds of each variant's batch time relative to bare's in the same round,
with its interquartile range and an approximate 95 % interval of that median.

What differs from a process that runs only one variant, and which way it leans:

* On asyncio, loopwatch's step hook replaces ``Handle._run`` for the whole process, so bare's
  callbacks go through it too (finding no monitor on their loop). The hook's C path is
  cheaper than asyncio's own ``Handle._run``, so bare runs a little faster here than alone,
  and loopwatch's relative cost comes out a little *higher* than it is. uvloop has no such
  process-wide hook (its task factory is per loop).
* loopwatch's watchdog thread and probe keep running while the other variants' batches run;
  its watchdog's CPU is not in any batch's time (main-thread clock), its per-second cost is
  what monitor_cost.py's idle figure measures.
* While the other variants run, loopwatch's loop is paused, and its probe comes late: to its
  monitor that looks like a block of the loop (on uvloop, where not every callback is timed,
  it reports one, with a log line and a stack of whatever the thread ran meanwhile). So the
  block threshold is set to 60 s here (``LOOPWATCH_BLOCK_THRESHOLD``): the per-request code is
  the same whatever the threshold, and no event is made out of a pause.

    python -m benchmarks.interleaved [--batch 300] [--rounds 400] [--loops asyncio,uvloop]
                                     [--variants bare,loopwatch,instrumentator]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import statistics
import time
from typing import Any


# A paused loop is no block (see above); set before bench_apps builds any config.
os.environ["LOOPWATCH_BLOCK_THRESHOLD"] = "60"

from . import bench_apps
from ._common import command_line, log, summary, write_result
from ._inprocess import LOOPS, Lifespan, drive, item_path


def median_interval(xs: list[float]) -> tuple[float, float]:
    """An approximate 95 % interval of the median (order statistics, normal approximation)."""
    s = sorted(xs)
    n = len(s)
    half = 1.96 * math.sqrt(n) / 2
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half))
    return s[lo], s[hi]


def measure(loop_kind: str, names: list[str], batch: int, rounds: int, concurrency: int,
            ) -> dict[str, list[float]]:
    """µs of main-thread CPU per request, one sample per variant per round."""
    factories = {**bench_apps.VARIANTS, **bench_apps.ABLATIONS}
    envs: dict[str, tuple[asyncio.AbstractEventLoop, Any, Lifespan]] = {}
    for name in names:
        loop = LOOPS[loop_kind]()
        app = factories[name]()
        lifespan = Lifespan(app)
        loop.run_until_complete(lifespan.__aenter__())
        loop.run_until_complete(drive(app, 1000, concurrency, item_path))  # warm up
        envs[name] = (loop, app, lifespan)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.freeze()
    try:
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                loop, app, _ = envs[name]
                t = time.thread_time()
                loop.run_until_complete(drive(app, batch, concurrency, item_path))
                samples[name].append((time.thread_time() - t) / batch * 1e6)
    finally:
        gc.unfreeze()
        for loop, _, lifespan in envs.values():
            loop.run_until_complete(lifespan.__aexit__(None, None, None))
            loop.close()
    return samples


def analyse(samples: dict[str, list[float]]) -> dict[str, Any]:
    base = samples["bare"]
    out: dict[str, Any] = {}
    for name, xs in samples.items():
        rel = [x / b - 1 for x, b in zip(xs, base, strict=True)]
        out[name] = {
            "median_us": statistics.median(xs),
            "relative": {**summary(rel), "ci95": list(median_interval(rel))},
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=300, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--variants", default="bare,loopwatch,instrumentator",
                        help="comma-separated, bare first (bench_apps variants or ablations)")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    if names[0] != "bare":
        raise SystemExit("--variants must start with bare")
    results: dict[str, Any] = {"config": vars(args), "loops": {}}
    log(f"In process, interleaved: {args.batch}-request batches x {args.rounds} alternating "
        f"rounds, {args.concurrency} in flight, main-thread CPU time")
    for loop_kind in args.loops.split(","):
        res = analyse(measure(loop_kind, names, args.batch, args.rounds, args.concurrency))
        results["loops"][loop_kind] = res
        log(f"\n{loop_kind}:  {'variant':26} {'µs/req':>8} {'vs bare, median':>16} "
            f"{'IQR':>17} {'95 % interval':>17}")
        for name, v in res.items():
            rel = v["relative"]
            lo, hi = rel["ci95"]
            log(f"  {'':8}{name:26} {v['median_us']:8.1f} {rel['median']:+16.1%} "
                f"{rel['q1']:+8.1%}..{rel['q3']:+.1%} {lo:+8.1%}..{hi:+.1%}")
    path = write_result("interleaved", results, command_line())
    log(f"\nwritten to {path}")
    return results


if __name__ == "__main__":
    main()
