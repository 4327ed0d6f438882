"""Are loopwatch's numbers true? Injected blocks, attribution, false alarms, the exact line.

1. **Injected blocks** (in process, asyncio and uvloop): a task blocks the loop for 5, 20, 50,
   100, 200 and 1,000 ms with ``time.sleep`` (and with a CPU-bound Python loop), under a
   monitor with ``block_threshold=0.004`` and ``probe_interval=0.002`` so that each one is an
   event. The reported duration is compared with the injected one and with the really
   elapsed time of the injected call (the OS may oversleep), and the reported line with the
   line of the blocking call.
2. **Attribution** (a real uvicorn server, ``benchmarks.bench_apps:accuracy``, threshold
   20 ms): clients hammer non-blocking routes while others call blocking routes
   (``time.sleep``, CPU-bound, a block after an ``await``, a block inside an
   ``asyncio.gather`` child) for 30-60 ms each.
   The server records every real block (route, wall-clock start and end); each block event is
   matched to the real block it overlaps. Precision: events naming the route that really
   blocked / all events. Recall: real blocks reported with their route / all real blocks.
3. **False block events under saturation**: wrk saturates the same server with non-blocking
   routes only; every block event counted is a false one.

    python -m benchmarks.accuracy [--reps 5] [--mixed-seconds 20] [--saturate-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import random
import statistics
import time
from typing import Any

from harness.servers import free_port

from ._common import (
    command_line,
    http_get,
    log,
    server,
    bench_uvicorn_args,
    write_result,
    wrk,
)
from ._inprocess import LOOPS

import loopwatch

SIZES_MS = (5, 20, 50, 100, 200, 1000)


def tolerance(injected: float) -> float:
    """The target: within max(2 ms, 2 %) of the injected duration (for blocks ≥ 20 ms)."""
    return max(0.002, 0.02 * injected)


# -- 1. injected blocks -------------------------------------------------------------------

def _sleep_block(seconds: float) -> float:
    t0 = time.perf_counter()
    time.sleep(seconds)  # INJECT:sleep
    return time.perf_counter() - t0


def _cpu_block(seconds: float) -> float:
    t0 = time.perf_counter()
    deadline = t0 + seconds
    x = 0
    while time.perf_counter() < deadline:  # INJECT:cpu
        x += 1  # INJECT:cpu
    return time.perf_counter() - t0


def _lines(fn: Any, marker: str) -> set[str]:
    source, first = inspect.getsourcelines(fn)
    path = inspect.getsourcefile(fn)
    return {f"{path}:{first + i}" for i, text in enumerate(source) if marker in text}


EXPECTED = {"sleep": _lines(_sleep_block, "INJECT:sleep"), "cpu": _lines(_cpu_block, "INJECT:cpu")}
BLOCKERS = {"sleep": _sleep_block, "cpu": _cpu_block}


def injected(loop_kind: str, reps: dict[str, int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    async def main() -> None:
        monitor = loopwatch.Monitor(block_threshold=0.004, probe_interval=0.002,
                                    log_blocks=False, ring_size=1000).start()
        await asyncio.sleep(0.05)  # the first probe starts the watchdog

        async def victim(kind: str, seconds: float) -> float:
            await asyncio.sleep(0.005)
            return BLOCKERS[kind](seconds)

        try:
            for kind, n in reps.items():
                for _ in range(n):
                    for ms in SIZES_MS:
                        before = monitor.block_count
                        # A task made after start: on uvloop only those are timed.
                        elapsed = await asyncio.create_task(victim(kind, ms / 1000))
                        await asyncio.sleep(0.02)  # let the watchdog finish its sample
                        events = list(monitor.blocks)[len(monitor.blocks) -
                                                      (monitor.block_count - before):]
                        ours = max(events, key=lambda e: e.duration, default=None)
                        rows.append({
                            "loop": loop_kind, "kind": kind, "injected": ms / 1000,
                            "elapsed": elapsed, "events": len(events),
                            "reported": ours.duration if ours else None,
                            "location": ours.location if ours else None,
                            "exact_line": bool(ours and ours.location in EXPECTED[kind]),
                            "stack_status": ours.stack_status if ours else None,
                            "timed": ours.timed if ours else None,
                        })
        finally:
            monitor.stop()

    with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
        runner.run(main())
    return rows


def summarise_injected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for loop in dict.fromkeys(r["loop"] for r in rows):
        for kind in dict.fromkeys(r["kind"] for r in rows):
            for ms in SIZES_MS:
                rs = [r for r in rows if r["loop"] == loop and r["kind"] == kind
                      and r["injected"] == ms / 1000]
                if not rs:
                    continue
                got = [r for r in rs if r["reported"] is not None]
                err_inj = [r["reported"] - r["injected"] for r in got]
                err_el = [r["reported"] - r["elapsed"] for r in got]
                tol = tolerance(ms / 1000)
                out.append({
                    "loop": loop, "kind": kind, "injected_ms": ms, "n": len(rs),
                    "detected": len(got),
                    "reported_ms_median": statistics.median(r["reported"] for r in got) * 1e3
                    if got else None,
                    "elapsed_ms_median": statistics.median(r["elapsed"] for r in rs) * 1e3,
                    "error_vs_injected_ms_median": statistics.median(err_inj) * 1e3
                    if got else None,
                    "error_vs_injected_ms_max_abs": max(map(abs, err_inj)) * 1e3 if got else None,
                    "error_vs_elapsed_ms_median": statistics.median(err_el) * 1e3
                    if got else None,
                    "error_vs_elapsed_ms_max_abs": max(map(abs, err_el)) * 1e3 if got else None,
                    "tolerance_ms": tol * 1e3,
                    "within_tolerance": sum(abs(e) <= tol for e in err_inj),
                    "exact_line": sum(r["exact_line"] for r in rs),
                    "extra_events": sum(max(0, r["events"] - 1) for r in rs),
                })
    return out


# -- 2. attribution under mixed load, 3. saturation -----------------------------------------

GC_ROUTE = "<gc>"  # loopwatch's route for the garbage collector's blocks
BLOCKING = ("/block/sleep", "/block/cpu", "/block/after-await", "/block/gather-child")
NON_BLOCKING = ("/ok/json", "/ok/await", "/ok/fanout", "/ok/thread")


async def mixed_load(port: int, seconds: float, ok_clients: int, block_clients: int,
                     seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    stop = time.monotonic() + seconds
    counts = {"ok": 0, "blocking": 0, "errors": 0}

    async def ok_client() -> None:
        while time.monotonic() < stop:
            try:
                status, _ = await http_get(port, rng.choice(NON_BLOCKING))
                counts["ok" if status == 200 else "errors"] += 1
            except (OSError, asyncio.TimeoutError):
                counts["errors"] += 1

    async def block_client() -> None:
        while time.monotonic() < stop:
            path = f"{rng.choice(BLOCKING)}?ms={rng.uniform(30, 60):.1f}"
            try:
                status, _ = await http_get(port, path)
                counts["blocking" if status == 200 else "errors"] += 1
            except (OSError, asyncio.TimeoutError):
                counts["errors"] += 1
            await asyncio.sleep(rng.uniform(0.0, 0.05))

    await asyncio.gather(*(ok_client() for _ in range(ok_clients)),
                         *(block_client() for _ in range(block_clients)))
    return counts


async def fetch_json(port: int, path: str) -> dict[str, Any]:
    status, body = await http_get(port, path)
    if status != 200:
        raise RuntimeError(f"GET {path}: {status}")
    return json.loads(body)  # type: ignore[no-any-return]


def match(events: list[dict[str, Any]], truth: list[dict[str, Any]], lines: dict[str, Any],
          ) -> dict[str, Any]:
    """Pair each block event with the real block its time span overlaps most.

    Events loopwatch attributes to the garbage collector (route ``<gc>``) are counted apart:
    they name no route, so they are neither right nor wrong about one."""
    gc_events = [e for e in events if e["route"] == GC_ROUTE]
    events = [e for e in events if e["route"] != GC_ROUTE]
    matched_truth: dict[int, dict[str, Any]] = {}
    per_route: dict[str, dict[str, int]] = {
        r: {"real": 0, "reported_right": 0, "events_naming": 0, "events_right": 0,
            "exact_line": 0} for r in BLOCKING}
    false_events = []
    wrong_route = []
    line_misses = []
    for t in truth:
        per_route[t["route"]]["real"] += 1
    for ev in events:
        start, end = ev["time"], ev["time"] + ev["duration"]
        best, overlap = None, 0.0
        for i, t in enumerate(truth):
            o = min(end, t["end"]) - max(start, t["start"])
            if o > overlap:
                best, overlap = i, o
        if ev["route"] in per_route:
            per_route[ev["route"]]["events_naming"] += 1
        if best is None:
            false_events.append(ev)
            continue
        t = truth[best]
        if ev["route"] == t["route"]:
            per_route[t["route"]]["events_right"] += 1
            if best not in matched_truth:
                matched_truth[best] = ev
                per_route[t["route"]]["reported_right"] += 1
                if _exact(ev["location"], t, lines):
                    per_route[t["route"]]["exact_line"] += 1
                else:
                    line_misses.append({"route": t["route"], "expected": t["line"],
                                        "location": ev["location"],
                                        "stack_status": ev["stack_status"],
                                        "duration": ev["duration"]})
        else:
            wrong_route.append({"event_route": ev["route"], "real_route": t["route"]})
    n_events = len(events)
    right = sum(p["events_right"] for p in per_route.values())
    real = len(truth)
    reported = len(matched_truth)
    return {
        "events": n_events, "real_blocks": real,
        "precision": right / n_events if n_events else None,
        "recall": reported / real if real else None,
        "exact_line": sum(p["exact_line"] for p in per_route.values()),
        "exact_line_rate": (sum(p["exact_line"] for p in per_route.values()) / reported
                            if reported else None),
        "false_events": [{k: e[k] for k in ("route", "duration", "location", "stack_status")}
                         for e in false_events],
        "wrong_route": wrong_route,
        "gc_events": [{k: e[k] for k in ("duration", "gc_seconds")} for e in gc_events],
        "line_misses": line_misses,
        "per_route": per_route,
    }


def _exact(location: str | None, truth: dict[str, Any], lines: dict[str, Any]) -> bool:
    if location is None:
        return False
    if location == truth["line"]:
        return True
    if truth["route"] == "/block/cpu":  # sampled where it runs: inside _busy
        path, _, line = location.rpartition(":")
        return (path == truth["line"].rpartition(":")[0]
                and lines["cpu_body_first"] <= int(line) <= lines["cpu_body_last"])
    return False


def served(loop: str, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    env = {"LOOPWATCH_BLOCK_THRESHOLD": str(args.threshold), "LOOPWATCH_RING_SIZE": "10000",
           "LOOPWATCH_LOG_BLOCKS": "false"}
    out: dict[str, Any] = {"threshold": args.threshold}
    app = bench_uvicorn_args("benchmarks.bench_apps:accuracy", port, loop)
    with server(app, port, env, ready="/ok/json"):
        # Warm up, then forget what the warm-up did.
        asyncio.run(mixed_load(port, 1.0, 2, 1, seed=0))
        before = asyncio.run(fetch_json(port, "/loopwatch/events/?limit=1"))["block_count"]
        asyncio.run(fetch_json(port, "/truth/reset"))
        t0 = time.time()
        load = asyncio.run(mixed_load(port, args.mixed_seconds, args.ok_clients,
                                      args.block_clients, seed=1))
        time.sleep(0.2)
        truth = asyncio.run(fetch_json(port, "/truth"))
        evs = asyncio.run(fetch_json(port, "/loopwatch/events/?limit=1000"))
        n_new = evs["block_count"] - before
        events = [e for e in evs["events"] if e["time"] >= t0 - 1][-n_new:] if n_new else []
        mixed = match(events, truth["blocks"], truth["lines"])
        mixed["load"] = load
        mixed["events_lost_to_the_api_limit"] = max(0, n_new - len(events))
        out["mixed"] = mixed
        log(f"  {loop:8} mixed load {args.mixed_seconds:g} s: {load['ok']} non-blocking and "
            f"{load['blocking']} blocking requests; {mixed['real_blocks']} real blocks, "
            f"{mixed['events']} events; precision {_pct(mixed['precision'])}, recall "
            f"{_pct(mixed['recall'])}, exact line {_pct(mixed['exact_line_rate'])}")

        # 3. saturation with non-blocking routes only
        before = asyncio.run(fetch_json(port, "/loopwatch/events/?limit=1"))["block_count"]
        t0 = time.time()
        res = wrk(port, "/ok/json", args.saturate_seconds, threads=2,
                  connections=args.saturate_connections, paths=NON_BLOCKING)
        evs = asyncio.run(fetch_json(port, "/loopwatch/events/?limit=1000"))
        n_new = evs["block_count"] - before
        new = [e for e in evs["events"] if e["time"] >= t0 - 1][-n_new:] if n_new else []
        # A block the collector caused is a real stall, reported as the collector's: not a
        # false event (it names no route), but counted and shown.
        false = [e for e in new if e["route"] != GC_ROUTE]
        gc_events = [e for e in new if e["route"] == GC_ROUTE]
        out["saturation"] = {
            "seconds": args.saturate_seconds, "connections": args.saturate_connections,
            "requests": res["requests"], "rps": res["rps"], "errors": res["errors"],
            "latency_p99": res["latency_p99"],
            "false_events": len(false),
            "false_events_over_100ms": sum(e["duration"] >= 0.1 for e in false),
            "events": [{k: e[k] for k in ("route", "duration", "location", "stack_status")}
                       for e in false],
            "gc_events": [{k: e[k] for k in ("duration", "gc_seconds")} for e in gc_events],
            "events_lost_to_the_api_limit": max(0, n_new - len(new)),
        }
        log(f"  {loop:8} saturation {args.saturate_seconds:g} s, {res['rps']:.0f} req/s "
            f"(p99 {res['latency_p99'] * 1e3:.1f} ms): {len(false)} block events naming a "
            f"route or none, {len(gc_events)} the garbage collector's")
    return out


def _num(x: float | None, spec: str) -> str:
    """A number, or n/a (no event: e.g. a near-threshold CPU block the OS preempted for
    so long that its code held the loop for less than the threshold)."""
    width = int(spec.lstrip("+").split(".")[0])
    return format(x, spec) if x is not None else "n/a".rjust(width)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per injected size")
    parser.add_argument("--cpu-reps", type=int, default=2, help="same, CPU-bound blocks")
    parser.add_argument("--mixed-seconds", type=float, default=20.0)
    parser.add_argument("--ok-clients", type=int, default=6)
    parser.add_argument("--block-clients", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.02,
                        help="block_threshold of the served test (seconds)")
    parser.add_argument("--saturate-seconds", type=float, default=10.0)
    parser.add_argument("--saturate-connections", type=int, default=100)
    parser.add_argument("--loops", default="asyncio,uvloop")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"config": vars(args), "injected": {}, "served": {}}

    log("1. injected blocks (threshold 4 ms, probe 2 ms): reported vs injected")
    rows: list[dict[str, Any]] = []
    for loop in args.loops.split(","):
        rows += injected(loop, {"sleep": args.reps, "cpu": args.cpu_reps})
    summary_rows = summarise_injected(rows)
    results["injected"] = {"rows": rows, "summary": summary_rows}
    log(f"  {'loop':8} {'kind':5} {'inj ms':>7} {'n':>3} {'reported':>9} {'elapsed':>9} "
        f"{'err/inj':>8} {'max|err|':>8} {'err/elapsed':>11} {'ok':>5} {'line':>5}")
    for s in summary_rows:
        log(f"  {s['loop']:8} {s['kind']:5} {s['injected_ms']:7} {s['n']:3} "
            f"{_num(s['reported_ms_median'], '9.2f')} {s['elapsed_ms_median']:9.2f} "
            f"{_num(s['error_vs_injected_ms_median'], '+8.2f')} "
            f"{_num(s['error_vs_injected_ms_max_abs'], '8.2f')} "
            f"{_num(s['error_vs_elapsed_ms_median'], '+11.3f')} "
            f"{s['within_tolerance']:>3}/{s['n']} {s['exact_line']:>3}/{s['n']}"
            + (f"  (detected {s['detected']}/{s['n']})" if s['detected'] < s['n'] else ""))

    log(f"\n2./3. served by uvicorn, threshold {args.threshold * 1e3:g} ms")
    for loop in args.loops.split(","):
        results["served"][loop] = served(loop, args)
    path = write_result("accuracy", results, command_line())
    log(f"\nwritten to {path}")
    return results


if __name__ == "__main__":
    main()
