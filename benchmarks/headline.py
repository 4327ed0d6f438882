"""The article's headline, measured: 100 users on a 500 ms upstream, awaited vs blocking.

    .venv/bin/python -m benchmarks.headline [--users 100] [--delay-ms 500] [--cap-seconds 10]

It starts the upstream simulator and demo processes (``python -m demo_app --no-upstream``,
watched by loopwatch) on loopback, then measures:

* ``/weather`` (awaits the upstream on the shared httpx client) with three connection pools:
  as large as the crowd with every connection kept alive, as large as the crowd with 20 kept
  alive, and the article's 50 with 20 kept alive (two rounds of 500 ms for 100 users). Each
  pool serves a first crowd (it opens the connections) and then ``--rounds`` crowds that
  find them open; the table shows the round with the median median. For each round it
  records the demo process's CPU time and what loopwatch saw: loop busy time, and the loop
  time charged to ``/weather``;
* the same three pools without the demo: one ``httpx.AsyncClient`` in this process against
  the simulator, counting how often httpcore's pool re-ran its request assignment and how
  often a request was handed a connection another request had taken
  (``ConnectionNotAvailable``, then retried): the mechanism behind a slow large pool;
* ``/antipatterns/requests-get`` (``requests.get`` inside ``async def``): the loop serves
  one user at a time. The run stops at ``--cap-seconds`` and extrapolates the last user's
  wait from the measured time per user;
* ``/dashboard/1`` (``asyncio.gather``) against ``/antipatterns/sequential/1`` with three
  200 ms upstream calls;
* what loopwatch saw: the route with the most blocking time in ``/metrics`` and the route
  and file:line of each block event in ``/loopwatch/events``.

Each user is one raw HTTP/1.1 connection, so the figures are the server's, not an HTTP
client library's. Results go to stdout and to ``benchmarks/out/headline.json`` (``--json``
to change it); the figures in docs/performance.md are from a copy of it in
``benchmarks/results/``, made by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from harness.servers import free_port

from ._common import OUT as OUT_DIR
from ._common import ROOT, http_get
from ._results import Headline, read


OUT = OUT_DIR / "headline.json"
#: httpx's default, and the article's: connections kept open between bursts.
KEEPALIVE = 20


async def get(port: int, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """One GET on a fresh connection to 127.0.0.1:``port``, with no time limit of its own."""
    return await http_get(port, path, timeout=None, headers=headers)


def get_sync(port: int, path: str) -> tuple[int, bytes]:
    return asyncio.run(get(port, path))


@contextlib.contextmanager
def running(
    args: Sequence[str], port: int, env: Mapping[str, str], ready: str = "/docs"
) -> Iterator[subprocess.Popen[bytes]]:
    """``python args`` in a subprocess, once it answers ``ready`` on ``port``; stopped on exit.

    Its stderr goes to a file, not to a pipe nobody reads: the block warnings of a long run
    would fill a pipe and then block the server on its next log line.
    """
    errfile = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=errfile,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                errfile.seek(0)
                raise RuntimeError(f"{args} exited: {errfile.read().decode()[-3000:]}")
            try:
                get_sync(port, ready)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{args} did not answer on port {port}") from None
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # a loop still blocked by queued requests
            proc.kill()
            proc.wait()
        errfile.close()


@dataclass
class Crowd:
    """How a crowd of simultaneous users fared on one route."""

    scenario: str
    path: str
    users: int
    #: Seconds each answered user waited, in the order they were answered.
    waits: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    capped_at: float | None = None

    @property
    def answered(self) -> int:
        return len(self.waits)

    def per_user(self) -> float:
        """Seconds between consecutive answers: the serialisation step of a blocked loop."""
        return (self.waits[-1] - self.waits[0]) / (self.answered - 1)

    def last_user(self) -> float:
        """The last user's wait: measured, or extrapolated when the run was capped."""
        if self.answered == self.users:
            return self.waits[-1]
        return self.waits[0] + (self.users - 1) * self.per_user()

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "path": self.path,
            "users": self.users,
            "answered": self.answered,
            "non_200": sum(1 for status in self.statuses if status != 200),
            "first_s": round(self.waits[0], 3),
            "median_s": round(statistics.median(self.waits), 3),
            "last_s": round(self.last_user(), 3),
            "last_extrapolated": self.answered < self.users,
            "per_user_s": round(self.per_user(), 3) if self.capped_at else None,
            "capped_at_s": self.capped_at,
            "waits_s": [round(w, 4) for w in self.waits],
        }


