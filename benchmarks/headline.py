"""The article's headline, measured: 100 users on a 500 ms upstream, awaited vs blocking.

    python benchmarks/headline.py [--users 100] [--delay-ms 500] [--cap-seconds 10]

It starts the upstream simulator and two demo processes (``python -m demo_app
--no-upstream``, watched by loopwatch) on loopback, then measures:

* ``/weather`` (awaits the upstream on the shared httpx client): every user is answered in
  about the upstream's 500 ms - with a pool as large as the crowd, and with the article's
  pool of 50 connections, which serves 100 users in two rounds;
* ``/antipatterns/requests-get`` (``requests.get`` inside ``async def``): the loop serves
  one user at a time. The run stops at ``--cap-seconds`` and extrapolates the last user's
  wait from the measured time per user;
* ``/dashboard/1`` (``asyncio.gather``) against ``/antipatterns/sequential/1`` with three
  200 ms upstream calls;
* what loopwatch saw: the route with the most blocking time in ``/metrics`` and the route
  and file:line of each block event in ``/loopwatch/events``.

Each user is one raw HTTP/1.1 connection, so the figures are the server's, not an HTTP
client library's. Results go to stdout and to ``benchmarks/results/headline.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "headline.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def get(port: int, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """One GET on a fresh connection to 127.0.0.1:``port``; the status and the body.

    The body is read by its Content-Length, not to the end of the stream: a blocked loop
    sends a response at once but closes the connection only when it next gets a turn.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        fields = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
        length = fields.get("content-length")
        body = await (reader.readexactly(int(length)) if length else reader.read())
    finally:
        writer.close()
    return int(head[0].split()[1]), body


def get_sync(port: int, path: str) -> tuple[int, bytes]:
    return asyncio.run(get(port, path))


@contextlib.contextmanager
def running(
    args: Sequence[str], port: int, env: Mapping[str, str], ready: str = "/docs"
) -> Iterator[None]:
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
        yield
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


async def measure(args: argparse.Namespace, ports: dict[str, int]) -> dict[str, Any]:
    users, delay = args.users, args.delay_ms
    # The first crowd on a fresh demo also opens the pool's connections; the next finds
    # them open. Both are reported: the pool's cost differs between the two.
    cold = await crowd(f"/weather, pool of {users}, cold", ports["big"], "/weather", users)
    warm = await crowd(f"/weather, pool of {users}, warm", ports["big"], "/weather", users)
    await crowd("warm-up", ports["article"], "/weather", users)
    article = await crowd(
        "/weather, pool of 50 (the article's), warm", ports["article"], "/weather", users
    )
    three = {"X-Sim-Delay-Ms": "200"}
    gather = await median_latency(ports["article"], "/dashboard/1", three, args.runs)
    sequential = await median_latency(
        ports["article"], "/antipatterns/sequential/1", three, args.runs
    )
    blocking = await crowd(
        "requests.get inside async def",
        ports["big"],
        f"/antipatterns/requests-get?ms={delay}",
        users,
        cap=args.cap_seconds,
    )
    return {
        "crowds": [cold, warm, article, blocking],
        "gather_s": gather,
        "sequential_s": sequential,
    }


async def attribution(port: int, delay: int) -> dict[str, Any]:
    """A short mixed run on one demo, then what loopwatch says about it."""
    blockers = [get(port, f"/antipatterns/requests-get?ms={delay}") for _ in range(4)]
    awaiting = [get(port, "/weather") for _ in range(20)]
    await asyncio.gather(*blockers, *awaiting)
    _, metrics = await get(port, "/metrics/")
    _, events = await get(port, "/loopwatch/events/")
    return {
        "blocking_by_route": blocking_by_route(metrics.decode()),
        "events": [
            {key: event[key] for key in ("route", "location", "duration", "hint")}
            for event in json.loads(events)["events"]
        ],
    }


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
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--no-loopwatch", action="store_true", help="run the demos unwatched, to see what it costs"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = parser.parse_args(argv)
    if args.users < 2:
        parser.error("--users must be at least 2")

    ports = {"sim": free_port(), "big": free_port(), "article": free_port()}
    upstream = f"http://127.0.0.1:{ports['sim']}"
    sim_args = ["-m", "uvicorn", "demo_app.upstream:create_upstream_app", "--factory"]
    sim_args += ["--port", str(ports["sim"]), "--loop", args.loop, "--log-level", "warning"]
    demo_env = {"DEMO_UPSTREAM_URL": upstream}
    big_env = {
        **demo_env,
        "DEMO_MAX_CONNECTIONS": str(args.users),
        "DEMO_MAX_KEEPALIVE_CONNECTIONS": str(args.users),
    }

    def demo(port: str) -> list[str]:
        argv = ["-m", "demo_app", "--no-upstream", "--port", str(ports[port]), "--loop", args.loop]
        return argv + (["--no-loopwatch"] if args.no_loopwatch else [])

    print(f"{args.users} users, upstream latency {args.delay_ms} ms, loop {args.loop}", flush=True)
    with (
        running(sim_args, ports["sim"], {"SIM_DELAY_MS": str(args.delay_ms)}, "/_sim/stats"),
        running(demo("article"), ports["article"], demo_env),
    ):
        # The big demo serves the blocking run last: it stays stuck on the queued users
        # until it is stopped, so it is stopped before the attribution run.
        with running(demo("big"), ports["big"], big_env):
            measured = asyncio.run(measure(args, ports))
        seen = (
            None if args.no_loopwatch else asyncio.run(attribution(ports["article"], args.delay_ms))
        )

    crowds: list[Crowd] = measured["crowds"]
    print()
    print(crowd_table(crowds))
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

    result = {
        "config": {key: value for key, value in vars(args).items() if key != "json"},
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "crowds": [c.summary() for c in crowds],
        "gather_s": round(measured["gather_s"], 3),
        "sequential_s": round(measured["sequential_s"], 3),
        "loopwatch": seen,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
