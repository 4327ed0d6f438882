"""End-to-end overhead: wrk against uvicorn serving each variant of the same route.

Each variant (bare, loopwatch, prometheus-fastapi-instrumentator, starlette-exporter) is served
by its own uvicorn process (one worker, ``--http httptools``, access log off), on asyncio and
on uvloop. All servers of a loop run at once, idle but for the one under test; wrk (2 threads,
50 connections) hits them in turn, the order reversed every other round. Per round: requests
per second, p50 and p99 latency, and the server's own CPU time per request (from
/proc/<pid>/stat, which is less sensitive to wrk sharing the two cores). Medians over rounds,
ratios to bare.

    python -m benchmarks.wrk_overhead [--rounds 3] [--seconds 10] [--loops asyncio,uvloop]
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

from harness.servers import free_port

from ._common import (
    command_line,
    log,
    server,
    summary,
    bench_uvicorn_args,
    write_result,
    wrk,
)
from .bench_apps import UVICORN_FACTORIES

PATH = "/items/1"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def run_loop(loop: str, args: argparse.Namespace) -> dict[str, Any]:
    names = list(UVICORN_FACTORIES)
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with contextlib.ExitStack() as stack:
        procs, ports = {}, {}
        for name in names:
            ports[name] = free_port()
            procs[name] = stack.enter_context(
                server(bench_uvicorn_args(UVICORN_FACTORIES[name], ports[name], loop), ports[name],
                       ready=PATH))
        for name in names:  # warm-up: imports, specialisation, connection setup
            wrk(ports[name], PATH, args.warmup)
        for r in range(args.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                pid = procs[name].pid
                cpu0 = cpu_seconds(pid)
                res = wrk(ports[name], PATH, args.seconds, args.threads, args.connections)
                res["server_cpu_us_per_request"] = (
                    (cpu_seconds(pid) - cpu0) / max(res["requests"], 1) * 1e6)
                rounds[name].append(res)
                log(f"  {loop:8} round {r + 1} {name:20} {res['rps']:9.0f} req/s  "
                    f"p50 {res['latency_p50'] * 1e3:6.2f} ms  p99 {res['latency_p99'] * 1e3:6.2f}"
                    f" ms  server CPU {res['server_cpu_us_per_request']:6.1f} µs/req"
                    + (f"  errors {res['errors']}" if res["errors"] else ""))
    out: dict[str, Any] = {}
    for name in names:
        rs = rounds[name]
        out[name] = {key: summary([x[key] for x in rs]) for key in
                     ("rps", "latency_p50", "latency_p99", "server_cpu_us_per_request")}
        out[name]["errors"] = sum(x["errors"] for x in rs)
        out[name]["rounds"] = rs
    base = out["bare"]
    for name in names:
        v = out[name]
        v["rps_ratio"] = v["rps"]["median"] / base["rps"]["median"]
        v["p50_ratio"] = v["latency_p50"]["median"] / base["latency_p50"]["median"]
        v["p99_ratio"] = v["latency_p99"]["median"] / base["latency_p99"]["median"]
        v["cpu_ratio"] = (v["server_cpu_us_per_request"]["median"]
                          / base["server_cpu_us_per_request"]["median"])
        # Per round, the throughput lost to the middleware, relative to bare's in that round.
        v["rps_loss_per_round"] = summary([
            1 - x["rps"] / b["rps"] for x, b in zip(v["rounds"], base["rounds"], strict=True)])
    lw = 1 - out["loopwatch"]["rps_ratio"]
    lightest = min(1 - out[c]["rps_ratio"] for c in ("instrumentator", "starlette-exporter"))
    out["loopwatch_vs_lightest"] = lw / lightest if lightest > 0 else None
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk per server")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--loops", default="asyncio,uvloop")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"config": vars(args), "loops": {}}
    log(f"wrk -t{args.threads} -c{args.connections} -d{args.seconds:g}s against uvicorn "
        f"(1 worker, httptools, no access log), {args.rounds} alternating rounds")
    for loop in args.loops.split(","):
        res = run_loop(loop, args)
        results["loops"][loop] = res
        log(f"\n{loop}: medians  {'req/s':>9} {'vs bare':>8} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'CPU µs/req':>10} {'vs bare':>8}")
        for name in UVICORN_FACTORIES:
            v = res[name]
            log(f"  {name:20} {v['rps']['median']:9.0f} {v['rps_ratio']:8.3f} "
                f"{v['latency_p50']['median'] * 1e3:7.2f} {v['latency_p99']['median'] * 1e3:7.2f}"
                f" {v['server_cpu_us_per_request']['median']:10.1f} {v['cpu_ratio']:8.3f}")
        if res["loopwatch_vs_lightest"] is not None:
            log(f"  loopwatch's throughput loss / the lighter competitor's: "
                f"{res['loopwatch_vs_lightest']:.3f}")
    path = write_result("wrk_overhead", results, command_line())
    log(f"\nwritten to {path}")
    return results


if __name__ == "__main__":
    main()
