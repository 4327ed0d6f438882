"""The demo's published contract, checked by a client nobody here wrote: Schemathesis.

The Schemathesis CLI reads the demo's own ``/openapi.json`` and sends every operation
inputs generated from it and beyond it (``--mode all``), with all of its checks on: every
answer's status, content type, headers and body must be declared, invalid input refused,
valid input accepted. The demo runs as users run it (``python -m demo_app --no-upstream``,
a real uvicorn on loopback) against the upstream simulator, with loopwatch and without,
and once with the simulator injecting faults on every upstream route.

Afterwards loopwatch must have stayed exact: its route labels are all templates, its
internal-error counter is 0, and no generated value shows up in ``/metrics``, the block
events or the demo's log.

Bounded for CI: seeded, a fixed number of examples per operation, and the anti-patterns'
``ms`` shrunk by a hook (:func:`before_call`) so the blocking routes block for
milliseconds, not for up to the 5 s their schema allows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest_demo import serve_simulator
from harness.servers import free_port, serve_in_subprocess
from prometheus_client.parser import text_string_to_metric_families

from demo_app.faults import Behaviour

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
SEED = 23
EXAMPLES = 12
#: The demo's upstream timeout in the fault pass: a hung upstream is a 504 within it.
TIMEOUT = 0.5
#: Route labels that are not operations of the schema but are the demo's own.
NON_API_LABELS = {"<unmatched>", "<none>", "<gc>"}


def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """A Schemathesis hook: an anti-pattern's valid ``ms`` (0..5000) becomes 0..30 ms.

    Invalid values are left as generated, so the routes' refusal of them is still tested.
    """
    ms = (case.query or {}).get("ms")
    if not case.path.startswith("/antipatterns/") or ms is None:
        return
    text = str(ms)
    if text.isdigit() and int(text) <= 5000:
        case.query["ms"] = int(text) % 31


if os.environ.get("SCHEMATHESIS_HOOKS") == __name__:  # imported by the Schemathesis CLI
    import schemathesis

    schemathesis.hook(before_call)


#: The fault pass: each upstream route of the simulator fails its own way, so every mapped
#: error (502 for each kind of upstream failure, 504, 404) is produced for real.
FAULTS = {
    "/posts": Behaviour(drop="reset"),
    "/weather": Behaviour(garbage=True),
    "/products": Behaviour(error_rate=0.5),
    "/users": Behaviour(error_rate=0.2, jitter_ms=800),  # past TIMEOUT: a 504 now and then
    "/analytics": Behaviour(hang=True),
}


@dataclass
class Pass:
    id: str
    loopwatch: bool
    faults: bool


WATCHED = [
    pytest.param(Pass("loopwatch", loopwatch=True, faults=False), id="loopwatch"),
    pytest.param(Pass("faults", loopwatch=True, faults=True), id="upstream-faults"),
]
PASSES = [
    *WATCHED,
    pytest.param(Pass("bare", loopwatch=False, faults=False), id="without-loopwatch"),
]


def config_toml(faults: bool) -> str:
    """Schemathesis' settings: all checks; under injected faults a documented 502 or 504
    is the right answer to a valid request, so those two count as accepted there."""
    if not faults:
        return ""
    statuses = '["2xx", "404", "502", "504"]'
    return (
        f"[checks.positive_data_acceptance]\nexpected-statuses = {statuses}\n"
        f'[checks.not_a_server_error]\nexpected-statuses = ["1xx", "2xx", "3xx", "4xx", '
        f'"502", "504"]\n'
    )


@dataclass
class Run:
    output: str
    returncode: int
    sent: list[dict[str, Any]]
    #: The status of every answer Schemathesis got.
    statuses: set[int]
    metrics: str
    events: str
    log: str
    schema: dict[str, Any]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Pass], Run]:
    """Each pass, run once for all the tests that look at it."""
    workdir = tmp_path_factory.mktemp("contract")
    done: dict[str, Run] = {}

    def get(p: Pass) -> Run:
        if p.id not in done:
            done[p.id] = fuzz(p, workdir)
        return done[p.id]

    return get


def fuzz(p: Pass, workdir: Path) -> Run:
    port = free_port()
    rules = FAULTS if p.faults else None
    log_path = workdir / f"{p.id}.log"
    with serve_simulator(rules=rules) as (upstream_url, _):
        env: dict[str, str | None] = {"DEMO_UPSTREAM_URL": upstream_url}
        if p.faults:  # a hung or slow upstream is a 504 soon
            env.update(DEMO_TIMEOUT_SECONDS=str(TIMEOUT), DEMO_CONNECT_TIMEOUT_SECONDS=str(TIMEOUT))
        args = ["-m", "demo_app", "--no-upstream", "--port", str(port)]
        args += [] if p.loopwatch else ["--no-loopwatch"]
        with serve_in_subprocess(args, port=port, env=env, path="/openapi.json") as demo:
            base = f"http://127.0.0.1:{port}"
            config = workdir / f"{p.id}.toml"
            config.write_text(config_toml(p.faults))
            har = workdir / f"{p.id}.har"
            command = [
                str(SCHEMATHESIS), "--config-file", str(config), "--no-color",
                "run", f"{base}/openapi.json",
                "--checks", "all", "--mode", "all",
                "--max-examples", str(EXAMPLES), "--seed", str(SEED),
                "--workers", "1", "--request-timeout", "10",
                "--suppress-health-check", "too_slow",
                "--report", "har", "--report-har-path", str(har),
            ]
            hooks_env = {
                **os.environ,
                "SCHEMATHESIS_HOOKS": __name__,
                "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
            }
            done = subprocess.run(command, cwd=workdir, env=hooks_env, capture_output=True,
                                  text=True, timeout=600)
            schema = httpx.get(f"{base}/openapi.json").json()
            metrics = httpx.get(f"{base}/metrics/").text if p.loopwatch else ""
            events = httpx.get(f"{base}/loopwatch/events/").text if p.loopwatch else ""
            demo.terminate()
            log = demo.communicate(timeout=15)[0].decode(errors="replace")
    log_path.write_text(log)
    entries = json.loads(har.read_text())["log"]["entries"]
    sent = [entry["request"] for entry in entries]
    statuses = {entry["response"]["status"] for entry in entries}
    return Run(done.stdout + done.stderr, done.returncode, sent, statuses, metrics, events, log,
               schema)


@pytest.mark.parametrize("p", PASSES)
def test_schemathesis_finds_the_contract_kept(runs: Callable[[Pass], Run], p: Pass) -> None:
    run = runs(p)
    assert run.returncode == 0, run.output[-12000:]
    assert len(run.sent) > 100, run.output[-3000:]
    # Valid and invalid input were both sent; under faults, the upstream's failures answered.
    assert {200, 422} <= run.statuses, run.statuses
    if p.faults:
        assert {502, 504} <= run.statuses, run.statuses


def templates(schema: dict[str, Any]) -> set[str]:
    return set(schema["paths"])


def route_labels(metrics: str) -> set[str]:
    return {
        sample.labels["route"]
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if "route" in sample.labels
    }


@pytest.mark.parametrize("p", WATCHED)
def test_loopwatch_labels_every_request_by_its_template(
    runs: Callable[[Pass], Run], p: Pass
) -> None:
    run = runs(p)
    labels = route_labels(run.metrics)
    api = templates(run.schema)
    assert labels & api, labels  # the operations were counted
    assert labels - api <= NON_API_LABELS | {"/openapi.json"}, labels - api


@pytest.mark.parametrize("p", WATCHED)
def test_loopwatch_had_no_internal_error(runs: Callable[[Pass], Run], p: Pass) -> None:
    run = runs(p)
    (value,) = [
        sample.value
        for family in text_string_to_metric_families(run.metrics)
        for sample in family.samples
        if sample.name == "loopwatch_internal_errors_total"
    ]
    assert value == 0


#: The demo's and loopwatch's source: the words they write by themselves.
_OWN_TEXT = "\n".join(
    path.read_text() for package in ("demo_app", "loopwatch")
    for path in sorted((ROOT / package).glob("*.py"))
)
#: Generated values too plain to trace in text full of numbers, punctuation and short words
#: (a number in a route label would still be caught: labels are checked to be templates).
_PLAIN = re.compile(r"^(.{1,3}|[-+]?[\d.eE+-]+|true|false|null|none)$", re.IGNORECASE | re.DOTALL)


def generated_values(sent: list[dict[str, Any]], schema: dict[str, Any]) -> set[str]:
    """The values Schemathesis put in paths, query strings (names too) and headers."""
    literal = {part for path in templates(schema) for part in path.split("/")}
    values: set[str] = set()
    for request in sent:
        url = urllib.parse.urlsplit(request["url"])
        for part in url.path.split("/"):
            values.add(urllib.parse.unquote(part))
        for name, value in urllib.parse.parse_qsl(url.query, keep_blank_values=True):
            values.update((name, value))
        for header in request.get("headers", []):
            if header["name"].lower() not in ("user-agent", "accept", "accept-encoding",
                                                "connection", "content-length", "host",
                                                "content-type", "x-schemathesis-testcaseid"):
                values.add(header["value"])
    # A value that is part of a template (a parameter's name sent as its value) is in every
    # label of that route by right; one that is a piece of the demo's or loopwatch's own text
    # (Schemathesis once sent `COM1=post 1`, and the demo logs "upstream failure for post 1"
    # whenever the upstream fails) cannot be told from it.
    named = "\n".join(templates(schema))
    return {v for v in values - literal
            if v.strip() and not _PLAIN.match(v.strip()) and v not in named
            and v not in _OWN_TEXT}


@pytest.mark.parametrize("p", PASSES)
def test_no_generated_value_reaches_metrics_events_or_log(
    runs: Callable[[Pass], Run], p: Pass
) -> None:
    run = runs(p)
    values = generated_values(run.sent, run.schema)
    assert values, "nothing was generated"
    labels = "\n".join(
        value
        for family in text_string_to_metric_families(run.metrics)
        for sample in family.samples
        for value in sample.labels.values()
    )
    # What a request can put into an event; its frames and location name code, not input.
    events = json.dumps([
        {key: value for key, value in event.items() if key not in ("frames", "location")}
        for event in (json.loads(run.events)["events"] if run.events else [])
    ])
    for where, text in (("/metrics", labels), ("events", events), ("log", run.log)):
        leaked = sorted(v for v in values if v in text)
        context = [text[max(text.index(v) - 200, 0):text.index(v) + 50] for v in leaked[:3]]
        assert not leaked, f"generated values in {where}: {leaked[:10]} in {context}"
