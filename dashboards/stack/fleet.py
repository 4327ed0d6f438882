"""A fleet on one machine, without Docker: several multi-worker app instances, Prometheus in
agent mode scraping them and remote-writing to VictoriaMetrics, and vmalert evaluating the
repository's recording and alerting rules against VictoriaMetrics, notifying Alertmanager::

    instance (uvicorn --workers N, PROMETHEUS_MULTIPROC_DIR of its own) x M
        <- scraped by Prometheus --enable-feature=agent
        -> remote_write -> VictoriaMetrics (single node) <- queried by vmalert, Grafana
                                                        <- recorded series written by vmalert
                           vmalert -> Alertmanager

Each instance serves :mod:`dashboards.stack.fleet_app` with ``uvicorn --workers``; its
metrics are aggregated over its workers by prometheus_client's multiprocess mode. Restarting
an instance empties its multiprocess directory, as a new container would: its counters start
again from zero (a counter reset), on the same address (the same ``instance`` label).

``python -m dashboards.stack.fleet`` runs it until Ctrl-C (:mod:`.fleet_cli`).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.servers import free_port

from . import promapi
from .durations import parse_duration
from .panels import grafana_variables
from .processes import ROOT, Processes, find_binary
from .rules import write_rule_files

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["DEFAULT_JOBS", "Fleet", "Instance", "agent_config"]

#: job -> instance names: two jobs, so that one can vanish while the other stays.
DEFAULT_JOBS: dict[str, tuple[str, ...]] = {"api": ("api-1", "api-2"), "canary": ("canary-1",)}
APP = "dashboards.stack.fleet_app:app"
ALERTMANAGER_CONFIG = ROOT / "dashboards" / "alertmanager" / "alertmanager.yml"


@dataclass
class Instance:
    """One app instance: ``uvicorn --workers`` on ``host:port``, a scrape target of ``job``."""

    name: str
    job: str
    port: int
    workers: int
    multiproc_dir: Path

    def target(self, host: str) -> str:
        return f"{host}:{self.port}"


def agent_config(
    jobs: Mapping[str, Sequence[str]],
    remote_write_url: str,
    *,
    scrape_interval: str,
    scrape_timeout: str,
) -> dict[str, Any]:
    """Prometheus agent configuration: scrape ``jobs`` (job -> targets), remote-write it all.

    Agent mode has no rules and no local queries: it scrapes, keeps a write-ahead log, and
    sends every sample (``up`` included) to the remote-write endpoint.
    """
    return {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_timeout},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
            for job, targets in jobs.items()
        ],
        "remote_write": [
            {
                "url": remote_write_url,
                # Send within a second of the scrape (the default waits up to 5 s).
                "queue_config": {"batch_send_deadline": "1s", "min_backoff": "100ms"},
            }
        ],
    }


class Fleet:
    """Run the fleet on loopback; use as a context manager.

    ``jobs`` maps each job to its instances' names; every instance runs ``workers`` worker
    processes. ``alert_for`` caps every alert's ``for:`` in vmalert's copy of the rules
    (expressions, thresholds and windows stay as in the repository). ``thread_limit`` sets
    each worker's AnyIO thread limiter (``FLEET_THREAD_LIMIT``); ``block_threshold`` is
    loopwatch's (``LOOPWATCH_BLOCK_THRESHOLD``).
    """

    def __init__(
        self,
        *,
        jobs: Mapping[str, Sequence[str]] = DEFAULT_JOBS,
        workers: int = 2,
        host: str = "127.0.0.1",
        data_dir: Path | None = None,
        scrape_interval: str = "2s",
        evaluation_interval: str = "1s",
        alert_for: str | None = None,
        thread_limit: int | None = None,
        block_threshold: float | None = None,
        ports: Mapping[str, int] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers!r}; allowed: 1 or more worker processes")
        names = [name for instances in jobs.values() for name in instances]
        if not names or len(names) != len(set(names)):
            raise ValueError(f"jobs={dict(jobs)!r}; allowed: unique instance names, at least one")
        for text in (scrape_interval, evaluation_interval, *([alert_for] if alert_for else [])):
            parse_duration(text)
        self.host = host
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.alert_for = alert_for
        self.thread_limit = thread_limit
        self.block_threshold = block_threshold
        self.startup_timeout = startup_timeout
        self.binaries = {
            name: find_binary(name)
            for name in ("prometheus", "victoria-metrics", "vmalert", "prometheus-alertmanager")
        }
        self._own_data_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="loopwatch-fleet-"))
        )
        self.processes = Processes(self.data_dir / "logs")
        ports = dict(ports or {})
        self.ports = {
            name: ports.pop(name, 0) or free_port(host)
            for name in ("victoria-metrics", "vmalert", "alertmanager", "agent")
        }
        self.instances = {
            name: Instance(
                name=name,
                job=job,
                port=ports.pop(name, 0) or free_port(host),
                workers=workers,
                multiproc_dir=self.data_dir / "multiproc" / name,
            )
            for job, instances in jobs.items()
            for name in instances
        }
        if ports:
            raise ValueError(f"ports for unknown processes: {sorted(ports)}")

    # -- addresses --------------------------------------------------------------------------
    def url(self, name: str) -> str:
        """``http://host:port`` of an instance or of victoria-metrics, vmalert, alertmanager,
        agent."""
        port = self.instances[name].port if name in self.instances else self.ports[name]
        return f"http://{self.host}:{port}"

    @property
    def vm_url(self) -> str:
        return self.url("victoria-metrics")

    @property
    def vmalert_url(self) -> str:
        return self.url("vmalert")

    def target(self, name: str) -> str:
        """The ``instance`` label of an app instance."""
        return self.instances[name].target(self.host)

    def jobs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for inst in self.instances.values():
            out.setdefault(inst.job, []).append(inst.target(self.host))
        return out

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._start_victoria_metrics()
            self._start_alertmanager()
            for name in self.instances:
                self._spawn_instance(name)
            for name in self.instances:
                self._wait_instance(name)
            self._start_agent()
            self._start_vmalert()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.processes.stop_all()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _start_victoria_metrics(self) -> None:
        self.processes.spawn(
            "victoria-metrics",
            [
                self.binaries["victoria-metrics"],
                f"-storageDataPath={self.data_dir / 'victoria-metrics'}",
                f"-httpListenAddr={self.host}:{self.ports['victoria-metrics']}",
                "-retentionPeriod=1d",
                # Samples are queryable as soon as they arrive (default: 30 s later), and no
                # query result is cached: the test reads what was just written.
                "-search.latencyOffset=0s",
                "-search.disableCache",
                "-loggerLevel=WARN",
            ],
        )
        self.processes.wait_ready(
            "victoria-metrics", f"{self.vm_url}/health", self.startup_timeout
        )

    def _start_alertmanager(self) -> None:
        self.processes.spawn(
            "alertmanager",
            [
                self.binaries["prometheus-alertmanager"],
                f"--config.file={ALERTMANAGER_CONFIG}",
                f"--storage.path={self.data_dir / 'alertmanager'}",
                f"--web.listen-address={self.host}:{self.ports['alertmanager']}",
                # A single Alertmanager: no gossip port to bind.
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
        )
        self.processes.wait_ready(
            "alertmanager", f"{self.url('alertmanager')}/-/ready", self.startup_timeout
        )

    def _spawn_instance(self, name: str) -> None:
        inst = self.instances[name]
        shutil.rmtree(inst.multiproc_dir, ignore_errors=True)  # a new process starts at zero
        inst.multiproc_dir.mkdir(parents=True)
        env = {"PROMETHEUS_MULTIPROC_DIR": str(inst.multiproc_dir)}
        if self.thread_limit is not None:
            env["FLEET_THREAD_LIMIT"] = str(self.thread_limit)
        if self.block_threshold is not None:
            env["LOOPWATCH_BLOCK_THRESHOLD"] = str(self.block_threshold)
        self.processes.spawn(
            name,
            [
                sys.executable, "-m", "uvicorn", APP,
                "--host", self.host, "--port", str(inst.port),
                "--workers", str(inst.workers),
                "--log-level", "warning", "--no-access-log",
            ],
            env,
        )

    def _wait_instance(self, name: str) -> None:
        self.processes.wait_ready(name, f"{self.url(name)}/metrics", self.startup_timeout)

    def _start_agent(self) -> None:
        config = agent_config(
            self.jobs(),
            f"{self.vm_url}/api/v1/write",
            scrape_interval=self.scrape_interval,
            scrape_timeout=self.scrape_interval,
        )
        config_path = self.data_dir / "agent.yml"
        config_path.write_text(json.dumps(config, indent=2))
        self.processes.spawn(
            "agent",
            [
                self.binaries["prometheus"],
                "--enable-feature=agent",
                f"--config.file={config_path}",
                f"--storage.agent.path={self.data_dir / 'agent'}",
                f"--web.listen-address={self.host}:{self.ports['agent']}",
                "--log.level=warn",
            ],
        )
        self.processes.wait_ready("agent", f"{self.url('agent')}/-/ready", self.startup_timeout)

    def _start_vmalert(self) -> None:
        rules = write_rule_files(self.data_dir / "rules", alert_for=self.alert_for)
        self.processes.spawn(
            "vmalert",
            [
                self.binaries["vmalert"],
                *[f"-rule={path}" for path in rules],
                f"-datasource.url={self.vm_url}",
                f"-remoteWrite.url={self.vm_url}",
                "-remoteWrite.flushInterval=1s",
                f"-notifier.url={self.url('alertmanager')}",
                f"-evaluationInterval={self.evaluation_interval}",
                f"-httpListenAddr={self.host}:{self.ports['vmalert']}",
                f"-external.url={self.vm_url}",
                "-loggerLevel=WARN",
            ],
        )
        self.processes.wait_ready("vmalert", f"{self.vmalert_url}/-/healthy", self.startup_timeout)

    # -- instances ------------------------------------------------------------------------------
    def stop_instance(self, name: str) -> None:
        """Stop an instance (every worker): its target goes down."""
        self.instances[name]  # KeyError for an unknown name
        self.processes.stop(name)

    def start_instance(self, name: str) -> None:
        """(Re)start an instance with an empty multiprocess directory: counters from zero."""
        self._spawn_instance(name)
        self._wait_instance(name)

    # -- queries --------------------------------------------------------------------------------
    def query(self, expr: str) -> list[dict[str, Any]]:
        return promapi.query(self.vm_url, expr)

    def alerts(self) -> list[dict[str, Any]]:
        """vmalert's active alerts (pending and firing), each with ``labels`` and ``state``."""
        data = promapi.get_json(f"{self.vmalert_url}/api/v1/alerts")
        return list(data["alerts"] or [])  # vmalert answers null for none

    def alertmanager_alerts(self) -> list[dict[str, Any]]:
        """What Alertmanager received and holds (API v2), each with ``labels`` and ``status``."""
        url = f"{self.url('alertmanager')}/api/v2/alerts?" + urllib.parse.urlencode(
            {"active": "true", "silenced": "true", "inhibited": "true"}
        )
        with urllib.request.urlopen(url, timeout=10) as resp:
            return list(json.load(resp))

    def wait_until_scraped(self, timeout: float = 60.0) -> None:
        """Wait until VictoriaMetrics has every target up and vmalert's records of each."""
        want = {self.target(name) for name in self.instances}

        def scraped() -> bool:
            up = {s["metric"]["instance"] for s in self.query("up == 1")}
            recorded = {
                s["metric"]["instance"]
                for s in self.query("instance:loopwatch_event_loop_busy_seconds:rate1m")
            }
            return want <= up and want <= recorded

        promapi.wait_for(
            scraped, timeout=timeout, what=f"{sorted(want)} scraped, remote-written, recorded"
        )

    def panel_variables(
        self, dashboard: Mapping[str, Any], selected: Mapping[str, Sequence[str]] | None = None
    ) -> dict[str, str]:
        return grafana_variables(
            self.vm_url,
            dashboard,
            scrape_interval=parse_duration(self.scrape_interval),
            selected=selected,
        )


if __name__ == "__main__":
    from .fleet_cli import main

    sys.exit(main())
