"""Turn the benchmarks' results into figures (PNG) and the figures section of
docs/performance.md (between its BEGIN/END GENERATED markers; the rest is left as is).

    python -m benchmarks.report           # into benchmarks/out/ (performance.md, img/)
    python -m benchmarks.report --docs    # into docs/ itself, to commit

Each result is this checkout's own (benchmarks/out/*.json), else the committed reference
(benchmarks/results/*.json).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ._common import IMG, OUT, ROOT
from ._results import (
    Accuracy,
    Breakdown,
    Callgrind,
    CallgrindServer,
    Headline,
    Machine,
    Memory,
    MonitorCost,
    Overhead,
    Result,
    RunAll,
    WrkOverhead,
    load,
)

DOC = ROOT / "docs" / "performance.md"
#: Where report() writes: benchmarks/out/ unless --docs (set by main()).
TARGET = {"doc": OUT / "performance.md", "img": OUT / "img"}
BEGIN = "<!-- BEGIN GENERATED FIGURES: benchmarks/run_all.py rewrites everything down to END -->"
END = "<!-- END GENERATED FIGURES -->"
VARIANTS = ("bare", "loopwatch", "instrumentator", "starlette-exporter")
LABELS = {"bare": "bare FastAPI", "loopwatch": "loopwatch",
          "instrumentator": "prometheus-fastapi-\ninstrumentator",
          "starlette-exporter": "starlette-exporter"}
NAMES = {"bare": "bare FastAPI", "loopwatch": "loopwatch (everything on)",
         "instrumentator": "prometheus-fastapi-instrumentator",
         "starlette-exporter": "starlette-exporter"}
LOOP_COLORS = {"asyncio": "#4C72B0", "uvloop": "#DD8452"}
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.dpi": 110})


# -- helpers -----------------------------------------------------------------------------

def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x * 100:+.{digits}f} %"


def ok(flag: bool | None) -> str:
    return "n/a" if flag is None else ("**met**" if flag else "**missed**")


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def command_of(res: Result, run: RunAll | None) -> str:
    """How these results were made; flags results older than the last run_all."""
    made = res.machine.time
    if run and made and made < run.started:
        return (f"`{res.command}` (*these results are from an earlier run, {made}, not from "
                f"`{run.command}`*)")
    return f"`{res.command}`"


def save(fig: Any, name: str) -> str:
    img = TARGET["img"]
    img.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(img / name, dpi=110)
    plt.close(fig)
    return f"img/{name}"


def grouped(ax: Any, data: dict[str, dict[str, tuple[float, float, float]]], ylabel: str,
            title: str, fmt: str = "{:.0f}", ratio: bool = True) -> None:
    """Bars per variant, one per loop; data[loop][variant] = (median, low, high)."""
    loops = list(data)
    width = 0.8 / max(1, len(loops))
    for i, loop in enumerate(loops):
        xs, meds, lo, hi = [], [], [], []
        for j, v in enumerate(VARIANTS):
            if v not in data[loop]:
                continue
            m, a, b = data[loop][v]
            xs.append(j + (i - (len(loops) - 1) / 2) * width)
            meds.append(m)
            lo.append(max(0.0, m - a))
            hi.append(max(0.0, b - m))
        bars = ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=loop,
                      color=LOOP_COLORS.get(loop), alpha=0.9)
        base = data[loop].get("bare", (None,))[0]
        for bar, m, up in zip(bars, meds, hi, strict=True):
            text = fmt.format(m)
            if ratio and base:
                text += f"\n×{m / base:.2f}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, m + up),
                        xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7.5)
    ax.set_xticks(range(len(VARIANTS)), [LABELS[v] for v in VARIANTS], fontsize=8.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    ax.margins(y=0.22)
    ax.grid(axis="y", alpha=0.3)


# -- sections ----------------------------------------------------------------------------

def machine_section(run: RunAll | None, any_result: Result | None) -> str:
    m = run.machine if run else any_result.machine if any_result else Machine()
    rows = [
        ("CPU", f"{m.cpu} ({m.cores} cores visible)"),
        ("Python", f"{m.python} ({m.python_build})"),
        ("OS", m.platform),
        ("packages", ", ".join(f"{k} {v}" for k, v in m.packages.items() if v)),
    ]
    if run:
        rows += [
            ("run", f"`{run.command}` ({run.mode}), {run.started} → {run.finished}, "
                    f"{run.seconds / 60:.1f} min"),
            ("load average (1/5/15 min)",
             "; ".join(f"{step.name}: {_la(step.loadavg_before)}"
                       for step in run.steps) + f"; after the run: {_la(run.loadavg_end)}"),
        ]
    return table(("", ""), rows)


def _la(xs: Sequence[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs) if xs else "n/a"


def overhead_section(run: RunAll | None) -> tuple[str, dict[str, Any]]:
    ov, cg, wk = load(Overhead), load(Callgrind), load(WrkOverhead)
    cs = load(CallgrindServer)
    facts: dict[str, Any] = {}
    parts = []
    fig, grid = plt.subplots(2, 2, figsize=(14, 9.5))
    axes = [grid[0][0], grid[1][0], grid[0][1], grid[1][1]]
    rows: list[tuple[str, ...]]
    if ov:
        data = {}
        rows = []
        for loop, res in ov.loops.items():
            cpu, wall = res.cpu.variants, res.wall.variants
            data[loop] = {v: (cpu[v].median, cpu[v].q1, cpu[v].q3) for v in VARIANTS}
            ablations = [n for n in cpu if n not in VARIANTS]
            for n in [*VARIANTS, *ablations]:
                c, w = cpu[n], wall[n]
                rows.append((loop, NAMES[n] if n in VARIANTS else f"*ablation:* {n}",
                             f"{c.median:.1f} ({c.iqr:.1f})",
                             f"{c.added.median:+.1f} ({c.added.iqr:.1f})", f"{c.ratio:.3f}",
                             f"{w.median:.1f} ({w.iqr:.1f})", f"{w.ratio:.3f}"))
            # the paired estimate: median of the per-round differences over the bare median
            facts[f"inproc/{loop}/ratio"] = cpu["loopwatch"].added.median / cpu["bare"].median
            if res.cpu.loopwatch_vs_lightest:
                facts[f"inproc/{loop}/vs_lightest"] = res.cpu.loopwatch_vs_lightest.of_medians
                facts[f"inproc/{loop}/lightest"] = res.cpu.loopwatch_vs_lightest.lightest
            facts[f"inproc/{loop}/added"] = cpu["loopwatch"].added.median
            facts[f"inproc/{loop}/bare"] = cpu["bare"].median
        grouped(axes[0], data, "process CPU µs per request (median, IQR)",
                "In process: CPU time per request")
        cfg = ov.config
        parts.append(
            f"**In process** ({cfg.requests} requests per sample, {cfg.rounds} alternating "
            f"rounds, {cfg.concurrency} in flight, each request its own task). Median "
            f"(interquartile range) in µs; *added* is the median of the per-round differences "
            f"to bare. CPU is the process's CPU time (all threads, so loopwatch's watchdog is "
            f"in it); wall is elapsed time, which on a shared machine also holds time given to "
            f"other processes.\n\n"
            + table(("loop", "variant", "CPU µs/req", "added CPU µs", "CPU vs bare",
                     "wall µs/req", "wall vs bare"), rows)
            + f"\n\nReproduce: {command_of(ov, run)}")
    if cg:
        data = {}
        rows = []
        for loop, cres in cg.loops.items():
            req = cres.request
            data[loop] = {v: (req[v].instructions / 1e3, req[v].min / 1e3, req[v].max / 1e3)
                          for v in VARIANTS}
            for n, x in req.items():
                name = NAMES.get(n, f"*ablation:* {n}")
                rows.append((loop, name, f"{x.instructions:,.0f}", f"{x.added:+,.0f}",
                             f"{x.ratio:.3f}", f"{x.probes_per_unit:.3f}"))
            facts[f"cg/{loop}/ratio"] = req["loopwatch"].ratio - 1
            facts[f"cg/{loop}/vs_lightest"] = cres.loopwatch_vs_lightest
            facts[f"cg/{loop}/added"] = req["loopwatch"].added
            for what, pair in (("callback", cres.callback), ("step", cres.step)):
                if pair:
                    facts[f"cg/{loop}/{what}"] = pair.monitored.added
            if cres.awaits10:
                facts[f"cg/{loop}/await"] = cres.awaits10.added_per_await
        grouped(axes[1], data, "thousand instructions per request",
                "Under callgrind: instructions per request", fmt="{:.0f}k")
        gcfg = cg.config
        parts.append(
            f"**Instructions per request** under `valgrind --tool=callgrind` (the same in-process "
            f"drive; segments of {gcfg.requests} and {2 * gcfg.requests} requests, "
            f"{gcfg.repeats} pair(s), the median slope; loopwatch's timers stretched "
            f"{gcfg.time_scale:g}x to match the slowdown). Repeatable whatever else the "
            f"machine does: the bare app counts the same every time.\n\n"
            + table(("loop", "variant", "instructions/request", "added", "vs bare",
                     "probes/request"), rows)
            + f"\n\nReproduce: {command_of(cg, run)}")
        extra = []
        for loop, cres in cg.loops.items():
            if cres.callback and cres.step and cres.awaits10:
                extra.append((loop, f"{cres.callback.bare.instructions:,.0f}",
                              f"{cres.callback.monitored.added:+,.0f}",
                              f"{cres.step.bare.instructions:,.0f}",
                              f"{cres.step.monitored.added:+,.0f}",
                              f"{cres.awaits10.added_per_await:+,.0f}"))
        if extra:
            parts.append(
                "Instructions per loop callback and per task step (bare loop vs watched by a "
                "Monitor), and added per `await` inside a request (a route awaiting "
                "`asyncio.sleep(0)` 10 times vs the plain route, both with the middleware):\n\n"
                + table(("loop", "callback, bare", "added", "task step, bare", "added",
                         "added per await in a request"), extra))
    bd = load(Breakdown)
    if bd:
        ins = bd.instructions
        rows = [(k, f"{v:,.0f}") for k, v in ins.items()]
        parts.append(
            "**Where loopwatch's per-request instructions go** (callgrind, each piece run alone "
            "n and 2n times; *model* rows re-create a piece of the middleware's code, the "
            "others call loopwatch's own code):\n\n" + table(("piece", "instructions/call"), rows)
            + f"\n\nReproduce: {command_of(bd, run)}")
        facts["breakdown"] = ins
    if wk:
        data = {}
        rows = []
        for loop, wres in wk.loops.items():
            served = wres.variants
            data[loop] = {v: (served[v].rps.median, served[v].rps.q1, served[v].rps.q3)
                          for v in VARIANTS}
            for v in VARIANTS:
                r = served[v]
                rows.append((loop, NAMES[v], f"{r.rps.median:,.0f}", f"{r.rps_ratio:.3f}",
                             f"{r.latency_p50.median * 1e3:.2f}",
                             f"{r.latency_p99.median * 1e3:.2f}",
                             f"{r.server_cpu_us_per_request.median:.1f}",
                             f"{r.cpu_ratio:.3f}", str(r.errors)))
            facts[f"wrk/{loop}/loss"] = 1 - served["loopwatch"].rps_ratio
            facts[f"wrk/{loop}/cpu"] = served["loopwatch"].cpu_ratio - 1
            facts[f"wrk/{loop}/vs_lightest"] = wres.loopwatch_vs_lightest
            lightest_cpu = min(served[c].cpu_ratio for c in ("instrumentator",
                                                             "starlette-exporter")) - 1
            facts[f"wrk/{loop}/cpu_vs_lightest"] = ((served["loopwatch"].cpu_ratio - 1)
                                                    / lightest_cpu if lightest_cpu > 0 else None)
        grouped(axes[2], data, "requests per second (median, IQR)",
                "End to end: wrk → uvicorn, throughput", ratio=True)
        wcfg = wk.config
        if wcfg.rounds < 3:
            axes[2].set_title("End to end: wrk → uvicorn, throughput (error bars: too few rounds)")
        parts.append(
            f"**End to end**: wrk -t{wcfg.threads} -c{wcfg.connections} "
            f"-d{wcfg.seconds:g}s against uvicorn (one worker, httptools, access log off, each "
            f"variant its own process), {wcfg.rounds} alternating round(s); medians. wrk and "
            f"the server share the machine's cores, so throughput is also a measure of wrk. "
            f"Server CPU per request is the server process's own CPU time (from /proc) divided "
            f"by the requests served.\n\n"
            + table(("loop", "variant", "req/s", "vs bare", "p50 ms", "p99 ms",
                     "server CPU µs/req", "vs bare", "errors"), rows)
            + f"\n\nReproduce: {command_of(wk, run)}")
    if cs:
        data = {}
        rows = []
        for loop, sres in cs.loops.items():
            counts = sres.variants
            data[loop] = {v: (c.instructions / 1e3, c.min / 1e3, c.max / 1e3)
                          for v, c in counts.items() if v in VARIANTS}
            for v in VARIANTS:
                if v in counts:
                    cnt = counts[v]
                    rows.append((loop, NAMES[v], f"{cnt.instructions:,.0f}",
                                 f"{cnt.min:,.0f}–{cnt.max:,.0f}", f"{cnt.added:+,.0f}",
                                 f"{cnt.ratio:.3f}"))
            if "loopwatch" in counts:
                facts[f"cgs/{loop}/ratio"] = counts["loopwatch"].ratio - 1
                facts[f"cgs/{loop}/vs_lightest"] = sres.loopwatch_vs_lightest
        grouped(axes[3], data, "thousand instructions per request",
                "End to end under callgrind: uvicorn server, per request", fmt="{:.0f}k")
        scfg = cs.config
        parts.append(
            f"**End to end, instructions**: the uvicorn server (one worker, httptools) under "
            f"callgrind, keep-alive requests from a client outside valgrind; segments of "
            f"{scfg.requests} and {2 * scfg.requests} requests, {scfg.repeats} pair(s), "
            f"median slope (range over pairs); everything in the server process is counted — "
            f"HTTP parsing, the event loop, the app, loopwatch's watchdog thread.\n\n"
            + table(("loop", "variant", "instructions/request", "range", "added", "vs bare"),
                    rows)
            + f"\n\nReproduce: {command_of(cs, run)}")
    else:
        axes[3].set_visible(False)
    for ax, present in ((axes[0], ov), (axes[1], cg), (axes[2], wk)):
        if not present:
            ax.set_visible(False)
    img = save(fig, "overhead.png")
    return (f"![overhead: in process, callgrind, wrk]({img})\n\n" + "\n\n".join(parts)), facts


def monitor_section(run: RunAll | None) -> tuple[str, dict[str, Any]]:
    mc = load(MonitorCost)
    if not mc:
        return "*(no results: run benchmarks/monitor_cost.py)*", {}
    facts: dict[str, Any] = {}
    rows = []
    for loop, res in mc.loops.items():
        for name, r in (("idle CPU", res.idle), ("per callback", res.callback),
                        ("per task step", res.step)):
            rows.append((loop, name, f"{r.bare.median:.3f}", f"{r.monitored.median:.3f}",
                         f"{r.added.median:+.3f} (IQR {r.added.iqr:.3f})", r.unit))
        facts[f"mc/{loop}/idle"] = res.idle.monitored.median
        facts[f"mc/{loop}/idle_added"] = res.idle.added.median
        facts[f"mc/{loop}/callback"] = res.callback.added.median
        facts[f"mc/{loop}/step"] = res.step.added.median
    req_rows = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for loop, res in mc.loops.items():
        for ax, axis, label in ((axes[0], "awaits", "awaits per request (50 in flight)"),
                                (axes[1], "in_flight", "requests in flight (1 await each)")):
            pts = res.requests[axis]
            xs = [int(k) for k in pts]
            ys = [p.cpu.added.median for p in pts.values()]
            lo = [p.cpu.added.q1 for p in pts.values()]
            hi = [p.cpu.added.q3 for p in pts.values()]
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo, strict=True)],
                                      [b - y for y, b in zip(ys, hi, strict=True)]],
                        marker="o", capsize=3, label=loop, color=LOOP_COLORS[loop])
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("added CPU µs per request (median, IQR)")
            ax.grid(alpha=0.3)
            ax.axhline(0, color="grey", lw=0.8)
            for k, p in pts.items():
                c = p.cpu
                req_rows.append((loop, f"{axis.replace('_', ' ')} = {k}",
                                 f"{c.bare.median:.1f}", f"{c.monitored.median:.1f}",
                                 f"{c.added.median:+.1f} (IQR {c.added.iqr:.1f})",
                                 pct(c.added_ratio)))
    axes[0].set_title("loopwatch's added CPU vs awaits per request")
    axes[1].set_title("loopwatch's added CPU vs requests in flight")
    axes[0].legend()
    img = save(fig, "monitor_cost.png")
    text = (
        f"Bare loop vs the same loop watched by a `Monitor` ({mc.config.rounds} alternating "
        f"rounds; idle over {mc.config.idle_seconds:g} s "
        f"of `asyncio.sleep`; CPU is the whole process, watchdog thread included):\n\n"
        + table(("loop", "measure", "bare", "watched", "added", "unit"), rows)
        + "\n\nPer request, in process, bare FastAPI vs with `LoopWatchMiddleware` (process CPU "
        "µs per request; a route awaiting `asyncio.sleep(0)` k times):\n\n"
        + table(("loop", "", "bare µs", "loopwatch µs", "added µs", "added"), req_rows)
        + f"\n\n![monitor cost]({img})\n\nReproduce: {command_of(mc, run)}")
    return text, facts


def accuracy_section(run: RunAll | None) -> tuple[str, dict[str, Any]]:
    ac = load(Accuracy)
    if not ac:
        return "*(no results: run benchmarks/accuracy.py)*", {}
    facts: dict[str, Any] = {}
    summ = ac.injected.summary
    rows = []
    for s in summ:
        rows.append((s.loop, s.kind, s.injected_ms, s.n,
                     f"{s.reported_ms_median:.2f}", f"{s.elapsed_ms_median:.2f}",
                     f"{s.error_vs_injected_ms_median:+.2f} / "
                     f"{s.error_vs_injected_ms_max_abs:.2f}",
                     f"{s.error_vs_elapsed_ms_median:+.3f} / "
                     f"{s.error_vs_elapsed_ms_max_abs:.3f}",
                     f"{s.within_tolerance}/{s.n}", f"{s.exact_line}/{s.n}"))
    big = [s for s in summ if s.injected_ms >= 20]
    for kind in ("sleep", "cpu"):
        ks = [s for s in big if s.kind == kind]
        if ks:
            facts[f"acc/{kind}/within"] = (sum(s.within_tolerance for s in ks),
                                           sum(s.n for s in ks))
            facts[f"acc/{kind}/max_err_inj"] = max(s.error_vs_injected_ms_max_abs for s in ks)
            facts[f"acc/{kind}/max_err_el"] = max(s.error_vs_elapsed_ms_max_abs for s in ks)
            facts[f"acc/{kind}/exact"] = (sum(s.exact_line for s in ks), sum(s.n for s in ks))
    # plot
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    markers = {"sleep": "o", "cpu": "s"}
    for (loop, kind) in dict.fromkeys((r.loop, r.kind) for r in ac.injected.rows):
        rs = [(r, r.reported) for r in ac.injected.rows
              if r.loop == loop and r.kind == kind and r.reported is not None]
        inj = [r.injected * 1e3 for r, _ in rs]
        rep = [reported * 1e3 for _, reported in rs]
        err = [(reported - r.injected) * 1e3 for r, reported in rs]
        err_el = [(reported - r.elapsed) * 1e3 for r, reported in rs]
        jitter = 1.06 if loop == "uvloop" else 0.94
        style = dict(marker=markers[kind], color=LOOP_COLORS[loop], linestyle="none",
                     alpha=0.75, label=f"{loop}, {'time.sleep' if kind == 'sleep' else 'CPU loop'}")
        axes[0].plot(inj, rep, **style)
        axes[1].plot([x * jitter for x in inj], err, **style)
        axes[1].plot([x * jitter for x in inj], err_el, marker=markers[kind], linestyle="none",
                     markerfacecolor="none", color=LOOP_COLORS[loop], alpha=0.75)
    xs = [5, 1000]
    axes[0].plot(xs, xs, color="grey", lw=0.8, label="reported = injected")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("injected block (ms)")
    axes[0].set_ylabel("reported block duration (ms)")
    axes[0].set_title("Reported vs injected")
    axes[0].legend(fontsize=8)
    grid = [5 * 1.1 ** i for i in range(60) if 5 * 1.1 ** i <= 1100]
    tol = [max(2.0, 0.02 * g) for g in grid]
    axes[1].fill_between(grid, [-t for t in tol], tol, color="green", alpha=0.12,
                         label="target: ± max(2 ms, 2 %)")
    axes[1].set_xscale("log")
    axes[1].set_yscale("symlog", linthresh=2, linscale=2)
    ticks = [-20, -10, -5, -2, -1, 0, 1, 2, 5, 10, 20]
    axes[1].set_yticks(ticks, [f"{t:+g}" if t else "0" for t in ticks])
    axes[1].set_ylim(-25, 25)
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set_xlabel("injected block (ms)")
    axes[1].set_ylabel("error (ms)")
    axes[1].set_title("Reported − injected (filled), reported − really elapsed (hollow)")
    axes[1].legend(fontsize=8, loc="lower left")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    img = save(fig, "accuracy.png")

    srows, satrows = [], []
    prec, rec, fals = [], [], []
    for loop, res in ac.served.items():
        m = res.mixed
        srows.append((loop, f"{res.threshold * 1e3:g} ms",
                      f"{m.load.ok} / {m.load.blocking}", m.real_blocks,
                      m.events, _p(m.precision), _p(m.recall),
                      f"{m.exact_line}/"
                      f"{sum(p.reported_right for p in m.per_route.values())}"
                      f" ({_p(m.exact_line_rate)})",
                      len(m.false_events), len(m.wrong_route)))
        prec.append(m.precision)
        rec.append(m.recall)
        sat = res.saturation
        satrows.append((loop, f"{sat.seconds:g} s, {sat.connections} connections",
                        f"{sat.requests:,}", f"{sat.rps:,.0f}", f"{sat.latency_p99 * 1e3:.1f}",
                        sat.false_events, sat.false_events_over_100ms,
                        "; ".join(f"{e.route} {e.duration * 1e3:.0f} ms" for e in sat.events)
                        or "-",
                        "; ".join(f"{e.duration * 1e3:.0f} ms ({e.gc_seconds * 1e3:.0f} in "
                                  f"the collector)" for e in sat.gc_events) or "-"))
        fals.append(sat.false_events)
        facts[f"acc/{loop}/exact_served"] = m.exact_line_rate
    facts["acc/precision"] = min(p for p in prec if p is not None) if prec else None
    facts["acc/recall"] = min(r for r in rec if r is not None) if rec else None
    facts["acc/false"] = sum(fals)
    facts["acc/false_over_100ms"] = sum(res.saturation.false_events_over_100ms
                                        for res in ac.served.values())
    per_route = []
    for loop, res in ac.served.items():
        for route, p in res.mixed.per_route.items():
            per_route.append((loop, route, p.real, p.reported_right, p.events_naming,
                              p.exact_line))
    misses = []
    for loop, res in ac.served.items():
        for x in res.mixed.line_misses:
            misses.append((loop, x.route, f"{x.duration * 1e3:.1f} ms",
                           x.location or "-", x.stack_status[:70]))
    cfg = ac.config
    text = (
        f"**Injected blocks** (in process; threshold 4 ms, probe 2 ms; {cfg.reps} × "
        f"`time.sleep` and {cfg.cpu_reps} × a CPU-bound Python loop per size and loop). "
        f"Errors are median / largest absolute, in ms; *ok* counts blocks within "
        f"max(2 ms, 2 %) of the injected duration; *line* counts events whose reported line "
        f"is the blocking call (for the CPU loop: a line of the loop).\n\n"
        + table(("loop", "block", "injected ms", "n", "reported ms", "really elapsed ms",
                 "error vs injected", "error vs elapsed", "ok", "line"), rows)
        + f"\n\n![accuracy]({img})\n\n"
        f"**Attribution under mixed load** (uvicorn, `benchmarks.bench_apps:accuracy`, "
        f"{cfg.mixed_seconds:g} s, {cfg.ok_clients} clients on non-blocking routes and "
        f"{cfg.block_clients} on blocking ones, 30–60 ms per block). Every event is matched "
        f"to the real block (recorded by the server) that its time span overlaps.\n\n"
        + table(("loop", "threshold", "requests ok / blocking", "real blocks", "events",
                 "precision", "recall", "exact line", "events with no real block",
                 "wrong route"), srows)
        + "\n\n" + table(("loop", "route", "real blocks", "reported with this route",
                          "events naming it", "exact line"), per_route)
        + ("\n\nEvents whose line was not the blocking one:\n\n"
           + table(("loop", "route", "duration", "reported location", "stack status"), misses)
           if misses else "")
        + "\n\n**False block events under saturation** (wrk -t2 on the same server, "
        "non-blocking routes only, including a plain `def` route served from the thread "
        "pool); every event that names a route (or none) is a false one. Blocks loopwatch "
        "reports as the garbage collector's (route `<gc>`: a full collection ran for all "
        "but less than the threshold of the step) are real stalls of the loop, listed "
        "apart:\n\n"
        + table(("loop", "load", "requests", "req/s", "p99 ms", "false block events",
                 "of which ≥ 100 ms", "false events", "the collector's blocks"), satrows)
        + f"\n\nReproduce: {command_of(ac, run)}")
    return text, facts


def _rel(location: str | None) -> str:
    if not location:
        return "-"
    path, _, line = location.rpartition(":")
    try:
        return f"{os.path.relpath(path, ROOT)}:{line}"
    except ValueError:
        return location


def _p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def headline_section(run: RunAll | None) -> tuple[str, dict[str, Any]]:
    hl = load(Headline)
    if not hl:
        return "*(no results: run benchmarks/headline.py)*", {}
    rows = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [2.2, 1]})
    colors = ["#4C72B0", "#55A868", "#8172B2", "#C44E52"]
    for c, color in zip(hl.crowds, colors, strict=False):
        rows.append((c.scenario, c.users, c.answered, f"{c.first_s:.2f}", f"{c.median_s:.2f}",
                     f"{c.last_s:.2f}" + (" (extrapolated)" if c.last_extrapolated else "")))
        waits = sorted(c.waits_s or [])
        if waits:
            axes[0].step(waits, range(1, len(waits) + 1), where="post", color=color,
                         label=c.scenario)
            if c.last_extrapolated:
                axes[0].plot([waits[-1], c.last_s], [len(waits), c.users], ls="--",
                             color=color, label=f"  extrapolated: last user at {c.last_s:.0f} s")
    axes[0].set_xscale("log")
    xt = [0.5, 1, 2, 5, 10, 20, 50]
    axes[0].set_xticks(xt, [f"{x:g}" for x in xt])
    axes[0].axvline(hl.config.delay_ms / 1000, color="grey", lw=0.8, ls=":")
    axes[0].set_xlabel("seconds until answered (log scale; dotted: the upstream's latency)")
    axes[0].set_ylabel("users answered")
    users = hl.crowds[0].users
    delay = hl.config.delay_ms
    axes[0].set_title(f"{users} simultaneous users, upstream answering in {delay} ms")
    axes[0].legend(fontsize=7.5, loc="lower right")
    axes[0].grid(alpha=0.3, which="both")
    bars = axes[1].bar(["asyncio.gather\n(/dashboard/1)",
                        "awaits in a row\n(/antipatterns/\nsequential/1)"],
                       [hl.gather_s, hl.sequential_s], color=["#55A868", "#C44E52"])
    for b in bars:
        axes[1].annotate(f"{b.get_height():.3f} s", (b.get_x() + b.get_width() / 2, b.get_height()),
                         xytext=(0, 3), textcoords="offset points", ha="center", fontsize=9)
    axes[1].set_ylabel("seconds (median)")
    axes[1].set_title("3 upstream calls of 200 ms")
    axes[1].margins(y=0.15)
    axes[1].grid(axis="y", alpha=0.3)
    img = save(fig, "headline.png")
    ev = hl.loopwatch.events if hl.loopwatch else []
    blocking = hl.loopwatch.blocking_by_route[:3] if hl.loopwatch else []
    text = (
        table(("scenario", "users", "answered", "first s", "median s", "last s"), rows)
        + f"\n\n3 upstream calls of 200 ms (median of {hl.config.runs} runs): "
        f"`asyncio.gather` **{hl.gather_s:.3f} s**, awaited one after another "
        f"**{hl.sequential_s:.3f} s**.\n\n"
        + (f"What loopwatch said about it (the demo's `/metrics` and `/loopwatch/events`): the "
           f"route with the most loop time is `{blocking[0][0]}` ({blocking[0][1]:.3f} s); "
           f"its block events: "
           + "; ".join(f"{e.duration * 1e3:.0f} ms at `{_rel(e.location)}` "
                       f"(route `{e.route}`)" for e in ev[-4:]) + ".\n\n" if blocking else "")
        + f"![headline]({img})\n\nReproduce: {command_of(hl, run)}")
    return text, {"hl": hl}


def memory_section(run: RunAll | None) -> tuple[str, dict[str, Any]]:
    mem = load(Memory)
    if not mem:
        return "*(no results: run benchmarks/memory.py)*", {}
    mib = 1024 * 1024
    s, cfg = mem.samples, mem.config
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([x.requests for x in s], [x.rss / mib for x in s], marker="o")
    ax.axhline(s[0].rss / mib + 5, color="red", ls="--", lw=0.8,
               label="target ceiling: first sample + 5 MiB")
    ax.set_xlabel("requests")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"RSS over {cfg.requests:,} requests, {cfg.paths:,} unknown paths")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=min(x.rss for x in s) / mib - 2, top=s[0].rss / mib + 8)
    img = save(fig, "memory.png")
    rows = [(f"{x.requests:,}", f"{x.rss / mib:.2f}", f"{(x.rss - s[0].rss) / mib:+.2f}")
            for x in s]
    text = (
        f"{cfg.requests:,} requests over {cfg.paths:,} distinct "
        f"unknown paths (404), in process, loopwatch on {cfg.loop}. Growth after "
        f"the first {cfg.first:,} requests: "
        f"**{mem.growth_after_first_bytes / mib:+.2f} MiB** (peak "
        f"{mem.peak_growth_after_first_bytes / mib:+.2f} MiB). Label sets at the end: "
        f"{mem.label_sets.request_duration} (method, route) for the histograms, "
        f"{mem.label_sets.requests_total} (method, route, status) for the counter; route "
        f"cache entries: {mem.route_cache_entries}; exposition: "
        f"{mem.exposition_bytes:,} bytes.\n\n"
        + table(("requests", "RSS MiB", "vs first sample"), rows)
        + f"\n\n![memory]({img})\n\nReproduce: {command_of(mem, run)}")
    return text, {"mem": mem}


def targets_section(f: dict[str, Any]) -> str:
    rows = []

    def add(target: str, measured: str, met: bool | None) -> None:
        rows.append((target, measured, ok(met)))

    for loop in ("asyncio", "uvloop"):
        parts, flags = [], []
        if f"inproc/{loop}/ratio" in f:
            r = f[f"inproc/{loop}/ratio"]
            parts.append(f"in process CPU {pct(r)} ({f[f'inproc/{loop}/added']:+.1f} µs over "
                         f"{f[f'inproc/{loop}/bare']:.1f} µs)")
            flags.append(r <= 0.05)
        if f"cg/{loop}/ratio" in f:
            r = f[f"cg/{loop}/ratio"]
            parts.append(f"instructions {pct(r)}")
            flags.append(r <= 0.05)
        if f"cgs/{loop}/ratio" in f:
            r = f[f"cgs/{loop}/ratio"]
            parts.append(f"instructions through uvicorn {pct(r)}")
            flags.append(r <= 0.05)
        if f"wrk/{loop}/loss" in f:
            parts.append(f"wrk throughput {pct(-f[f'wrk/{loop}/loss'])}, server CPU/request "
                         f"{pct(f[f'wrk/{loop}/cpu'])}")
            flags.append(f[f"wrk/{loop}/loss"] <= 0.05)
        if parts:
            add(f"loopwatch adds ≤ 5 % per request over bare, everything on ({loop})",
                "; ".join(parts), all(flags) if flags else None)
    for loop in ("asyncio", "uvloop"):
        parts, flags = [], []
        if f"inproc/{loop}/vs_lightest" in f:
            v = f[f"inproc/{loop}/vs_lightest"]
            parts.append(f"in process {v:.3f} (lightest: {f[f'inproc/{loop}/lightest']})")
            flags.append(v <= 0.1)
        if f.get(f"cg/{loop}/vs_lightest") is not None:
            v = f[f"cg/{loop}/vs_lightest"]
            parts.append(f"instructions {v:.3f}")
            flags.append(v <= 0.1)
        if f.get(f"cgs/{loop}/vs_lightest") is not None:
            v = f[f"cgs/{loop}/vs_lightest"]
            parts.append(f"instructions through uvicorn {v:.3f}")
            flags.append(v <= 0.1)
        if f.get(f"wrk/{loop}/cpu_vs_lightest") is not None:
            v = f[f"wrk/{loop}/cpu_vs_lightest"]
            parts.append(f"wrk server CPU {v:.3f}")
            flags.append(v <= 0.1)
        if parts:
            add(f"≤ 1/10 of the lighter Prometheus middleware's overhead, same run ({loop})",
                "; ".join(parts), all(flags) if flags else None)
    for loop in ("asyncio", "uvloop"):
        if f"mc/{loop}/idle" in f:
            v = f[f"mc/{loop}/idle"]
            add(f"monitor idle ≤ 0.5 % of one core ({loop})",
                f"{v:.3f} % (added over a bare idle loop: {f[f'mc/{loop}/idle_added']:+.3f} %)",
                v <= 0.5)
    if "mc/asyncio/callback" in f:
        v = f["mc/asyncio/callback"]
        extra = (f"; {f['cg/asyncio/callback']:+,.0f} instructions per callback under callgrind"
                 if "cg/asyncio/callback" in f else "")
        add("≤ 1 µs per loop callback on asyncio", f"{v:+.3f} µs (task step: "
            f"{f['mc/asyncio/step']:+.3f} µs){extra}", v <= 1.0)
    if "acc/sleep/within" in f:
        a, n = f["acc/sleep/within"]
        text = (f"`time.sleep` blocks: {a}/{n} within, largest error "
                f"{f['acc/sleep/max_err_inj']:.2f} ms vs injected")
        met = a == n
        if "acc/cpu/within" in f:
            c, m = f["acc/cpu/within"]
            text += (f"; CPU-bound blocks: {c}/{m} within vs injected (largest "
                     f"{f['acc/cpu/max_err_inj']:.2f} ms), largest error vs really elapsed "
                     f"{f['acc/cpu/max_err_el']:.2f} ms")
            met = met and c == m
        add("reported block within max(2 ms, 2 %) of injected, blocks ≥ 20 ms", text, met)
    if "acc/precision" in f:
        p, r = f["acc/precision"], f["acc/recall"]
        add("attribution precision and recall 100 % on the mixed-load test",
            f"precision {_p(p)}, recall {_p(r)} (lowest over loops)",
            p is not None and r is not None and p >= 1.0 and r >= 1.0)
    if "acc/false" in f:
        add("zero false block events under saturation",
            f"{f['acc/false']} event(s) at the 20 ms threshold ({f['acc/false_over_100ms']} "
            f"≥ 100 ms, the default threshold), both loops", f["acc/false"] == 0)
    if "mem" in f:
        mem: Memory = f["mem"]
        g = mem.growth_after_first_bytes / 1024 / 1024
        add("memory flat after the first 10,000 requests (growth < 5 MiB)",
            f"{g:+.2f} MiB over {mem.config.requests:,} requests", g < 5)
    return table(("target", "measured", ""), rows)


def render() -> str:
    run = load(RunAll)
    kinds: tuple[type[Result], ...] = (Overhead, MonitorCost, Accuracy, Memory)
    any_result = next((r for r in (load(k) for k in kinds) if r), None)
    facts: dict[str, Any] = {}
    ov, f1 = overhead_section(run)
    mc, f2 = monitor_section(run)
    ac, f3 = accuracy_section(run)
    hl, _ = headline_section(run)
    mem, f5 = memory_section(run)
    facts.update(f1)
    facts.update(f2)
    facts.update(f3)
    facts.update(f5)
    when = run.finished if run else (any_result.machine.time if any_result else None) or "?"
    return "\n\n".join([
        BEGIN,
        f"*Generated by `benchmarks/report.py` ({when}). Do not edit by hand: run "
        f"`python -m benchmarks.run_all`, then `python -m benchmarks.report --docs`.*",
        "### The machine", machine_section(run, any_result),
        "### Targets", targets_section(facts),
        "### 1. Overhead: loopwatch vs bare vs the Prometheus middlewares", ov,
        "### 2. What the monitor costs", mc,
        "### 3. Accuracy", ac,
        "### 4. The seed article's headline", hl,
        "### 5. Memory", mem,
        END,
    ]) + "\n"


def main() -> None:
    if "--docs" in sys.argv[1:]:
        TARGET.update(doc=DOC, img=IMG)
    generated = render()
    text = DOC.read_text() if DOC.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + generated.rstrip("\n") + tail
    else:
        head = text.rstrip("\n") + "\n\n## Figures\n\n" if text else "# Performance\n\n"
        text = head + generated
    doc, img = TARGET["doc"], TARGET["img"]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(re.sub(r"\n{3,}", "\n\n", text))
    images = ", ".join(sorted(p.name for p in img.glob("*.png")))
    print(f"wrote {doc.relative_to(ROOT)} and {images} in {img.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
