"""The loopwatch observability stack on one machine, without Docker.

Starts the upstream simulator, the demo app and a Prometheus server (the binary from the system
packages) on loopback, with a generated Prometheus configuration that scrapes the demo every
second and evaluates the repository's rule files (dashboards/prometheus/rules) every second::

    python -m dashboards.stack                      # run until Ctrl-C
    python -m dashboards.stack --load               # ... and drive the demo's load generator
    python -m dashboards.stack --load --check-panels --duration 60
                                                    # exit 1 unless every dashboard panel has data

``--alert-for DURATION`` shortens the alerts' hold durations (``for:``) in the generated copy of
the rule files; expressions, thresholds and windows stay exactly as in the repository. Production
holds of 5-10 minutes do not fit in a test; promtool unit tests cover the unmodified files.

The same module is the library the end-to-end test uses: :class:`Stack` runs the processes,
:func:`panel_targets` reads every query out of the Grafana dashboard, :func:`grafana_variables`
computes what Grafana would substitute for the dashboard's variables, and :func:`check_panels`
runs every panel query against Prometheus.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from typing_extensions import Self

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = ROOT / "dashboards"
DASHBOARD_PATH = DASHBOARDS_DIR / "loopwatch.json"
RULES_DIR = DASHBOARDS_DIR / "prometheus" / "rules"
JOB_NAME = "loopwatch-demo"  # the same job name as in the docker compose Prometheus config

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Durations in Prometheus's notation


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def parse_duration(text: str) -> float:
    """``"1m30s"`` -> 90.0 seconds. Raises ValueError on anything else."""
    text = text.strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a Prometheus duration: {text!r} (write e.g. 5s, 1m, 1h30m)")
    return total


def format_duration(seconds: float) -> str:
    """Seconds -> a Prometheus duration string (``90`` -> ``"90s"``, ``0.5`` -> ``"500ms"``)."""
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


# --------------------------------------------------------------------------------------------
# Rule files and Prometheus configuration


def write_rule_files(
    dst: Path, *, alert_for: str | None = None, src: Path = RULES_DIR
) -> list[Path]:
    """Copy the rule files to ``dst``; with ``alert_for``, cap every alert's ``for:`` at it.

    Only the hold durations change: each alerting rule whose ``for`` is longer than
    ``alert_for`` gets ``for: alert_for``. Recording rules, expressions, thresholds, labels and
    annotations are copied unchanged.
    """
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(src.glob("*.yml")):
        out = dst / path.name
        if alert_for is None:
            shutil.copyfile(path, out)
        else:
            import yaml  # type: ignore[import-untyped,unused-ignore]  # only for the override

            cap = parse_duration(alert_for)
            doc = yaml.safe_load(path.read_text())
            for group in doc.get("groups", []):
                for rule in group.get("rules", []):
                    if "alert" in rule and parse_duration(str(rule.get("for", "0s"))) > cap:
                        rule["for"] = alert_for
            out.write_text(
                f"# Generated from {path.relative_to(ROOT)} with every alert's for: capped at "
                f"{alert_for}.\n" + yaml.safe_dump(doc, sort_keys=False, width=1000)
            )
        written.append(out)
    if not written:
        raise FileNotFoundError(f"no rule files (*.yml) in {src}")
    return written


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


# --------------------------------------------------------------------------------------------
# Talking to Prometheus


class PrometheusError(RuntimeError):
    pass


def _get_json(url: str, timeout: float = 10.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:  # Prometheus explains bad queries in a 400 body
        try:
            body = json.load(exc)
        except ValueError:
            raise PrometheusError(f"GET {url}: HTTP {exc.code}") from exc
    if body.get("status") != "success":
        raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(prometheus_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """Instant query via /api/v1/query; returns the ``result`` list (vector results only)."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = _get_json(f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode(params)}")
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    if data["resultType"] != "vector":
        raise PrometheusError(f"{expr!r} returned a {data['resultType']}, not an instant vector")
    return list(data["result"])


def label_values(prometheus_url: str, label: str, match: str | None = None) -> list[str]:
    params = {"match[]": match} if match else {}
    qs = f"?{urllib.parse.urlencode(params)}" if params else ""
    return sorted(_get_json(f"{prometheus_url}/api/v1/label/{label}/values{qs}"))


def alerting_rules(prometheus_url: str) -> list[dict[str, Any]]:
    data = _get_json(f"{prometheus_url}/api/v1/rules?type=alert")
    return [rule for group in data["groups"] for rule in group["rules"]]


