"""Security: nothing secret leaks into metrics, events or logs; the endpoints can be kept
private (tested examples from docs/hardening.md); every environment setting is validated.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

import loopwatch
from demo_app import Settings
from demo_app.config import ConfigError
from demo_app.faults import Behaviour
from tests.apps import hardening_admin, hardening_app
from tests.events import NOT_CODE
from harness.servers import free_port, serve_in_thread, uvicorn_args

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "hardening.md"

SECRETS = {
    "query": "SECRETQUERY7f3a",
    "header": "SECRETHEADER91c2",
    "cookie": "SECRETCOOKIE55d0",
    "body": "SECRETBODY3e8b",
    "path": "SECRETPATH0a1f",
    "local": "SECRETLOCAL6c4d",
}


# -- no secrets in /metrics, /loopwatch/events or the log ----------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_secrets_never_reach_metrics_events_or_logs(
    loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="loopwatch")
    registry = CollectorRegistry()
    app = hardening_app.build_corpus(registry, block_threshold=0.05)
    with serve_in_thread(app, loop=loop) as server, \
            httpx.Client(base_url=server.url, timeout=10) as client:
        headers = {"x-api-key": SECRETS["header"], "authorization": f"Bearer {SECRETS['header']}"}
        cookies = {"session": SECRETS["cookie"]}
        for path in (f"/login/{SECRETS['path']}?token={SECRETS['query']}",
                     f"/{SECRETS['path']}?token={SECRETS['query']}",
                     f"/items/{SECRETS['path']}?q={SECRETS['query']}"):
            client.cookies.update(cookies)
            client.post(path, headers=headers, content=SECRETS["body"] + SECRETS["local"])
        client.get(f"/block?ms=120&token={SECRETS['query']}", headers=headers)
        client.get(f"/boom?token={SECRETS['query']}", headers=headers)
        time.sleep(0.2)
        outputs = {
            "metrics": client.get("/metrics/").text,
            "metrics (OpenMetrics)": client.get("/metrics/", headers={
                "accept": "application/openmetrics-text; version=1.0.0"}).text,
            "events": client.get("/loopwatch/events/").text,
        }
    events = json.loads(outputs["events"])["events"]
    assert any(e["route"] == "/login/{username}" for e in events), events  # it was seen
    login = next(e for e in events if e["route"] == "/login/{username}")
    assert login["location"].endswith(f"hardening_app.py:{_line_of('time.sleep(0.15)')}")
    assert set(login) == {"time", "duration", "task", "method", "route", "location", "hint",
                          "stack_status", "timed", "gc_seconds", "preempted", "paused",
                          "frames"}
    assert all(set(f) == {"file", "line", "function"} for f in login["frames"])
    records = [r for r in caplog.records if r.name == "loopwatch"]
    assert records  # the block was logged
    outputs["log"] = "\n".join(
        r.getMessage() + json.dumps(getattr(r, "loopwatch_event", {}), default=str)
        + str({k: v for k, v in vars(r).items() if k.startswith("block_")})
        for r in records)
    leaks = [(where, kind) for where, text in outputs.items()
             for kind, secret in SECRETS.items() if secret in text]
    assert not leaks, leaks


def _line_of(snippet: str) -> int:
    source = (ROOT / "tests" / "apps" / "hardening_app.py").read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if snippet in line)


# -- keeping the endpoints private: the tested examples of docs/hardening.md ------------------


def test_endpoints_on_a_separate_port_served_from_the_apps_own_loop() -> None:
    registry = CollectorRegistry()
    admin_port = free_port()
    app = hardening_admin.build_private_port(admin_port, registry)
    with serve_in_thread(app, loop="asyncio") as server:
        admin = f"http://127.0.0.1:{admin_port}"
        assert httpx.get(server.url + "/metrics/").status_code == 404
        assert httpx.get(server.url + "/loopwatch/events/").status_code == 404
        assert httpx.get(server.url + "/block?ms=150", timeout=10).status_code == 200
        text = httpx.get(admin + "/metrics/").text
        assert 'loopwatch_requests_total{method="GET",route="/block",status="200"} 1.0' in text
        events = httpx.get(admin + "/loopwatch/events/").json()
        assert events["monitoring"] is True  # the side server runs on the app's loop
        assert [e["route"] for e in events["events"] if e["route"] not in NOT_CODE] == ["/block"]
        # The side server's own requests are not the app's: not counted.
        assert "/metrics" not in text.split("loopwatch_requests_total")[1].split("#")[0]
    # The lifespan stopped the side server with the app.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{admin_port}/metrics/", timeout=2)


def test_endpoints_behind_a_bearer_token() -> None:
    token = "t0ken-" + "x" * 20
    registry = CollectorRegistry()
    app = hardening_admin.build_token(token, registry)
    with serve_in_thread(app, loop="asyncio") as server:
        url = server.url
        httpx.get(url + "/json")
        for path in ("/metrics/", "/loopwatch/events/"):
            assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + path, headers={"authorization": "Bearer wrong"}
                             ).status_code == 401
            assert httpx.get(url + path, headers={"authorization": f"Bearer {token}x"}
                             ).status_code == 401
            ok = httpx.get(url + path, headers={"authorization": f"Bearer {token}"})
            assert ok.status_code == 200
        text = httpx.get(url + "/metrics/", headers={"authorization": f"Bearer {token}"}).text
        assert 'route="/json"' in text
    with pytest.raises(ValueError, match="at least 16"):
        hardening_admin.require_token(loopwatch.metrics_app(), "short")


def test_the_documented_examples_are_the_tested_code() -> None:
    """docs/hardening.md quotes tests/apps/hardening_admin.py: the two must not drift."""
    source = (ROOT / "tests" / "apps" / "hardening_admin.py").read_text()
    doc = DOC.read_text()
    blocks = re.findall(r"# --8<-- \[start:([\w-]+)\]\n(.*?)\n\s*# --8<-- \[end:\1\]", source,
                        re.S)
    assert {name for name, _ in blocks} == {"private-port", "private-port-usage", "token",
                                           "token-usage"}
    for name, code in blocks:
        dedented = "\n".join(line[4:] if line.startswith("    ") and name.endswith("usage")
                             else line for line in code.splitlines())
        assert dedented.strip() in doc, f"docs/hardening.md does not quote {name!r} as tested"


# -- every configuration value from the environment is validated ------------------------------


LOOPWATCH_BAD = [
    ("LOOPWATCH_BLOCK_THRESHOLD", "abc"), ("LOOPWATCH_BLOCK_THRESHOLD", "0"),
    ("LOOPWATCH_BLOCK_THRESHOLD", "-1"), ("LOOPWATCH_BLOCK_THRESHOLD", "nan"),
    ("LOOPWATCH_BLOCK_THRESHOLD", "inf"), ("LOOPWATCH_BLOCK_THRESHOLD", "61"),
    ("LOOPWATCH_BLOCK_THRESHOLD", "0.005"),  # valid alone, but not above the probe interval
    ("LOOPWATCH_PROBE_INTERVAL", "0"), ("LOOPWATCH_PROBE_INTERVAL", "0.5"),
    ("LOOPWATCH_PROBE_INTERVAL", "ten ms"),
    ("LOOPWATCH_STACK_DEPTH", "0"), ("LOOPWATCH_STACK_DEPTH", "1001"),
    ("LOOPWATCH_STACK_DEPTH", "2.5"), ("LOOPWATCH_STACK_DEPTH", "0x10"),
    ("LOOPWATCH_RING_SIZE", "0"), ("LOOPWATCH_RING_SIZE", "100001"),
    ("LOOPWATCH_RING_SIZE", "-5"),
    ("LOOPWATCH_LOG_BLOCKS", "maybe"), ("LOOPWATCH_LOG_BLOCKS", "2"),
    ("LOOPWATCH_SAMPLE_STACKS", "enabled"),
]


@pytest.mark.parametrize(("variable", "raw"), LOOPWATCH_BAD)
def test_a_bad_loopwatch_variable_is_refused_naming_it_and_what_is_allowed(
    variable: str, raw: str
) -> None:
    with pytest.raises(ValueError) as info:
        loopwatch.Config.from_env({variable: raw})
    message = str(info.value)
    assert variable in message and "allowed" in message, message
    # The middleware reads the same variables: its app refuses to start, naming it.
    message = _middleware_startup_error({variable: raw})
    assert variable in message and "allowed" in message, message


def _middleware_startup_error(env: dict[str, str]) -> str:
    """The error a LoopWatchMiddleware reports for ``env``: raised when it is created, or
    raised or sent as ``lifespan.startup.failed`` when its app starts."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LOOPWATCH_")}
    os.environ.update(env)
    try:
        app = loopwatch.LoopWatchMiddleware(hardening_app.build_plain(CollectorRegistry()).app,
                                            registry=CollectorRegistry())
    except ValueError as exc:
        return str(exc)
    finally:
        for k in env:
            os.environ.pop(k, None)
        os.environ.update(saved)

    async def startup() -> str:
        sent: list[dict[str, object]] = []
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive() -> dict[str, object]:
            return next(messages)

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        try:
            await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                      receive, send)
        except ValueError as exc:
            return str(exc)
        failed = [m for m in sent if m["type"] == "lifespan.startup.failed"]
        return str(failed[0].get("message", "")) if failed else f"started: {sent}"

    import asyncio

    return asyncio.run(startup())


