"""Load generator: a weighted mix of the demo's routes, at a given concurrency.

    .venv/bin/python -m demo_app.load http://127.0.0.1:8000 --duration 30 --concurrency 20 \\
        --mix "/data=5,/dashboard/1=3,/antipatterns/sleep?ms=150=1"

Each of ``--concurrency`` workers sends one request after another, picking a route by
weight. ``--requests`` sends exactly that many, however long they take; ``--duration``
stops sending after that many seconds (10 by default, unless ``--requests`` is given); with
neither it runs until SIGTERM or Ctrl-C. When it stops sending it waits for the answers to
the requests it has in flight, so every request the demo serves is counted and none is left
behind to keep the demo busy after the load is gone; a second SIGTERM or Ctrl-C abandons
them. At the end it prints one row per route: count, errors and p50/p95/p99/max latency.

It only ever talks to the URL it is given: routes must be paths, and redirects are not
followed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from .commands import python_command
from .latency import LatencyHistogram

__all__ = ["LoadResult", "RouteStats", "format_table", "main", "parse_mix", "run_load"]

#: Every anti-pattern blocks for at least twice loopwatch's default block threshold
#: (100 ms), so each request to one is a block event, not a near miss.
DEFAULT_MIX = (
    "/data=4,/users/1=2,/dashboard/1=2,/products/1=1,/weather=2,"
    "/antipatterns/sleep?ms=200=1,/antipatterns/requests-get?ms=250=1,/antipatterns/cpu?ms=250=1"
)
#: Seconds of sending when neither --duration nor --requests is given.
DEFAULT_DURATION = 10.0


def parse_mix(text: str) -> list[tuple[str, float]]:
    """``"/a=3,/b?x=1=1"`` → ``[("/a", 3.0), ("/b?x=1", 1.0)]``.

    The weight follows the *last* ``=``, so routes may carry a query string.
    """
    mix: list[tuple[str, float]] = []
    for entry in (part.strip() for part in text.split(",")):
        path, sep, weight_text = entry.rpartition("=")
        if not sep or not path:
            raise ValueError(
                f"mix entry {entry!r} needs a weight: write e.g. '{entry or '/data'}=1'"
            )
        if not path.startswith("/") or path.startswith("//"):
            raise ValueError(f"mix entry {entry!r}: the route must be a path starting with '/'")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(
                f"mix entry {entry!r}: weight {weight_text!r} is not a number"
            ) from None
        if not weight > 0 or weight == float("inf"):
            raise ValueError(f"mix entry {entry!r}: weight must be a finite number > 0")
        mix.append((path, weight))
    return mix


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"header {text!r} is invalid: expected 'Name: value'")
    return name.strip(), value.strip()


@dataclass
class RouteStats:
    """What happened to the requests of one route."""

    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    #: Failures by status code ("502") or exception name ("ReadTimeout").
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def errors(self) -> int:
        return sum(self.failures.values())

    def record(self, seconds: float, failure: str | None) -> None:
        self.latency.record(seconds)
        if failure is not None:
            self.failures[failure] += 1


@dataclass
class LoadResult:
    routes: dict[str, RouteStats]
    total: RouteStats
    #: Seconds from the first request to the last answer (or to abandoning the rest).
    elapsed: float
    concurrency: int
    #: Requests in flight when sending stopped, and the seconds spent waiting for them.
    in_flight_at_stop: int = 0
    drained_in: float = 0.0
    #: Requests given up on by a second stop signal: sent, never answered, not counted.
    abandoned: int = 0


async def _send(client: httpx.AsyncClient, path: str) -> str | None:
    """Send one request; the failure it ended in, or None."""
    try:
        response = await client.get(path)
    except httpx.HTTPError as exc:
        return type(exc).__name__
    return str(response.status_code) if response.status_code >= 400 else None


async def run_load(
    url: str,
    mix: Sequence[tuple[str, float]],
    *,
    concurrency: int = 10,
    duration: float = DEFAULT_DURATION,
    requests: int = 0,
    headers: Sequence[tuple[str, str]] = (),
    timeout: float = 30.0,
    progress: bool = False,
    stop: asyncio.Event | None = None,
    abandon: asyncio.Event | None = None,
    seed: int | None = None,
) -> LoadResult:
    """Run the load and return what was measured.

    Sending stops after ``duration`` seconds (0: no limit), once ``requests`` were sent
    (0: no limit) or when ``stop`` is set; then the requests in flight are waited for,
    unless ``abandon`` is set, which cancels them.
    """
    stop = stop if stop is not None else asyncio.Event()
    abandon = abandon if abandon is not None else asyncio.Event()
    paths = [path for path, _ in mix]
    weights = [weight for _, weight in mix]
    rng = random.Random(seed)
    routes = {path: RouteStats() for path in paths}
    total = RouteStats()
    # One iterator shared by all workers: together they send exactly `requests` requests.
    budget = itertools.repeat(None, requests) if requests > 0 else itertools.repeat(None)
    sending = True
    in_flight = 0
    started = time.perf_counter()

    async def worker() -> None:
        nonlocal in_flight
        for _ in budget:
            if not sending:
                return
            path = rng.choices(paths, weights)[0]
            begin = time.perf_counter()
            in_flight += 1
            try:
                failure = await _send(client, path)
            finally:
                in_flight -= 1
            seconds = time.perf_counter() - begin
            routes[path].record(seconds, failure)
            total.record(seconds, failure)

    async def report_progress() -> None:
        while True:
            await asyncio.sleep(1)
            elapsed = time.perf_counter() - started
            line = (
                f"\r{elapsed:6.1f} s  {total.latency.count:8d} requests"
                f"  {total.latency.count / elapsed:7.1f}/s  {total.errors:6d} errors"
            )
            print(line, end="", file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers=list(headers), timeout=timeout, limits=limits, follow_redirects=False
    ) as client:
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        finished = asyncio.ensure_future(asyncio.gather(*workers))
        stopped = asyncio.create_task(stop.wait())
        abandoned = asyncio.create_task(abandon.wait())
        helpers = [stopped, abandoned]
        if progress:
            helpers.append(asyncio.create_task(report_progress()))
        await asyncio.wait(
            (finished, stopped, abandoned),
            timeout=duration if duration > 0 else None,
            return_when=asyncio.FIRST_COMPLETED,
        )
        # No new requests; the ones in flight are answered (each within `timeout`).
        sending = False
        in_flight_at_stop = in_flight
        stopped_at = time.perf_counter()
        if not finished.done():
            await asyncio.wait((finished, abandoned), return_when=asyncio.FIRST_COMPLETED)
        elapsed = time.perf_counter() - started
        left = in_flight
        for task in [*workers, finished, *helpers]:
            task.cancel()
        outcomes = await asyncio.gather(*workers, finished, *helpers, return_exceptions=True)
    # Cancellation is how the run ends; any other exception is a bug to surface.
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    if progress:
        print(file=sys.stderr)
    return LoadResult(
        routes=routes,
        total=total,
        elapsed=elapsed,
        concurrency=concurrency,
        in_flight_at_stop=in_flight_at_stop,
        drained_in=time.perf_counter() - stopped_at if in_flight_at_stop else 0.0,
        abandoned=left,
    )


def _ms(stats: RouteStats, q: float) -> str:
    return f"{stats.latency.quantile(q) * 1000:.1f}" if stats.latency.count else "-"


def format_table(result: LoadResult) -> str:
    """The per-route table, a total row and a list of the failures seen."""
    width = max(len("route"), *(len(path) for path in result.routes))
    header = f"{'route':<{width}}  {'count':>8}  {'errors':>7}" + "".join(
        f"  {name:>9}" for name in ("p50 ms", "p95 ms", "p99 ms", "max ms")
    )
    lines = [header, "-" * len(header)]
    rows = [*result.routes.items(), ("all", result.total)]
    for path, stats in rows:
        cells = [_ms(stats, q) for q in (0.5, 0.95, 0.99, 1.0)]
        lines.append(
            f"{path:<{width}}  {stats.latency.count:>8}  {stats.errors:>7}"
            + "".join(f"  {cell:>9}" for cell in cells)
        )
    count = result.total.latency.count
    rate = count / result.elapsed if result.elapsed else 0.0
    lines.append(
        f"{count} requests in {result.elapsed:.1f} s ({rate:.1f}/s)"
        f" with concurrency {result.concurrency}"
    )
    if result.in_flight_at_stop:
        lines.append(
            f"{result.in_flight_at_stop} requests were in flight when sending stopped;"
            f" waited {result.drained_in:.1f} s for their answers"
        )
    if result.abandoned:
        lines.append(
            f"{result.abandoned} requests abandoned unanswered (not counted): the server may"
            " still be serving them"
        )
    for path, stats in result.routes.items():
        if stats.failures:
            listed = ", ".join(f"{name} x{n}" for name, n in stats.failures.most_common())
            lines.append(f"failures of {path}: {listed}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{python_command()} -m demo_app.load",
        description="Send a weighted mix of requests to the demo and print latency percentiles.",
    )
    parser.add_argument(
        "url",
        nargs="?",
        default="http://127.0.0.1:8000",
        help="the demo's base URL (default: %(default)s)",
    )
    parser.add_argument(
        "--mix",
        default=DEFAULT_MIX,
        help="comma-separated PATH=WEIGHT entries, the weight after the last '='"
        " (default: %(default)s)",
    )
    parser.add_argument(
        "-c", "--concurrency", type=int, default=10, help="concurrent workers (default: 10)"
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=float,
        help="seconds to send for, 0 = until stopped (default: 10, or no limit with -n)",
    )
    parser.add_argument(
        "-n",
        "--requests",
        type=int,
        default=0,
        help="send exactly this many requests, however long they take;"
        " 0 = no limit (default)",
    )
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        help="'Name: value' to send with every request, e.g. 'X-Sim-Delay-Ms: 200'",
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="per-request timeout in seconds (default: 30)"
    )
    parser.add_argument("--seed", type=int, help="seed for the route choice, for repeatable runs")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        help="print a live progress line to stderr (default: only when stderr is a terminal)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        mix = parse_mix(args.mix)
        headers = [parse_header(text) for text in args.header]
    except ValueError as exc:
        parser.error(str(exc))
    if args.concurrency < 1:
        parser.error(f"--concurrency={args.concurrency} is invalid: expected an integer >= 1")
    if args.requests < 0:
        parser.error(f"--requests={args.requests} is invalid: expected an integer >= 0"
                     " (0 means no limit)")
    if args.duration is None:
        args.duration = 0.0 if args.requests else DEFAULT_DURATION
    if not 0 <= args.duration < float("inf"):
        parser.error(f"--duration={args.duration} is invalid: expected seconds >= 0"
                     " (0 means no limit)")
    if not args.timeout > 0:
        parser.error(f"--timeout={args.timeout} is invalid: expected seconds > 0")
    progress = args.progress if args.progress is not None else sys.stderr.isatty()

    async def load() -> LoadResult:
        stop, abandon = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():
                abandon.set()
                return
            stop.set()
            if progress:
                print("\nstopping: waiting for the requests in flight (again to abandon them)",
                      file=sys.stderr, flush=True)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        return await run_load(
            args.url,
            mix,
            concurrency=args.concurrency,
            duration=args.duration,
            requests=args.requests,
            headers=headers,
            timeout=args.timeout,
            progress=progress,
            stop=stop,
            abandon=abandon,
            seed=args.seed,
        )

    print(format_table(asyncio.run(load())))


if __name__ == "__main__":
    main()
