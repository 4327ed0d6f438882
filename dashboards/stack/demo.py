"""The demo stack: the upstream simulator, the demo app and one Prometheus on loopback.

Prometheus (the binary from the system packages) runs with a generated configuration that
scrapes the demo every ``scrape_interval`` and evaluates the repository's rule files
(dashboards/prometheus/rules) every ``evaluation_interval``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.servers import free_port

from . import promapi
from .durations import parse_duration
from .panels import grafana_variables
from .processes import Processes, find_binary
from .rules import write_rule_files

if TYPE_CHECKING:
    import subprocess

    from typing_extensions import Self

__all__ = ["JOB_NAME", "Service", "Stack", "demo_services", "prometheus_config"]

JOB_NAME = "loopwatch-demo"  # the same job name as in the docker compose Prometheus config


def prometheus_config(
    targets: Sequence[str],
    rule_files: Iterable[Path],
    *,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    job_name: str = JOB_NAME,
) -> dict[str, Any]:
    """The Prometheus configuration the local stack runs with (written out as JSON, valid YAML)."""
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job_name,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }


@dataclass
class Service:
    """A process of the stack. ``argv`` may contain ``{host}``, ``{port}`` and
    ``{<service>_url}``."""

    name: str
    argv: list[str]
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/"
    scrape: bool = False  # Prometheus scrapes its /metrics


def demo_services(*, demo_port: int = 0, upstream_port: int = 0) -> list[Service]:
    """The upstream simulator and the demo app, as docker-compose.yml runs them."""
    upstream = Service(
        name="upstream",
        argv=[sys.executable, "-m", "demo_app.upstream", "--host", "{host}", "--port", "{port}"],
        port=upstream_port,
    )
    demo = Service(
        name="demo",
        argv=[sys.executable, "-m", "demo_app", "--host", "{host}", "--port", "{port}",
              "--no-upstream"],
        port=demo_port,
        env={"DEMO_UPSTREAM_URL": "{upstream_url}"},
        ready_path="/metrics",
        scrape=True,
    )
    return [upstream, demo]


class Stack:
    """Run services and Prometheus on loopback; use as a context manager.

    ``services`` defaults to :func:`demo_services`. ``extra_targets`` are more
    ``host:port`` addresses for Prometheus to scrape (job ``loopwatch-demo``).
    """

    def __init__(
        self,
        *,
        services: list[Service] | None = None,
        extra_targets: Sequence[str] = (),
        host: str = "127.0.0.1",
        prometheus_port: int = 0,
        data_dir: Path | None = None,
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        alert_for: str | None = None,
        prometheus_bin: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.services = demo_services() if services is None else services
        self.extra_targets = list(extra_targets)
        self.host = host
        self.prometheus_port = prometheus_port or free_port(host)
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.alert_for = alert_for
        self.prometheus_bin = prometheus_bin or find_binary("prometheus")
        self.startup_timeout = startup_timeout
        self._own_data_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="loopwatch-stack-"))
        )
        self.processes = Processes(self.data_dir / "logs")
        for svc in self.services:
            svc.port = svc.port or free_port(host)
        parse_duration(scrape_interval)
        parse_duration(evaluation_interval)
        if alert_for is not None:
            parse_duration(alert_for)

    # -- addresses --------------------------------------------------------------------------
    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.prometheus_port}"

    def url(self, service: str) -> str:
        for svc in self.services:
            if svc.name == service:
                return f"http://{self.host}:{svc.port}"
        raise KeyError(f"no service named {service!r}")

    @property
    def targets(self) -> list[str]:
        return [f"{self.host}:{s.port}" for s in self.services if s.scrape] + self.extra_targets

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            for svc in self.services:
                self._start_service(svc)
            self._start_prometheus()
        except BaseException:
            self.stop()
            raise

    def _start_service(self, svc: Service) -> None:
        subs = {"host": self.host, "port": str(svc.port)}
        subs.update({f"{o.name}_url": f"http://{self.host}:{o.port}" for o in self.services})
        argv = [a.format(**subs) for a in svc.argv]
        env = {k: v.format(**subs) for k, v in svc.env.items()}
        self.processes.spawn(svc.name, argv, env)
        self.processes.wait_ready(
            svc.name, f"http://{self.host}:{svc.port}{svc.ready_path}", self.startup_timeout
        )

    def _start_prometheus(self) -> None:
        rule_files = write_rule_files(self.data_dir / "rules", alert_for=self.alert_for)
        config = prometheus_config(
            self.targets,
            rule_files,
            scrape_interval=self.scrape_interval,
            evaluation_interval=self.evaluation_interval,
        )
        config_path = self.data_dir / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))
        self.processes.spawn(
            "prometheus",
            [
                self.prometheus_bin,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
                f"--web.listen-address={self.host}:{self.prometheus_port}",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
        )

        def ready() -> bool:
            self.processes.check_alive("prometheus")
            with urllib.request.urlopen(f"{self.prometheus_url}/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)

        promapi.wait_for(
            ready, timeout=self.startup_timeout, interval=0.2, what="Prometheus to be ready"
        )

    def start_load(self, *args: str, name: str = "load") -> subprocess.Popen[bytes]:
        """Start the demo's load generator against the demo app; stopped with the stack."""
        argv = [sys.executable, "-m", "demo_app.load", self.url("demo"), *args]
        return self.processes.spawn(name, argv)

    def stop_process(self, name: str) -> None:
        self.processes.stop(name)

    def stop(self) -> None:
        self.processes.stop_all()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- queries ------------------------------------------------------------------------------
    def query(self, expr: str) -> list[dict[str, Any]]:
        return promapi.query(self.prometheus_url, expr)

    def alert_state(self, alertname: str) -> str:
        return promapi.alert_state(self.prometheus_url, alertname)

    def wait_until_scraped(self, timeout: float = 30.0) -> None:
        """Wait until every target has been scraped successfully and rules have run once."""
        want = len(self.targets)

        def scraped() -> bool:
            up = self.query(f'up{{job="{JOB_NAME}"}} == 1')
            recorded = self.query("instance:loopwatch_event_loop_busy_seconds:rate1m")
            return len(up) == want and len(recorded) == want

        promapi.wait_for(
            scraped, timeout=timeout, what=f"{want} target(s) scraped and rules evaluated"
        )

    def panel_variables(self, dashboard: Mapping[str, Any]) -> dict[str, str]:
        return grafana_variables(
            self.prometheus_url, dashboard, scrape_interval=parse_duration(self.scrape_interval)
        )
