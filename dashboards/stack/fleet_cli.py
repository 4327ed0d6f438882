"""``python -m dashboards.stack.fleet``: the fleet on loopback until Ctrl-C (or ``--duration``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .cli import interrupt_on_sigterm, run_until
from .fleet import Fleet

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dashboards.stack.fleet",
        description="Run a fleet of loopwatch app instances (uvicorn --workers, multiprocess "
        "metrics), Prometheus in agent mode remote-writing to VictoriaMetrics, vmalert with "
        "loopwatch's rules and Alertmanager, on loopback, without Docker.",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=2,
        help="instances of job `api` (default: %(default)s); job `canary` has one more",
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes per instance (default: 2)"
    )
    parser.add_argument(
        "--vm-port", type=int, default=8428, help="VictoriaMetrics; 0 = any free port "
        "(default: %(default)s)"
    )
    parser.add_argument(
        "--vmalert-port", type=int, default=8880, help="vmalert; 0 = any free port "
        "(default: %(default)s)"
    )
    parser.add_argument(
        "--alertmanager-port", type=int, default=9093, help="Alertmanager; 0 = any free port "
        "(default: %(default)s)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="data, configuration and logs (default: a temporary directory, removed on exit)",
    )
    parser.add_argument(
        "--scrape-interval", default="2s", help="the agent's scrape interval (default: %(default)s)"
    )
    parser.add_argument(
        "--alert-for",
        metavar="DURATION",
        help="cap every alert's for: at DURATION in vmalert's copy of the rules (e.g. 10s)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=0,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error(f"--instances {args.instances}: allowed: 1 or more")
    jobs = {"api": tuple(f"api-{i}" for i in range(1, args.instances + 1)), "canary": ("canary-1",)}
    fleet = Fleet(
        jobs=jobs,
        workers=args.workers,
        data_dir=args.data_dir,
        scrape_interval=args.scrape_interval,
        alert_for=args.alert_for,
        ports={
            "victoria-metrics": args.vm_port,
            "vmalert": args.vmalert_port,
            "alertmanager": args.alertmanager_port,
        },
    )
    interrupt_on_sigterm()
    with fleet:
        for name, inst in fleet.instances.items():
            print(f"{name:<16} {fleet.url(name)}  job={inst.job}, {inst.workers} workers "
                  f"(try {fleet.url(name)}/block?ms=300)")
        print(f"{'victoria-metrics':<16} {fleet.vm_url}  (Prometheus API; UI: {fleet.vm_url}/vmui)")
        print(f"{'vmalert':<16} {fleet.vmalert_url}  (alerts: {fleet.vmalert_url}/api/v1/alerts)")
        print(f"{'alertmanager':<16} {fleet.url('alertmanager')}")
        print(f"data and logs in {fleet.data_dir}", flush=True)
        run_until(args.duration, fleet.processes.check_all_alive)
    return 0