async def crowd(scenario: str, port: int, path: str, users: int, cap: float | None = None) -> Crowd:
    """``users`` simultaneous GETs of ``path``; stops waiting after ``cap`` seconds."""
    result = Crowd(scenario, path, users)
    start = time.perf_counter()

    async def user() -> None:
        status, _ = await get(port, path)
        result.waits.append(time.perf_counter() - start)
        result.statuses.append(status)

    tasks = [asyncio.create_task(user()) for _ in range(users)]
    _, pending = await asyncio.wait(tasks, timeout=cap)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if pending:
        result.capped_at = cap
    return result


async def median_latency(port: int, path: str, headers: Mapping[str, str], runs: int) -> float:
    waits = []
    for _ in range(runs):
        start = time.perf_counter()
        status, _ = await get(port, path, headers)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}")
        waits.append(time.perf_counter() - start)
    return statistics.median(waits)


def blocking_by_route(metrics: str) -> list[tuple[str, float]]:
    """(route, seconds) from ``loopwatch_request_blocking_seconds_sum``, most blocking first."""
    totals = [
        (sample.labels["route"], sample.value)
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "loopwatch_request_blocking_seconds_sum"
    ]
    return sorted(totals, key=lambda item: item[1], reverse=True)


def row(cells: Sequence[Any], widths: Sequence[int]) -> str:
    return "  ".join(
        f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}"
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
    )


def crowd_table(crowds: Sequence[Crowd]) -> str:
    widths = (46, 6, 9, 8, 8, 9)
    lines = [row(("scenario", "users", "answered", "first", "median", "last"), widths)]
    for c in crowds:
        s = c.summary()
        last = f"{s['last_s']:.2f} s" + ("*" if s["last_extrapolated"] else "")
        cells = (
            c.scenario,
            c.users,
            c.answered,
            f"{s['first_s']:.2f} s",
            f"{s['median_s']:.2f} s",
            last,
        )
        lines.append(row(cells, widths))
    for c in crowds:
        if c.capped_at is not None:
            lines.append(
                f"* {c.scenario}: stopped after {c.capped_at:g} s with {c.answered} of {c.users}"
                f" answered, one every {c.per_user():.3f} s; the last user's wait is extrapolated."
            )
    return "\n".join(lines)


@dataclass(frozen=True)
class Pool:
    """A demo's upstream connection pool: ``httpx.Limits`` of the shared client."""

    label: str
    max_connections: int
    keepalive: int

    def env(self) -> dict[str, str]:
        return {
            "DEMO_MAX_CONNECTIONS": str(self.max_connections),
            "DEMO_MAX_KEEPALIVE_CONNECTIONS": str(self.keepalive),
        }


