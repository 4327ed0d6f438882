"""What sending loopwatch's measurements through OpenTelemetry costs per request, side by side
with Prometheus only, in one process (interleaved.py's method: short alternating batches,
main-thread CPU time, medians over rounds).

    python -m benchmarks.otel_cost [--batch 300] [--rounds 200] [--loops asyncio,uvloop]

Variants: bare FastAPI; loopwatch (Prometheus only); loopwatch with ``meter_provider=`` the
OpenTelemetry API's no-op provider (loopwatch's own part of the export: keeping each request,
recording in batches); and with an SDK MeterProvider with an in-memory reader (the SDK's own
aggregation too, no exporter). The OpenTelemetry requests are recorded at the monitor's
probes, in batches, on the loop: their cost is in the batch that ran them. Writes
benchmarks/out/otel_cost.json.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from . import interleaved  # (sets the block threshold for paused loops)
from ._common import command_line, log, write_result

VARIANTS = ["bare", "loopwatch", "loopwatch-otel-noop", "loopwatch-otel"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=300, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--loops", default="asyncio,uvloop")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"config": vars(args), "loops": {}}
    log(f"In process, interleaved: {args.batch}-request batches x {args.rounds} rounds, "
        f"{args.concurrency} in flight, main-thread CPU time")
    for loop_kind in args.loops.split(","):
        samples = interleaved.measure(loop_kind, VARIANTS, args.batch, args.rounds,
                                      args.concurrency)
        res = interleaved.analyse(samples)
        otel_vs_prom = [o / p - 1 for o, p in
                        zip(samples["loopwatch-otel"], samples["loopwatch"], strict=True)]
        added = [o - p for o, p in
                 zip(samples["loopwatch-otel"], samples["loopwatch"], strict=True)]
        noop = [o - p for o, p in
                zip(samples["loopwatch-otel-noop"], samples["loopwatch"], strict=True)]
        res["otel_over_prometheus"] = {
            "relative_median": statistics.median(otel_vs_prom),
            "added_us_median": statistics.median(added),
            "loopwatch_part_us_median": statistics.median(noop),
        }
        results["loops"][loop_kind] = res
        log(f"\n{loop_kind}:  {'variant':18} {'µs/req':>8} {'vs bare (median)':>17}")
        for name in VARIANTS:
            v = res[name]
            log(f"  {'':8}{name:18} {v['median_us']:8.1f} {v['relative']['median']:+17.1%}")
        o = res["otel_over_prometheus"]
        log(f"  OpenTelemetry on top of Prometheus: {o['added_us_median']:+.1f} µs per request "
            f"({o['relative_median']:+.1%} over loopwatch with Prometheus only), of which "
            f"loopwatch's own part (no-op provider) {o['loopwatch_part_us_median']:+.1f} µs")
    path = write_result("otel_cost", results, command_line())
    log(f"\nwritten to {path}")
    return results


if __name__ == "__main__":
    main()