_STATE_ORDER = {"inactive": 0, "pending": 1, "firing": 2}


def alert_state(prometheus_url: str, alertname: str) -> str:
    """``inactive``, ``pending`` or ``firing``: the worst state of the rules named ``alertname``."""
    states = [str(r["state"]) for r in alerting_rules(prometheus_url) if r["name"] == alertname]
    if not states:
        raise PrometheusError(f"Prometheus has no alerting rule named {alertname!r}")
    return max(states, key=_STATE_ORDER.__getitem__)


def wait_for(
    predicate: Callable[[], T], *, timeout: float, interval: float = 0.5, what: str = "condition"
) -> T:
    """Call ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, PrometheusError) as exc:
            last_exc = exc
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout:.0f}s waiting for {what}"
            if last_exc is not None:
                msg += f" (last error: {last_exc})"
            raise TimeoutError(msg)
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# The Grafana dashboard's queries


@dataclass(frozen=True)
class PanelTarget:
    panel: str
    ref_id: str
    expr: str
    instant: bool

    @property
    def name(self) -> str:
        return f"{self.panel} [{self.ref_id}]"


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_targets(dashboard: Mapping[str, Any]) -> list[PanelTarget]:
    """Every PromQL query of every panel, in dashboard order."""
    out = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if not target.get("hide") and target.get("expr"):
                out.append(
                    PanelTarget(
                        panel=panel.get("title", f"panel {panel.get('id')}"),
                        ref_id=target.get("refId", "?"),
                        expr=target["expr"],
                        instant=bool(target.get("instant")) and not target.get("range"),
                    )
                )
    return out


_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::[\w]+)?\}|\[\[(\w+)\]\]")
_REGEX_SPECIAL = re.compile(r"([\\^$.|?*+()\[\]{}])")


def _grafana_regex_escape(value: str) -> str:
    """What Grafana does to one value of a multi-value variable in a Prometheus query."""
    return _REGEX_SPECIAL.sub(r"\\\\\1", value)  # escaped for the regex, then for the string


def expand_variables(expr: str, values: Mapping[str, str]) -> str:
    """Substitute ``$name``, ``${name}`` and ``[[name]]``; KeyError for an unknown variable."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"no value for dashboard variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(sub, expr)


def grafana_variables(
    prometheus_url: str,
    dashboard: Mapping[str, Any],
    *,
    scrape_interval: float,
    time_range: float = 900.0,
    max_data_points: int = 1000,
) -> dict[str, str]:
    """The values Grafana would substitute with every template variable left at "All".

    Query variables are resolved with Prometheus's label-values API (what Grafana's
    ``label_values(metric{...}, label)`` does); "All" becomes the variable's ``allValue`` or,
    without one, ``(v1|v2|...)`` of the regex-escaped values. The built-in interval variables
    follow Grafana's rules for a ``time_range``-second dashboard range whose datasource's
    scrape interval ("timeInterval") is ``scrape_interval``:
    ``$__rate_interval = max($__interval + scrape interval, 4 * scrape interval)``.
    """
    interval = max(scrape_interval, time_range / max_data_points)
    values = {
        "__interval": format_duration(interval),
        "__rate_interval": format_duration(max(interval + scrape_interval, 4 * scrape_interval)),
        "__range": format_duration(time_range),
    }
    for var in dashboard.get("templating", {}).get("list", []):
        name, kind = var["name"], var.get("type")
        if kind == "datasource":
            values[name] = "prometheus"
            continue
        if kind != "query":
            raise ValueError(f"dashboard variable ${name} has type {kind!r}, which is not handled")
        q = var.get("query")
        text = q.get("query", "") if isinstance(q, dict) else str(q)
        m = re.fullmatch(r"\s*label_values\((?:(.*),\s*)?(\w+)\)\s*", text)
        if not m:
            raise ValueError(f"dashboard variable ${name}: cannot evaluate {text!r}")
        match = expand_variables(m.group(1), values) if m.group(1) else None
        found = label_values(prometheus_url, m.group(2), match)
        if not found:
            raise PrometheusError(f"dashboard variable ${name}: {text!r} found no values")
        if var.get("includeAll") and var.get("allValue"):
            values[name] = var["allValue"]
        else:
            values[name] = "(" + "|".join(_grafana_regex_escape(v) for v in found) + ")"
    return values


