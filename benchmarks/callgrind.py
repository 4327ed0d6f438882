"""Instructions per request under callgrind: the added work, whatever the machine is doing.

Wall-clock timings on a shared 2-core VM move by ±10 µs from run to run; the number of
instructions the CPU executes for a request does not. Each variant of bench_apps (and, with
``--ablations``, loopwatch with parts switched off) is driven in process exactly as
overhead.py does it, inside one ``valgrind --tool=callgrind`` process per event loop (the
loops run in parallel: counts do not depend on load). Counting is switched on and off around
the measured work: the child calls ``os.getppid()`` (callgrind ``--zero-before=os_getppid``)
before it and ``os.getpgrp()`` (``--dump-before=os_getpgrp``) after it. Pairs of segments of
n and 2n requests per variant; their difference divided by n is the per-request count, free of
the fixed cost of a segment (the median over ``--repeats`` pairs: the bare app counts exactly
the same every time, loopwatch varies by a few thousand instructions with how its timers
fall). All threads are counted (loopwatch's watchdog too).

Also counted, bare vs watched: a plain ``call_soon`` callback, a task step, and a request to a
route that awaits ``asyncio.sleep(0)`` 10 times (the added instructions per await).

Under callgrind the program runs ~50-100x slower while timers keep real time, so loopwatch's
probe (every 10 ms), its batched metrics flush (on each probe), its once-a-second tick and its
watchdog (every 75 ms) would fire that much more often per request than natively. The child
therefore stretches loopwatch's intervals by ``--time-scale`` (default 60: probe 0.6 s,
threshold 6 s, tick 60 s; and the 1 ms and 2 ms by which the step hooks tell a pause of the
loop and a long step: otherwise every step would look long), so that they fire about as often
per request as they do natively;
the probes per request are reported so this can be checked against overhead.py.

``--cache-sim`` also has callgrind simulate the caches and the branch predictor
(``--cache-sim=yes --branch-sim=yes``) and reports, per request, the simulated first-level
instruction- and data-cache misses and the mispredicted branches: the work that costs time
without being instructions. The simulated machine is callgrind's model of this CPU's caches
(one process alone on them), so these are indications of where the time goes, not timings.

    python -m benchmarks.callgrind [--requests 80] [--repeats 2] [--loops asyncio,uvloop]
                                   [--cache-sim]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


ZERO, DUMP = "os_getppid", "os_getpgrp"
#: With --cache-sim: first-level instruction-cache read misses, data-cache read and write
#: misses, mispredicted conditional and indirect branches (callgrind's event names).
SIMULATED = ("I1mr", "D1mr", "D1mw", "Bcm", "Bim")
SIMULATED_NAMES = {"I1mr": "L1i misses", "D1mr": "L1d read misses", "D1mw": "L1d write misses",
                   "Bcm": "mispredicted cond.", "Bim": "mispredicted ind."}
LOOP_WORK = 4000  # callbacks or task steps per (short) segment


def child(args: argparse.Namespace) -> None:
    from . import bench_apps
    from ._inprocess import LOOPS, Lifespan, drive, item_path

    import loopwatch
    from loopwatch import _monitor, _waiting

    # Timers stretched by the slowdown (see the docstring); read by Config.from_env().
    scale = args.time_scale
    os.environ["LOOPWATCH_PROBE_INTERVAL"] = str(0.01 * scale)
    os.environ["LOOPWATCH_BLOCK_THRESHOLD"] = str(min(0.1 * scale, 60.0))
    _monitor._TICK_SECONDS = 1.0 * scale  # type: ignore[attr-defined]
    # and the gaps by which steps tell a pause and a long run (see loopwatch._waiting)
    _monitor.IDLE_GAP = _waiting.IDLE_GAP * scale  # type: ignore[attr-defined]
    _monitor.LOOK_AFTER = _waiting.LOOK_AFTER * scale  # type: ignore[attr-defined]
    factories = {**bench_apps.VARIANTS, **bench_apps.ABLATIONS}
    segments: list[dict[str, Any]] = []

    def measured(workload: str, variant: str, n: int, monitor: Any) -> Any:
        class Segment:
            def __enter__(self) -> None:
                self.probes = monitor.lag_count if monitor else 0
                gc.collect()
                os.getppid()  # callgrind: zero the counters
                self.t = time.perf_counter()

            def __exit__(self, *exc: Any) -> None:
                elapsed = time.perf_counter() - self.t
                os.getpgrp()  # callgrind: dump the counters
                segments.append({
                    "workload": workload, "variant": variant, "n": n, "seconds": elapsed,
                    "probes": (monitor.lag_count - self.probes) if monitor else 0,
                })

        return Segment()

    async def requests(name: str, awaits: int) -> None:
        app = factories[name](awaits=bool(awaits))
        path = (lambda i: f"/awaits/{awaits}") if awaits else item_path
        workload = f"awaits{awaits}" if awaits else "request"
        async with Lifespan(app):
            await drive(app, args.warmup, args.concurrency, path)
            monitor = loopwatch.get_monitor()
            for n in (args.requests, 2 * args.requests) * args.repeats:
                with measured(workload, name, n, monitor):
                    await drive(app, n, args.concurrency, path)

    async def callbacks(n: int) -> None:
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

        loop.call_soon(cb)
        await done

    async def worker(k: int) -> None:
        for _ in range(k):
            await asyncio.sleep(0)

    async def steps(n: int) -> None:
        await asyncio.gather(*(asyncio.create_task(worker(n // 100)) for _ in range(100)))

    async def loop_work(workload: str, watched: bool) -> None:
        fn = callbacks if workload == "callback" else steps
        config = loopwatch.Config.from_env(log_blocks=False)
        monitor = loopwatch.Monitor(config=config).start() if watched else None
        await asyncio.sleep(0.02)
        await fn(LOOP_WORK)  # warm-up
        for n in (LOOP_WORK, 2 * LOOP_WORK) * args.repeats:
            with measured(workload, "monitored" if watched else "bare", n, monitor):
                await fn(n)
        if monitor is not None:
            monitor.stop()

    jobs: list[Any] = [lambda name=name: requests(name, 0) for name in args.variants.split(",")]
    if not args.light:
        jobs += [lambda name=name: requests(name, 10) for name in ("bare", "loopwatch")]
        jobs += [lambda w=w, m=m: loop_work(w, m) for w in ("callback", "step")
                 for m in (False, True)]
    for job in jobs:
        with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
            runner.run(job())
    print("SEGMENTS " + json.dumps(segments), flush=True)


def run_loop(loop: str, variants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from ._common import ROOT, callgrind_events

    out = Path(args.keep, loop) if args.keep else Path(tempfile.mkdtemp(prefix="lw-callgrind-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        cmd = [
            "valgrind", "--tool=callgrind", f"--zero-before={ZERO}", f"--dump-before={DUMP}",
            f"--callgrind-out-file={out}/cg.%p",
        ] + (["--cache-sim=yes", "--branch-sim=yes"] if args.cache_sim else []) + [
            sys.executable, "-m", "benchmarks.callgrind", "--child", "--loop", loop,
            "--variants", ",".join(variants), "--requests", str(args.requests),
            "--warmup", str(args.warmup), "--concurrency", str(args.concurrency),
            "--repeats", str(args.repeats), "--time-scale", str(args.time_scale),
        ] + (["--light"] if args.light else [])
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        t = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"callgrind run failed:\n{proc.stderr[-3000:]}")
        segments = json.loads(proc.stdout.split("SEGMENTS ", 1)[1])
        counts = callgrind_events(out)
        if len(counts) != len(segments):
            raise RuntimeError(f"{len(counts)} dumps for {len(segments)} segments")
        for seg, count in zip(segments, counts, strict=True):
            seg["instructions"] = count["Ir"]
            if args.cache_sim:
                seg["events"] = {e: count[e] for e in SIMULATED}
        res: dict[str, Any] = {"valgrind_seconds": time.monotonic() - t}
        for workload in dict.fromkeys(s["workload"] for s in segments):
            per_variant: dict[str, Any] = {}
            for name in dict.fromkeys(s["variant"] for s in segments
                                      if s["workload"] == workload):
                mine = [s for s in segments if s["workload"] == workload and s["variant"] == name]
                slopes, probes = [], []
                simulated: dict[str, list[float]] = {e: [] for e in SIMULATED}
                for short, long in zip(mine[0::2], mine[1::2], strict=True):
                    dn = long["n"] - short["n"]
                    slopes.append((long["instructions"] - short["instructions"]) / dn)
                    probes.append((long["probes"] - short["probes"]) / dn)
                    for e in simulated if "events" in long else ():
                        simulated[e].append((long["events"][e] - short["events"][e]) / dn)
                per_variant[name] = {
                    "instructions": statistics.median(slopes),
                    "min": min(slopes), "max": max(slopes),
                    "probes_per_unit": statistics.median(probes),
                    "segments": mine,
                }
                if args.cache_sim:
                    per_variant[name]["simulated"] = {
                        e: statistics.median(v) for e, v in simulated.items()}
            base = per_variant["bare"]["instructions"]
            for v in per_variant.values():
                v["ratio"] = v["instructions"] / base
                v["added"] = v["instructions"] - base
            res[workload] = per_variant
        req = res["request"]
        comps = [req[c]["added"] for c in ("instrumentator", "starlette-exporter") if c in req]
        if comps and "loopwatch" in req:
            res["loopwatch_vs_lightest"] = req["loopwatch"]["added"] / min(comps)
        return res
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=80, help="short segment; long is 2x")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2,
                        help="pairs of segments per variant; the median slope is reported")
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--time-scale", type=float, default=60.0,
                        help="stretch loopwatch's timers by this (the callgrind slowdown)")
    parser.add_argument("--ablations", action="store_true",
                        help="also loopwatch with parts switched off (on asyncio)")
    parser.add_argument("--light", action="store_true",
                        help="requests only: no awaits, callback and task-step workloads")
    parser.add_argument("--cache-sim", action="store_true",
                        help="also simulate caches and branch prediction (slower)")
    parser.add_argument("--keep", help="keep callgrind's dump files under this directory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    parser.add_argument("--variants", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}

    from . import bench_apps
    from ._common import command_line, log, write_result

    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    names = list(bench_apps.VARIANTS)
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()
                                          if k not in ("child", "loop", "variants", "keep")},
                               "loops": {}}
    log(f"callgrind: instructions per request, segments of {args.requests} and "
        f"{2 * args.requests} requests ({args.repeats} pairs), {args.concurrency} in flight")
    loops = args.loops.split(",")
    with concurrent.futures.ThreadPoolExecutor(len(loops)) as pool:
        futures = {
            loop: pool.submit(run_loop, loop, names + (
                list(bench_apps.ABLATIONS) if args.ablations and loop == "asyncio" else []), args)
            for loop in loops
        }
        for loop in loops:
            results["loops"][loop] = futures[loop].result()
    for loop in loops:
        res = results["loops"][loop]
        log(f"\n{loop} ({res['valgrind_seconds']:.0f} s under valgrind):")
        log(f"  {'per request':28} {'instructions':>12} {'range':>17} {'vs bare':>8} "
            f"{'added':>10} {'probes/req':>10}")
        for name, v in res["request"].items():
            log(f"  {name:28} {v['instructions']:12,.0f} {v['min']:8,.0f}-{v['max']:<8,.0f} "
                f"{v['ratio']:8.3f} {v['added']:+10,.0f} {v['probes_per_unit']:10.3f}")
        if "loopwatch_vs_lightest" in res:
            log(f"  loopwatch's added instructions / the lighter competitor's: "
                f"{res['loopwatch_vs_lightest']:.3f}")
        if args.cache_sim:
            base = res["request"]["bare"]["simulated"]
            log(f"  {'simulated, per request':28} " + " ".join(
                f"{SIMULATED_NAMES[e]:>19}" for e in SIMULATED))
            for name, v in res["request"].items():
                sim = v["simulated"]
                log(f"  {name:28} " + " ".join(
                    f"{sim[e]:9,.0f} ({sim[e] / base[e] - 1:+6.1%})" if name != "bare"
                    else f"{sim[e]:19,.0f}" for e in SIMULATED))
        if "awaits10" not in res:
            continue
        a = res["awaits10"]
        a["added_per_await"] = (a["loopwatch"]["added"] - res["request"]["loopwatch"]["added"]) / 10
        log(f"  request awaiting 10x: bare {a['bare']['instructions']:,.0f}, loopwatch "
            f"{a['loopwatch']['instructions']:,.0f} ({a['loopwatch']['added']:+,.0f}; "
            f"{a['added_per_await']:+,.0f} per extra await)")
        for w in ("callback", "step"):
            v = res[w]
            log(f"  per {w:8}: bare {v['bare']['instructions']:,.0f}, watched "
                f"{v['monitored']['instructions']:,.0f} ({v['monitored']['added']:+,.0f}; "
                f"probes per {w}: {v['monitored']['probes_per_unit']:.4f})")
    path = write_result("callgrind_cachesim" if args.cache_sim else "callgrind", results,
                        command_line())
    log(f"\nwritten to {path}")
    return results


if __name__ == "__main__":
    main()