@pytest.mark.parametrize(("variable", "raw", "attr", "expected"), [
    ("LOOPWATCH_BLOCK_THRESHOLD", " 0.25 ", "block_threshold", 0.25),
    ("LOOPWATCH_STACK_DEPTH", "7", "stack_depth", 7),
    ("LOOPWATCH_LOG_BLOCKS", "Off", "log_blocks", False),
    ("LOOPWATCH_SAMPLE_STACKS", "YES", "sample_stacks", True),
    ("LOOPWATCH_RING_SIZE", "", "ring_size", 100),  # empty: the default
])
def test_good_loopwatch_variables_are_read(variable: str, raw: str, attr: str,
                                           expected: object) -> None:
    assert getattr(loopwatch.Config.from_env({variable: raw}), attr) == expected


def test_a_server_with_a_bad_loopwatch_variable_fails_at_startup_naming_it() -> None:
    """``uvicorn app:app`` (lifespan "auto") with a typo in a LOOPWATCH_ variable must stop at
    startup naming it -- not start and answer every request with a 500."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOOPWATCH_RING_SIZE": "lots"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, *uvicorn_args("tests.apps.hardening_app:app", port, log_level="info")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    answered = None
    try:
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                answered = httpx.get(f"http://127.0.0.1:{port}/json", timeout=1).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert answered is None, (
        f"the server started and answered {answered}; its log:\n{stderr[-1500:]}")
    assert proc.returncode != 0
    assert "LOOPWATCH_RING_SIZE='lots'" in stderr, stderr[-2000:]


DEMO_BAD = [
    ("DEMO_UPSTREAM_URL", "ftp://127.0.0.1"), ("DEMO_UPSTREAM_URL", "http://"),
    ("DEMO_UPSTREAM_URL", "http://[::1"), ("DEMO_UPSTREAM_URL", "http://127.0.0.1:abc"),
    ("DEMO_UPSTREAM_URL", "http://127.0.0.1:99999"),
    ("DEMO_ANALYTICS_URL", "not a url"), ("DEMO_ANALYTICS_URL", "http://127.0.0.1:abc/events"),
    ("DEMO_TIMEOUT_SECONDS", "0"), ("DEMO_TIMEOUT_SECONDS", "-1"),
    ("DEMO_TIMEOUT_SECONDS", "nan"), ("DEMO_TIMEOUT_SECONDS", "inf"),
    ("DEMO_TIMEOUT_SECONDS", "10s"), ("DEMO_CONNECT_TIMEOUT_SECONDS", "soon"),
    ("DEMO_MAX_CONNECTIONS", "0"), ("DEMO_MAX_CONNECTIONS", "1.5"),
    ("DEMO_MAX_CONNECTIONS", "10001"), ("DEMO_MAX_KEEPALIVE_CONNECTIONS", "-1"),
    ("DEMO_MAX_KEEPALIVE_CONNECTIONS", "60"),  # more than the pool's 50
]


@pytest.mark.parametrize(("variable", "raw"), DEMO_BAD)
def test_a_bad_demo_variable_is_refused_naming_it(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({variable: raw})
    assert variable in str(info.value), str(info.value)


CLI_BAD = [
    ("DEMO_PORT", "0"), ("DEMO_PORT", "65536"), ("DEMO_PORT", "http"),
    ("DEMO_UPSTREAM_PORT", "-1"), ("DEMO_LOOP", "trio"), ("DEMO_NO_UPSTREAM", "perhaps"),
    ("DEMO_HOST", "not a host"), ("DEMO_HOST", "http://127.0.0.1"),
]


@pytest.mark.parametrize(("variable", "raw"), CLI_BAD)
def test_a_bad_demo_cli_variable_stops_the_demo_naming_it(
    variable: str, raw: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    from demo_app import __main__ as cli
    from demo_app.__main__ import main

    def let_through(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{variable}={raw!r} was accepted: the demo went on to start")

    # Nothing may be bound or resolved if validation lets a value through.
    monkeypatch.setattr(cli, "_start_simulator", let_through)
    monkeypatch.setattr(uvicorn.Server, "run", let_through)
    with pytest.raises(SystemExit) as info:
        main([], environ={variable: raw})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert variable in err, err


SIM_BAD = [
    ("SIM_DELAY_MS", "-1"), ("SIM_DELAY_MS", "600001"), ("SIM_DELAY_MS", "1.5"),
    ("SIM_JITTER_MS", "lots"), ("SIM_STATUS", "200"), ("SIM_STATUS", "600"),
    ("SIM_ERROR_RATE", "1.5"), ("SIM_ERROR_RATE", "nan"), ("SIM_ERROR_RATE", "-0.1"),
    ("SIM_HANG", "sometimes"), ("SIM_DROP", "explode"), ("SIM_GARBAGE", "2"),
]


@pytest.mark.parametrize(("variable", "raw"), SIM_BAD)
def test_a_bad_sim_variable_is_refused_naming_it(variable: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Behaviour.from_env({variable: raw})
    assert variable in str(info.value), str(info.value)
