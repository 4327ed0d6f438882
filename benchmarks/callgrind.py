"""Instructions per request under callgrind: the added work, whatever the machine is doing.

Wall-clock timings on a shared 2-core VM move by ±10 µs from run to run; the number of
instructions the CPU executes for a request does not. Each variant of bench_apps (and, with
``--ablations``, loopwatch with parts switched off) is driven in process exactly as
overhead.py does it, inside one ``valgrind --tool=callgrind`` process per event loop.
Counting is switched on and off around the measured requests: the child calls
``os.getppid()`` (callgrind ``--zero-before=os_getppid``) before them and ``os.getpgrp()``
(``--dump-before=os_getpgrp``) after them. Pairs of segments of n and 2n requests per variant;
their difference divided by n is the per-request count, free of the fixed cost of a segment
(the median over ``--repeats`` pairs; the bare app counts the same every time, loopwatch
varies by a few thousand instructions with how its timers fall). All threads are counted (loopwatch's watchdog too).

Caveat, against loopwatch: under callgrind the program runs ~50x slower while timers keep
real time, so loopwatch's probe (every 10 ms) and watchdog (every 75 ms) fire ~50x more often
per request than they would natively. Their share is reported separately (probes per request).

    python benchmarks/callgrind.py [--requests 100] [--repeats 3] [--loops asyncio,uvloop] [--ablations]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

ZERO, DUMP = "os_getppid", "os_getpgrp"


def child(args: argparse.Namespace) -> None:
    import bench_apps
    from _inprocess import LOOPS, Lifespan, drive, item_path

    import loopwatch

    factories = {**bench_apps.VARIANTS, **bench_apps.ABLATIONS}
    segments: list[dict[str, Any]] = []

    async def main(name: str) -> None:
        app = factories[name]()
        async with Lifespan(app):
            await drive(app, args.warmup, args.concurrency, item_path)
            monitor = loopwatch.get_monitor()
            for n in (args.requests, 2 * args.requests) * args.repeats:
                probes = monitor.lag_count if monitor else 0
                gc.collect()
                os.getppid()  # callgrind: zero the counters
                t = time.perf_counter()
                await drive(app, n, args.concurrency, item_path)
                elapsed = time.perf_counter() - t
                os.getpgrp()  # callgrind: dump the counters
                segments.append({
                    "variant": name, "requests": n, "seconds": elapsed,
                    "probes": (monitor.lag_count - probes) if monitor else 0,
                })

    for name in args.variants.split(","):
        with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
            runner.run(main(name))
    print("SEGMENTS " + json.dumps(segments), flush=True)


def instructions(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise RuntimeError(f"no summary in {path}")


def run_loop(loop: str, variants: list[str], args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.keep or tempfile.mkdtemp(prefix="loopwatch-callgrind-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        cmd = [
            "valgrind", "--tool=callgrind", f"--zero-before={ZERO}", f"--dump-before={DUMP}",
            f"--callgrind-out-file={out}/cg.%p",
            sys.executable, os.path.abspath(__file__), "--child", "--loop", loop,
            "--variants", ",".join(variants), "--requests", str(args.requests),
            "--warmup", str(args.warmup), "--concurrency", str(args.concurrency),
            "--repeats", str(args.repeats),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        t = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"callgrind run failed:\n{proc.stderr[-3000:]}")
        segments = json.loads(proc.stdout.split("SEGMENTS ", 1)[1])
        dumps = sorted(out.glob("cg.*.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
        if len(dumps) != len(segments):
            raise RuntimeError(f"{len(dumps)} dumps for {len(segments)} segments")
        for seg, dump in zip(segments, dumps, strict=True):
            seg["instructions"] = instructions(dump)
        per_variant: dict[str, Any] = {}
        for name in variants:
            mine = [s for s in segments if s["variant"] == name]
            slopes, probes = [], []
            for short, long in zip(mine[0::2], mine[1::2], strict=True):
                dn = long["requests"] - short["requests"]
                slopes.append((long["instructions"] - short["instructions"]) / dn)
                probes.append((long["probes"] - short["probes"]) / dn)
            per_variant[name] = {
                "instructions_per_request": statistics.median(slopes),
                "min": min(slopes), "max": max(slopes),
                "probes_per_request": statistics.median(probes),
                "segments": mine,
            }
        return {"variants": per_variant, "valgrind_seconds": time.monotonic() - t}
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3,
                        help="pairs of segments per variant; the median slope is reported")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--keep", help="keep callgrind's dump files in this directory")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    parser.add_argument("--variants", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}

    import bench_apps
    from _common import command_line, log, write_result

    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    names = list(bench_apps.VARIANTS)
    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items()
                                          if k not in ("child", "loop", "variants", "keep")},
                               "loops": {}}
    log(f"callgrind: instructions per request, {args.requests} and {2 * args.requests} "
        f"request segments, {args.concurrency} in flight")
    for loop in args.loops.split(","):
        variants = names + (list(bench_apps.ABLATIONS) if args.ablations and loop == "asyncio"
                            else [])
        res = run_loop(loop, variants, args)
        results["loops"][loop] = res
        base = res["variants"]["bare"]["instructions_per_request"]
        log(f"\n{loop} ({res['valgrind_seconds']:.0f} s under valgrind):")
        log(f"  {'variant':26} {'instr/request':>14} {'range':>17} {'vs bare':>8} "
            f"{'added':>10} {'probes/req':>10}")
        for name in variants:
            v = res["variants"][name]
            ipr = v["instructions_per_request"]
            v["ratio"] = ipr / base
            v["added"] = ipr - base
            log(f"  {name:26} {ipr:14,.0f} {v['min']:8,.0f}-{v['max']:<8,.0f} "
                f"{ipr / base:8.3f} {ipr - base:+10,.0f} {v['probes_per_request']:10.3f}")
        comps = [res["variants"][c]["added"] for c in ("instrumentator", "starlette-exporter")]
        res["loopwatch_vs_lightest"] = res["variants"]["loopwatch"]["added"] / min(comps)
        log(f"  loopwatch's added instructions / the lighter competitor's: "
            f"{res['loopwatch_vs_lightest']:.3f}")
    path = write_result("callgrind", results, command_line())
    log(f"\nwritten to {path}")
    return results


if __name__ == "__main__":
    main()