@dataclass
class PanelResult:
    target: PanelTarget
    expr: str
    series: int = 0
    finite: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finite > 0


def check_panels(
    prometheus_url: str, dashboard: Mapping[str, Any], variables: Mapping[str, str]
) -> list[PanelResult]:
    """Run every panel query (variables substituted) as an instant query.

    A query passes when it returns at least one series with a finite value: a histogram
    quantile over windows without observations returns NaN, which Grafana draws as nothing.
    """
    results = []
    for target in panel_targets(dashboard):
        expr = expand_variables(target.expr, variables)
        res = PanelResult(target=target, expr=expr)
        try:
            samples = query(prometheus_url, expr)
        except PrometheusError as exc:
            res.error = str(exc)
        else:
            res.series = len(samples)
            res.finite = sum(1 for s in samples if math.isfinite(float(s["value"][1])))
        results.append(res)
    return results


def format_panel_results(results: Iterable[PanelResult]) -> str:
    lines = []
    for r in results:
        status = "ok  " if r.ok else "FAIL"
        detail = r.error or f"{r.series} series, {r.finite} finite"
        lines.append(f"{status} {r.target.name}: {detail}")
        if not r.ok:
            lines.append(f"       {r.expr}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_prometheus() -> str:
    found = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not found and Path("/usr/bin/prometheus").exists():
        found = "/usr/bin/prometheus"
    if not found:
        raise FileNotFoundError(
            "no prometheus binary: install the Debian package `prometheus` or set PROMETHEUS_BIN"
        )
    return found


@dataclass
class Service:
    """A process of the stack. ``argv`` may contain ``{host}`` and ``{port}``."""

    name: str
    argv: list[str]
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/"
    scrape: bool = False  # Prometheus scrapes its /metrics
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def demo_services(*, demo_port: int = 0, upstream_port: int = 0) -> list[Service]:
    """The upstream simulator and the demo app, as docker-compose.yml runs them."""
    upstream = Service(
        name="upstream",
        argv=[sys.executable, "-m", "demo_app.upstream", "--host", "{host}", "--port", "{port}"],
        port=upstream_port,
    )
    demo = Service(
        name="demo",
        argv=[
            sys.executable,
            "-m",
            "demo_app",
            "--host",
            "{host}",
            "--port",
            "{port}",
            "--no-upstream",
        ],
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
        self.prometheus_bin = prometheus_bin or find_prometheus()
        self.startup_timeout = startup_timeout
        self._own_data_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="loopwatch-stack-"))
        )
        self.log_dir = self.data_dir / "logs"
        self.prometheus: subprocess.Popen[bytes] | None = None
        self._extra: list[tuple[str, subprocess.Popen[bytes]]] = []
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
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for svc in self.services:
                self._start_service(svc)
            self._start_prometheus()
        except BaseException:
            self.stop()
            raise

    def _substitutions(self, svc: Service) -> dict[str, str]:
        subs = {"host": self.host, "port": str(svc.port)}
        for other in self.services:
            subs[f"{other.name}_url"] = f"http://{self.host}:{other.port}"
        return subs

    def _spawn(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        full_env = dict(os.environ)
        full_env.update(env or {})
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps its own fd
        try:
            return subprocess.Popen(
                argv,
                cwd=ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def _start_service(self, svc: Service) -> None:
        subs = self._substitutions(svc)
        argv = [a.format(**subs) for a in svc.argv]
        env = {k: v.format(**subs) for k, v in svc.env.items()}
        svc.process = self._spawn(svc.name, argv, env)
        url = f"http://{self.host}:{svc.port}{svc.ready_path}"

        def ready() -> bool:
            self._check_alive(svc.name, svc.process)
            try:
                urllib.request.urlopen(url, timeout=1).close()
            except urllib.error.HTTPError:
                pass  # it answers HTTP: up
            return True

        wait_for(ready, timeout=self.startup_timeout, interval=0.1, what=f"{svc.name} on {url}")

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
        self.prometheus = self._spawn(
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
            self._check_alive("prometheus", self.prometheus)
            with urllib.request.urlopen(f"{self.prometheus_url}/-/ready", timeout=1) as resp:
                return bool(resp.status == 200)

        wait_for(ready, timeout=self.startup_timeout, interval=0.2, what="Prometheus to be ready")

    def _check_alive(self, name: str, proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is not None:
            log = (self.log_dir / f"{name}.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{name} exited with status {proc.returncode}; its log:\n{log}")

    def start_load(self, *args: str, name: str = "load") -> subprocess.Popen[bytes]:
        """Start the demo's load generator against the demo app; stopped with the stack."""
        argv = [sys.executable, "-m", "demo_app.load", self.url("demo"), *args]
        proc = self._spawn(name, argv)
        self._extra.append((name, proc))
        return proc

    def stop_process(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM the process group this stack started for ``proc``; SIGKILL if it lingers."""
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for _, proc in reversed(self._extra):
            self.stop_process(proc)
        if self.prometheus is not None:
            self.stop_process(self.prometheus)
        for svc in reversed(self.services):
            if svc.process is not None:
                self.stop_process(svc.process)
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- queries ------------------------------------------------------------------------------
    def query(self, expr: str) -> list[dict[str, Any]]:
        return query(self.prometheus_url, expr)

    def alert_state(self, alertname: str) -> str:
        return alert_state(self.prometheus_url, alertname)

    def wait_until_scraped(self, timeout: float = 30.0) -> None:
        """Wait until every target has been scraped successfully and rules have run once."""
        want = len(self.targets)

        def scraped() -> bool:
            up = self.query(f'up{{job="{JOB_NAME}"}} == 1')
            recorded = self.query("instance:loopwatch_event_loop_busy_seconds:rate1m")
            return len(up) == want and len(recorded) == want

        wait_for(scraped, timeout=timeout, what=f"{want} target(s) scraped and rules evaluated")

    def panel_variables(self, dashboard: Mapping[str, Any]) -> dict[str, str]:
        return grafana_variables(
            self.prometheus_url, dashboard, scrape_interval=parse_duration(self.scrape_interval)
        )


# --------------------------------------------------------------------------------------------
# Command line


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the stack the way Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dashboards.stack",
        description="Run the demo app, the upstream simulator and Prometheus (with loopwatch's "
        "rules) on loopback, without Docker.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--prometheus-port", type=int, default=9090, help="0 = any free port (default: %(default)s)"
    )
    parser.add_argument(
        "--demo-port", type=int, default=8000, help="0 = any free port (default: %(default)s)"
    )
    parser.add_argument(
        "--upstream-port", type=int, default=8001, help="0 = any free port (default: %(default)s)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="Prometheus data, configuration and logs "
        "(default: a temporary directory, removed on exit)",
    )
    parser.add_argument(
        "--scrape-interval",
        default="1s",
        help="scrape and rule evaluation interval (default: %(default)s)",
    )
    parser.add_argument(
        "--alert-for",
        metavar="DURATION",
        help="cap every alert's for: at DURATION in the generated rule files (e.g. 10s)",
    )
    parser.add_argument(
        "--load", action="store_true", help="also run `python -m demo_app.load` against the demo"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="load generator concurrency (default: %(default)s)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=0,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--check-panels",
        action="store_true",
        help="at the end, run every dashboard panel query and exit 1 if any returns no data",
    )
    args = parser.parse_args(argv)

    stack = Stack(
        services=demo_services(demo_port=args.demo_port, upstream_port=args.upstream_port),
        host=args.host,
        prometheus_port=args.prometheus_port,
        data_dir=args.data_dir,
        scrape_interval=args.scrape_interval,
        evaluation_interval=args.scrape_interval,
        alert_for=args.alert_for,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    with stack:
        print(f"demo app     {stack.url('demo')}  (metrics: {stack.url('demo')}/metrics)")
        print(f"upstream     {stack.url('upstream')}")
        print(f"prometheus   {stack.prometheus_url}  (alerts: {stack.prometheus_url}/alerts)")
        print(f"data and logs in {stack.data_dir}", flush=True)
        if args.load:
            stack.start_load("--duration", "0", "--concurrency", str(args.concurrency))
            print(f"load generator running ({args.concurrency} concurrent)", flush=True)
        try:
            deadline = time.monotonic() + args.duration if args.duration else math.inf
            while time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                for name, proc in [(s.name, s.process) for s in stack.services] + [
                    ("prometheus", stack.prometheus)
                ]:
                    stack._check_alive(name, proc)
        except KeyboardInterrupt:
            print("stopping", flush=True)
        if args.check_panels:
            dashboard = load_dashboard()
            results = check_panels(
                stack.prometheus_url, dashboard, stack.panel_variables(dashboard)
            )
            print(format_panel_results(results))
            return 0 if all(r.ok for r in results) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
