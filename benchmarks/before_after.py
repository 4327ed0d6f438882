"""Before and after a change, side by side in one run: per-request CPU (interleaved.py) and
instructions (callgrind.py) of loopwatch vs bare, for two checkouts.

    python -m benchmarks.before_after --before OLD_CHECKOUT --before-python ITS_PYTHON \\
        [--pairs 5] [--rounds 80] [--loops asyncio,uvloop] [--no-callgrind]

The earlier checkout needs its own interpreter with its dependencies and its extension built
in place (``python setup.py build_ext --inplace``). The two run in turns (before, after,
before, ...): each turn is a process of ``interleaved.py`` that measures loopwatch against
bare FastAPI in that checkout; the figure is the median over turns of each one's median.
Instruction counts do not depend on the machine's load and are counted once each. Writes
benchmarks/out/before_after.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._common import ROOT, command_line, log, write_result


def run_in(tree: Path, python: str, script: str, args: list[str]) -> dict[str, Any]:
    """Run the benchmark ``script`` of ``tree`` with ``python`` (as ``-m benchmarks.<name>``, or
    by its path in older checkouts, where benchmarks/ was not a package); its results file
    (which it writes under benchmarks/out/, or benchmarks/results/ in older checkouts)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("LOOPWATCH_PURE_PYTHON", None)
    name = script.removesuffix(".py")
    how = (["-m", f"benchmarks.{name}"] if (tree / "benchmarks" / "__init__.py").exists()
           else [str(tree / "benchmarks" / script)])
    subprocess.run([python, *how, *args], cwd=tree, env=env, check=True, capture_output=True,
                   text=True)
    for folder in ("out", "results"):
        path = tree / "benchmarks" / folder / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
    raise FileNotFoundError(f"{script} in {tree} wrote no results")


def cpu_ratio(result: dict[str, Any], loop: str) -> float:
    return float(result["loops"][loop]["loopwatch"]["relative"]["median"])


def instructions(result: dict[str, Any], loop: str) -> tuple[float, float]:
    per = result["loops"][loop]["request"]
    bare, watched = per["bare"]["instructions"], per["loopwatch"]["instructions"]
    return watched - bare, watched / bare - 1.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--before-python", required=True)
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--after-python", default=sys.executable)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--no-callgrind", action="store_true")
    args = parser.parse_args()
    loops = args.loops.split(",")
    sides = {"before": (args.before, args.before_python), "after": (args.after, args.after_python)}
    cpu: dict[str, dict[str, list[float]]] = {s: {lp: [] for lp in loops} for s in sides}
    for i in range(args.pairs):
        for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
            tree, python = sides[side]
            result = run_in(tree, python, "interleaved.py", [
                "--rounds", str(args.rounds), "--variants", "bare,loopwatch",
                "--loops", ",".join(loops)])
            for lp in loops:
                cpu[side][lp].append(cpu_ratio(result, lp))
            log(f"turn {i + 1}/{args.pairs} {side}: " + ", ".join(
                f"{lp} {cpu[side][lp][-1] * 100:+.1f} %" for lp in loops))
    instr: dict[str, dict[str, tuple[float, float]]] = {}
    if not args.no_callgrind:
        for side, (tree, python) in sides.items():
            result = run_in(tree, python, "callgrind.py", ["--light", "--loops", ",".join(loops)])
            instr[side] = {lp: instructions(result, lp) for lp in loops}
    log("\nloopwatch vs bare FastAPI, per request (median over turns of each turn's median)")
    log(f"{'':22}" + "".join(f"{lp + ' before':>16}{lp + ' after':>15}" for lp in loops))
    log(f"{'CPU time':22}" + "".join(
        f"{statistics.median(cpu['before'][lp]) * 100:+15.1f}%"
        f"{statistics.median(cpu['after'][lp]) * 100:+14.1f}%" for lp in loops))
    if instr:
        log(f"{'instructions':22}" + "".join(
            f"{instr['before'][lp][1] * 100:+15.1f}%{instr['after'][lp][1] * 100:+14.1f}%"
            for lp in loops))
        log(f"{'  added, per request':22}" + "".join(
            f"{instr['before'][lp][0]:+16,.0f}{instr['after'][lp][0]:+15,.0f}" for lp in loops))
    path = write_result("before_after", {
        "before": str(args.before), "after": str(args.after), "pairs": args.pairs,
        "rounds": args.rounds, "cpu": cpu,
        "instructions": {s: {lp: {"added": v[0], "ratio": v[1]} for lp, v in d.items()}
                         for s, d in instr.items()},
    }, command_line())
    log(f"written to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
