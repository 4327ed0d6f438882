"""Run every benchmark and write the performance report.

    python -m benchmarks.run_all [--quick] [--only overhead,accuracy,...] [--no-report]

Writes benchmarks/out/*.json, and (report.py) benchmarks/out/img/*.png and the figures
section of benchmarks/out/performance.md: nothing tracked (``report.py --docs`` writes into
docs/, to commit). The full run takes ~30 minutes on a 2-core machine, ``--quick`` ~5.

Timing-sensitive benchmarks run one after another with nothing else of ours running:
in-process overhead, wrk, monitor cost, accuracy, the headline. Then those whose results do
not depend on load run side by side: callgrind and the breakdown (instruction counts) and the
memory run (RSS). Each benchmark is its own Python process.

valgrind is needed for the callgrind benchmarks (``apt-get install valgrind``) and wrk for
the end-to-end one.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import time
from typing import Any

from ._common import ROOT, command, loadavg, log, write_result

FULL: dict[str, list[str]] = {
    "overhead": ["--requests", "3000", "--rounds", "25"],
    "wrk_overhead": ["--rounds", "7", "--seconds", "10"],
    "monitor_cost": ["--rounds", "5", "--idle-seconds", "3"],
    "accuracy": ["--reps", "5", "--cpu-reps", "2", "--mixed-seconds", "20",
                 "--saturate-seconds", "10"],
    "headline": [],
    "callgrind": ["--requests", "80", "--repeats", "2", "--ablations"],
    "memory": ["--requests", "1000000", "--every", "100000"],
    "breakdown": ["--n", "4000"],
    "callgrind_server": ["--requests", "100", "--repeats", "2"],
}
QUICK: dict[str, list[str]] = {
    "overhead": ["--requests", "2000", "--rounds", "5"],
    "wrk_overhead": ["--rounds", "1", "--seconds", "3", "--warmup", "1"],
    "monitor_cost": ["--rounds", "2", "--idle-seconds", "1", "--requests", "800",
                     "--callbacks", "100000"],
    "accuracy": ["--reps", "1", "--cpu-reps", "1", "--mixed-seconds", "5",
                 "--saturate-seconds", "3"],
    "headline": ["--cap-seconds", "4", "--runs", "3"],
    "callgrind": ["--requests", "30", "--repeats", "1", "--loops", "asyncio", "--light"],
    "memory": ["--requests", "100000", "--every", "10000"],
    "breakdown": ["--n", "1000"],
    "callgrind_server": ["--requests", "40", "--repeats", "1", "--warmup", "50",
                         "--variants", "bare,loopwatch", "--loops", "asyncio"],
}
SEQUENTIAL = ("overhead", "wrk_overhead", "monitor_cost", "accuracy", "headline")
PARALLEL = ("callgrind", "callgrind_server", "memory", "breakdown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds: ~5 minutes")
    parser.add_argument("--only", help="comma-separated benchmarks to run (default: all)")
    parser.add_argument("--no-report", action="store_true")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    only = set(args.only.split(",")) if args.only else set(plan)
    unknown = only - set(plan)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")

    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    steps: list[dict[str, Any]] = []
    failures: list[str] = []
    log(f"loopwatch benchmarks ({'quick' if args.quick else 'full'}), load average "
        f"{loadavg()}")

    def launch(name: str) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
        argv = plan[name]
        step = {"name": name, "command": command(name, argv), "loadavg_before": loadavg(),
                "started": time.monotonic()}
        log(f"\n=== {step['command']}  (load {step['loadavg_before']})")
        proc = subprocess.Popen([sys.executable, "-m", f"benchmarks.{name}", *argv], cwd=ROOT)
        return proc, step

    def finish(proc: subprocess.Popen[bytes], step: dict[str, Any]) -> None:
        rc = proc.wait()
        step["seconds"] = round(time.monotonic() - step.pop("started"), 1)
        step["returncode"] = rc
        step["loadavg_after"] = loadavg()
        steps.append(step)
        log(f"=== {step['name']}: {'ok' if rc == 0 else f'FAILED ({rc})'} in "
            f"{step['seconds']:.0f} s")
        if rc != 0:
            failures.append(step["name"])

    for name in SEQUENTIAL:
        if name in only:
            finish(*launch(name))
    running = [launch(name) for name in PARALLEL if name in only]
    for proc, step in running:
        finish(proc, step)

    if only == set(plan):
        run = {
            "mode": "quick" if args.quick else "full",
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "seconds": round(time.monotonic() - t0, 1),
            "loadavg_end": loadavg(),
            "steps": steps,
            "commands": {s["name"]: s["command"] for s in steps},
            "failures": failures,
        }
        write_result("run_all", run, "python -m benchmarks.run_all" +
                     (" --quick" if args.quick else ""))
    else:
        log("\n(--only: benchmarks/out/run_all.json left as it was)")
    if not args.no_report:
        subprocess.run([sys.executable, "-m", "benchmarks.report"], cwd=ROOT, check=True)
    log(f"\ndone in {(time.monotonic() - t0) / 60:.1f} min"
        + (f"; FAILED: {', '.join(failures)}" if failures else ""))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