def pools(users: int) -> list[Pool]:
    return [
        Pool(f"pool of {users}, {users} kept alive", users, users),
        Pool(f"pool of {users}, {KEEPALIVE} kept alive", users, KEEPALIVE),
        Pool(f"pool of 50, {KEEPALIVE} kept alive (the article's)", 50, KEEPALIVE),
    ]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux /proc), None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(metrics: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


LOOP_BUSY = "loopwatch_event_loop_busy_seconds_total"
BLOCKING = "loopwatch_request_blocking_seconds_sum"


async def pool_crowds(
    pool: Pool, port: int, pid: int, users: int, rounds: int, watched: bool
) -> dict[str, Any]:
    """A first crowd, then ``rounds`` crowds that find the pool's connections open; for
    each, the waits and what it cost the demo: CPU, loop busy time, loop time of /weather."""
    rows = []
    for number in range(rounds + 1):
        scenario = f"/weather, {pool.label}" + (", first crowd" if number == 0 else "")
        cpu = cpu_seconds(pid)
        before = (await get(port, "/metrics/"))[1].decode() if watched else ""
        c = await crowd(scenario, port, "/weather", users)
        after = (await get(port, "/metrics/"))[1].decode() if watched else ""
        cpu_after = cpu_seconds(pid)
        rows.append({
            "crowd": c,
            "cpu_s": None if cpu is None or cpu_after is None else round(cpu_after - cpu, 3),
            "loop_busy_s": round(metric(after, LOOP_BUSY) - metric(before, LOOP_BUSY), 3)
            if watched else None,
            "weather_loop_s": round(
                metric(after, BLOCKING, route="/weather")
                - metric(before, BLOCKING, route="/weather"), 3) if watched else None,
        })
        await asyncio.sleep(0.2)
    warm = rows[1:]
    # The round whose median is the median of the rounds' medians: a real crowd, not a mix.
    ranked = sorted(warm, key=lambda row: statistics.median(row["crowd"].waits))
    typical = ranked[len(ranked) // 2]
    return {
        "pool": vars(pool),
        "typical": typical["crowd"],
        "rounds": [
            {
                "first_crowd": index == 0,
                "median_s": round(statistics.median(row["crowd"].waits), 3),
                "last_s": round(row["crowd"].waits[-1], 3),
                "non_200": sum(1 for status in row["crowd"].statuses if status != 200),
                **{key: row[key] for key in ("cpu_s", "loop_busy_s", "weather_loop_s")},
            }
            for index, row in enumerate(rows)
        ],
    }


async def client_pool(
    pool: Pool, upstream: str, users: int, rounds: int, client: str = "httpx"
) -> dict[str, Any]:
    """The pool alone: one ``AsyncClient`` with ``pool``'s limits in this process, crowds
    of ``users`` requests to the simulator's /weather, and per crowd the count of the
    pool's assignment passes and of requests retried after ``ConnectionNotAvailable``
    (counted by wrapping two of the pool's own methods: httpcore 1.0's internals, which
    httpcore2 keeps). ``client`` is ``httpx``, or ``httpx2`` (its fork, whose httpcore2
    assigns an idle connection to one request only)."""
    import importlib

    httpx = importlib.import_module(client)
    connection_pool = importlib.import_module(
        client.replace("httpx", "httpcore") + "._async.connection_pool")

    counts = {"passes": 0, "retries": 0}
    pool_cls, request_cls = connection_pool.AsyncConnectionPool, connection_pool.AsyncPoolRequest
    assign, clear = pool_cls._assign_requests_to_connections, request_cls.clear_connection

    def counted_assign(self: Any) -> Any:
        counts["passes"] += 1
        return assign(self)

    def counted_clear(self: Any) -> Any:
        counts["retries"] += 1
        return clear(self)

    pool_cls._assign_requests_to_connections = counted_assign  # type: ignore[method-assign]
    request_cls.clear_connection = counted_clear  # type: ignore[method-assign]
    limits = httpx.Limits(max_connections=pool.max_connections,
                          max_keepalive_connections=pool.keepalive)
    rows = []
    try:
        async with httpx.AsyncClient(base_url=upstream, limits=limits, timeout=30) as http:

            async def one(start: float) -> float:
                (await http.get("/weather")).raise_for_status()
                return time.perf_counter() - start

            for number in range(rounds + 1):
                counts.update(passes=0, retries=0)
                cpu, start = time.process_time(), time.perf_counter()
                waits = await asyncio.gather(*(one(start) for _ in range(users)))
                rows.append({
                    "first_crowd": number == 0,
                    "median_s": round(statistics.median(waits), 3),
                    "cpu_s": round(time.process_time() - cpu, 3),
                    **counts,
                })
                await asyncio.sleep(0.2)
    finally:
        pool_cls._assign_requests_to_connections = assign  # type: ignore[method-assign]
        request_cls.clear_connection = clear  # type: ignore[method-assign]
    return {"pool": vars(pool), "client": client, "rounds": rows}


async def measure(
    args: argparse.Namespace, ports: dict[str, int], pids: dict[str, int]
) -> dict[str, Any]:
    users, delay, watched = args.users, args.delay_ms, not args.no_loopwatch
    studied = [
        await pool_crowds(pool, ports[f"pool{i}"], pids[f"pool{i}"], users, args.rounds, watched)
        for i, pool in enumerate(pools(users))
    ]
    three = {"X-Sim-Delay-Ms": "200"}
    article = ports["pool2"]
    gather = await median_latency(article, "/dashboard/1", three, args.runs)
    sequential = await median_latency(article, "/antipatterns/sequential/1", three, args.runs)
    blocking = await crowd(
        "requests.get inside async def",
        ports["pool0"],
        f"/antipatterns/requests-get?ms={delay}",
        users,
        cap=args.cap_seconds,
    )
    return {
        "pools": studied,
        "crowds": [*(study["typical"] for study in studied), blocking],
        "gather_s": gather,
        "sequential_s": sequential,
    }


async def attribution(port: int, delay: int) -> dict[str, Any]:
    """A short mixed run on one demo, then what loopwatch says about it: the loop time each
    route was charged during the run (the demo has served the crowds before), its events."""
    _, before = await get(port, "/metrics/")
    _, old_events = await get(port, "/loopwatch/events/")
    seen = len(json.loads(old_events)["events"])
    blockers = [get(port, f"/antipatterns/requests-get?ms={delay}") for _ in range(4)]
    awaiting = [get(port, "/weather") for _ in range(20)]
    await asyncio.gather(*blockers, *awaiting)
    _, metrics = await get(port, "/metrics/")
    _, events = await get(port, "/loopwatch/events/")
    earlier = dict(blocking_by_route(before.decode()))
    during = [(route, seconds - earlier.get(route, 0.0))
              for route, seconds in blocking_by_route(metrics.decode())]
    return {
        "blocking_by_route": sorted(during, key=lambda item: item[1], reverse=True),
        "events": [
            {key: event[key] for key in ("route", "location", "duration", "hint")}
            for event in json.loads(events)["events"][seen:]
        ],
    }


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def pool_table(studied: Sequence[dict[str, Any]], alone: Sequence[dict[str, Any]]) -> str:
    """The pool study: through the demo, then each client's pool alone."""
    widths = (52, 7, 9, 9, 10, 1)
    lines = [
        "Through the demo: each crowd after the first, median of the rounds"
        " (the demo's CPU, loopwatch's loop busy time and loop time charged to /weather):",
        row(("pool", "median", "cpu s", "busy s", "/weather", ""), widths),
    ]
    for study in studied:
        warm = [r for r in study["rounds"] if not r["first_crowd"]]

        def mid(key: str, rounds: list[dict[str, Any]] = warm) -> float | None:
            values = [r[key] for r in rounds if r[key] is not None]
            return statistics.median(values) if values else None

        cells = (study["typical"].scenario.removeprefix("/weather, "), _s(mid("median_s")),
                 _s(mid("cpu_s")), _s(mid("loop_busy_s")), _s(mid("weather_loop_s")), "")
        lines.append(row(cells, widths))
    lines += [
        "",
        "The pool alone (an AsyncClient in this process, same crowds): the pool's"
        " assignment passes and ConnectionNotAvailable retries per crowd:",
        row(("pool", "median", "cpu s", "passes", "retries", ""), widths),
    ]
    for study in alone:
        warm = [r for r in study["rounds"] if not r["first_crowd"]]
        pool = study["pool"]
        label = f"{study['client']}: pool of {pool['max_connections']}, {pool['keepalive']} alive"
        cells = (label, _s(statistics.median(r["median_s"] for r in warm)),
                 _s(statistics.median(r["cpu_s"] for r in warm)),
                 f"{statistics.median(r['passes'] for r in warm):.0f}",
                 f"{statistics.median(r['retries'] for r in warm):.0f}", "")
        lines.append(row(cells, widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100, help="simultaneous users (default: 100)")
    parser.add_argument("--delay-ms", type=int, default=500, help="upstream latency (default: 500)")
    parser.add_argument(
        "--cap-seconds", type=float, default=10.0, help="stop the blocking run after (default: 10)"
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="runs of gather/sequential (default: 5)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3,
        help="crowds per pool after the first, which opens the connections (default: 3)",
    )
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--no-loopwatch", action="store_true", help="run the demos unwatched, to see what it costs"
    )
    parser.add_argument(
        "--httpx2", action="store_true",
        help="also measure the pools alone with httpx2 (pip install httpx2), whose httpcore2"
        " has the pool fix",
    )
    parser.add_argument("--json", type=Path, default=OUT, help=f"default: {OUT}")
    args = parser.parse_args(argv)
    if args.httpx2:
        import importlib.util

        if importlib.util.find_spec("httpx2") is None:
            parser.error("--httpx2 needs the httpx2 package: .venv/bin/pip install httpx2")
    if args.users < 2:
        parser.error(f"--users={args.users} is invalid: expected at least 2")
    if args.rounds < 1 or args.runs < 1:
        parser.error("--rounds and --runs must be at least 1")
    if not args.cap_seconds > 0:
        parser.error(f"--cap-seconds={args.cap_seconds} is invalid: expected seconds > 0")

    studied = pools(args.users)
    ports = {"sim": free_port(), **{f"pool{i}": free_port() for i in range(len(studied))}}
    upstream = f"http://127.0.0.1:{ports['sim']}"
    sim_args = ["-m", "uvicorn", "demo_app.upstream:create_upstream_app", "--factory"]
    sim_args += ["--port", str(ports["sim"]), "--loop", args.loop, "--log-level", "warning"]

    def demo(port: str) -> list[str]:
        argv = ["-m", "demo_app", "--no-upstream", "--port", str(ports[port]), "--loop", args.loop]
        return argv + (["--no-loopwatch"] if args.no_loopwatch else [])

    print(f"{args.users} users, upstream latency {args.delay_ms} ms, loop {args.loop}", flush=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            running(sim_args, ports["sim"], {"SIM_DELAY_MS": str(args.delay_ms)}, "/_sim/stats"))
        pids = {}
        # The first pool's demo serves the blocking run last: it stays stuck on the queued
        # users until it is stopped, so it is stopped before the attribution run.
        blocked = stack.enter_context(contextlib.ExitStack())
        for i, pool in enumerate(studied):
            env = {"DEMO_UPSTREAM_URL": upstream, **pool.env()}
            target = blocked if i == 0 else stack
            pids[f"pool{i}"] = target.enter_context(running(demo(f"pool{i}"), ports[f"pool{i}"],
                                                            env)).pid
        measured = asyncio.run(measure(args, ports, pids))
        blocked.close()
        clients = ["httpx", "httpx2"] if args.httpx2 else ["httpx"]
        alone = [asyncio.run(client_pool(pool, upstream, args.users, args.rounds, client))
                 for client in clients for pool in studied]
        seen = (
            None if args.no_loopwatch else asyncio.run(attribution(ports["pool2"], args.delay_ms))
        )

    crowds: list[Crowd] = measured["crowds"]
    print()
    print(crowd_table(crowds))
    print()
    print(pool_table(measured["pools"], alone))
    print()
    print(f"3 upstream calls of 200 ms, median of {args.runs} runs:")
    for label, key in (
        ("/dashboard/1, asyncio.gather", "gather_s"),
        ("/antipatterns/sequential/1, awaits in a row", "sequential_s"),
    ):
        print(f"  {label:<46}{measured[key]:.3f} s")
    if seen is not None:
        print()
        print("loopwatch, after 4 requests.get users and 20 /weather users on one demo:")
        for route, seconds in seen["blocking_by_route"][:3]:
            print(f"  loopwatch_request_blocking_seconds_sum{{route={route!r}}} = {seconds:.3f}")
        for event in seen["events"][-4:]:
            where = f"{event['route']}  {event['duration']:.3f} s  at {event['location']}"
            print(f"  block event: {where}")

    import httpcore
    import httpx

    command = " ".join(["python", "benchmarks/headline.py", *(argv or sys.argv[1:])])
    result = {
        "command": command.strip(),
        "config": {key: value for key, value in vars(args).items() if key != "json"},
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "httpx": httpx.__version__,
            "httpcore": httpcore.__version__,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "crowds": [c.summary() for c in crowds],
        "pools": [
            {"pool": study["pool"], "rounds": study["rounds"]} for study in measured["pools"]
        ],
        "pool_alone": alone,
        "gather_s": round(measured["gather_s"], 3),
        "sequential_s": round(measured["sequential_s"], 3),
        "loopwatch": seen,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    read(Headline, args.json)  # the report can read it
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
