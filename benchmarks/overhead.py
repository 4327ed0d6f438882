"""Per-request overhead of loopwatch vs the well-known Prometheus middlewares, in process.

Four variants of the same FastAPI app and route (a small JSON object): bare, loopwatch
(middleware + loop monitor + watchdog + metrics: everything on), prometheus-fastapi-
instrumentator and starlette-exporter. Each is driven in process (no sockets), each request
its own task as under uvicorn, 50 in flight. Variants alternate within each round (the order
reversed every other round) so that drift on a shared machine hits all of them alike; the
report gives medians, interquartile ranges, and the per-round differences to bare.

``--ablations`` adds variants that switch parts of loopwatch off, to see where its cost goes.

    python -m benchmarks.overhead [--requests 3000] [--rounds 15] [--loops asyncio,uvloop]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from . import bench_apps
from ._common import command_line, log, paired_diff, summary, write_result
from ._inprocess import run_app

COMPETITORS = ("instrumentator", "starlette-exporter")


def measure(loop_kind: str, names: list[str], requests: int, rounds: int, concurrency: int,
            driver: str) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """µs per request, (wall-clock, process CPU) samples per variant."""
    factories = {**bench_apps.VARIANTS, **bench_apps.ABLATIONS}
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            w, c = run_app(loop_kind, factories[name], requests, concurrency, driver=driver)
            wall[name].append(w * 1e6)
            cpu[name].append(c * 1e6)
    return wall, cpu


def analyse(samples: dict[str, list[float]]) -> dict[str, Any]:
    base = samples["bare"]
    base_med = statistics.median(base)
    out: dict[str, Any] = {}
    for name, xs in samples.items():
        s = summary(xs)
        s["ratio"] = s["median"] / base_med
        s["added"] = paired_diff(base, xs)
        out[name] = s
    # Per round: loopwatch's added time over the lighter competitor's added time.
    if all(n in samples for n in ("loopwatch", *COMPETITORS)):
        per_round = []
        for i, b in enumerate(base):
            lightest = min(samples[c][i] for c in COMPETITORS) - b
            per_round.append((samples["loopwatch"][i] - b) / lightest)
        lw_added = out["loopwatch"]["added"]["median"]
        lightest_added = min(out[c]["added"]["median"] for c in COMPETITORS)
        out["loopwatch_vs_lightest"] = {
            "of_medians": lw_added / lightest_added,
            "per_round": summary(per_round),
            "lightest": min(COMPETITORS, key=lambda c: out[c]["added"]["median"]),
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000, help="per sample")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--driver", choices=("task", "inline"), default="task")
    parser.add_argument("--ablations", action="store_true",
                        help="also run loopwatch with parts switched off")
    parser.add_argument("--name", default="overhead", help="benchmarks/out/<name>.json")
    args = parser.parse_args(argv)

    names = list(bench_apps.VARIANTS)
    if args.ablations:
        names += list(bench_apps.ABLATIONS)
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "name"}, "loops": {},
    }
    log(f"In-process per-request cost: {args.requests} requests x {args.rounds} alternating "
        f"rounds, {args.concurrency} in flight, driver={args.driver}")
    for loop_kind in args.loops.split(","):
        wall, cpu = measure(loop_kind, names, args.requests, args.rounds, args.concurrency,
                            args.driver)
        results["loops"][loop_kind] = {"wall": analyse(wall), "cpu": analyse(cpu)}
        for clock in ("cpu", "wall"):
            res = results["loops"][loop_kind][clock]
            log(f"\n{loop_kind}, {clock} µs/request:")
            log(f"  {'variant':26} {'median':>8} {'IQR':>6} {'vs bare':>8} {'added (IQR)':>16}")
            for name in names:
                s = res[name]
                log(f"  {name:26} {s['median']:8.1f} {s['iqr']:6.1f} {s['ratio']:8.3f} "
                    f"{s['added']['median']:+9.1f} ({s['added']['iqr']:4.1f})")
            if "loopwatch_vs_lightest" in res:
                v = res["loopwatch_vs_lightest"]
                log(f"  loopwatch's added time / {v['lightest']}'s: {v['of_medians']:.3f} "
                    f"(per round: median {v['per_round']['median']:.3f})")
    path = write_result(args.name, results, command_line())
    log(f"\nwritten to {path}")
    return results


if __name__ == "__main__":
    main()
