"""``python -m dashboards.stack``: the demo stack on loopback until Ctrl-C (or ``--duration``)."""

from __future__ import annotations

import argparse
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from .demo import Stack, demo_services
from .panels import check_panels, format_panel_results, load_dashboard

__all__ = ["interrupt_on_sigterm", "main", "run_until"]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack the way Ctrl-C does


def interrupt_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _interrupt)


def run_until(duration: float, check_alive: object) -> None:
    """Sleep ``duration`` seconds (0: until Ctrl-C), calling ``check_alive()`` every second."""
    deadline = time.monotonic() + duration if duration else math.inf
    try:
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            check_alive()  # type: ignore[operator]
    except KeyboardInterrupt:
        print("stopping", flush=True)
    # A second Ctrl-C must not cut the shutdown short and leave processes behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dashboards.stack",
        description="Run the demo app, the upstream simulator and Prometheus (with loopwatch's "
        "rules) on loopback, without Docker.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument(
        "--prometheus-port", type=int, default=9090, help="0 = any free port (default: %(default)s)"
    )
    p.add_argument(
        "--demo-port", type=int, default=8000, help="0 = any free port (default: %(default)s)"
    )
    p.add_argument(
        "--upstream-port", type=int, default=8001, help="0 = any free port (default: %(default)s)"
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        help="Prometheus data, configuration and logs "
        "(default: a temporary directory, removed on exit)",
    )
    p.add_argument(
        "--scrape-interval",
        default="1s",
        help="scrape and rule evaluation interval (default: %(default)s)",
    )
    p.add_argument(
        "--alert-for",
        metavar="DURATION",
        help="cap every alert's for: at DURATION in the generated rule files (e.g. 10s)",
    )
    p.add_argument(
        "--load", action="store_true", help="also run `python -m demo_app.load` against the demo"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="load generator concurrency (default: %(default)s)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=0,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    p.add_argument(
        "--check-panels",
        action="store_true",
        help="at the end, run every dashboard panel query and exit 1 if any returns no data",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stack = Stack(
        services=demo_services(demo_port=args.demo_port, upstream_port=args.upstream_port),
        host=args.host,
        prometheus_port=args.prometheus_port,
        data_dir=args.data_dir,
        scrape_interval=args.scrape_interval,
        evaluation_interval=args.scrape_interval,
        alert_for=args.alert_for,
    )
    interrupt_on_sigterm()
    with stack:
        print(f"demo app     {stack.url('demo')}  (metrics: {stack.url('demo')}/metrics)")
        print(f"upstream     {stack.url('upstream')}")
        print(f"prometheus   {stack.prometheus_url}  (alerts: {stack.prometheus_url}/alerts)")
        print(f"data and logs in {stack.data_dir}", flush=True)
        if args.load:
            stack.start_load("--duration", "0", "--concurrency", str(args.concurrency))
            print(f"load generator running ({args.concurrency} concurrent)", flush=True)
        run_until(args.duration, stack.processes.check_all_alive)
        if args.check_panels:
            dashboard = load_dashboard()
            results = check_panels(
                stack.prometheus_url, dashboard, stack.panel_variables(dashboard)
            )
            print(format_panel_results(results))
            return 0 if all(r.ok for r in results) else 1
    return 0
