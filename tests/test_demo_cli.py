"""``python -m demo_app`` and ``python -m demo_app.load`` as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest_demo import Stack, serve_stack
from servers import free_port, serve_in_subprocess

from demo_app.__main__ import main as demo_main
from demo_app.load import main as load_main
from demo_app.load import parse_mix, run_load


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


def test_help() -> None:
    result = run("-m", "demo_app", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--host", "--port", "--upstream-port", "--loop", "--no-upstream"):
        assert option in result.stdout
    assert "DEMO_UPSTREAM_URL" in result.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"DEMO_TIMEOUT_SECONDS": "soon"}, "DEMO_TIMEOUT_SECONDS='soon' is invalid: expected"),
        ((), {"DEMO_PORT": "99999"}, "DEMO_PORT='99999' is invalid: expected an integer 1..65535"),
        (("--port", "http"), {}, "--port='http' is invalid: expected an integer 1..65535"),
        ((), {"DEMO_LOOP": "trio"}, "DEMO_LOOP='trio' is invalid: expected asyncio or uvloop"),
        (("--loop", "trio"), {}, "--loop='trio' is invalid: expected asyncio or uvloop"),
        ((), {"DEMO_NO_UPSTREAM": "perhaps"}, "DEMO_NO_UPSTREAM='perhaps' is invalid"),
        ((), {"SIM_DELAY_MS": "-1"}, "SIM_DELAY_MS='-1' is invalid"),
        (("--no-upstream",), {}, "--no-upstream needs DEMO_UPSTREAM_URL"),
        ((), {"DEMO_NO_UPSTREAM": "1"}, "--no-upstream needs DEMO_UPSTREAM_URL"),
        ((), {"DEMO_UPSTREAM_URL": "http://elsewhere:1"}, "pass --no-upstream"),
        (("--port", "9000", "--upstream-port", "9000"), {}, "is the demo's own port"),
    ],
)
def test_bad_options_fail_at_start_with_a_clear_message(
    args: tuple[str, ...], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        demo_main(["--no-loopwatch", *args], environ=env)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_runs_the_demo_and_the_simulator_on_one_machine() -> None:
    port, upstream_port = free_port(), free_port()
    # The port from the environment; the machine's own DEMO_UPSTREAM_URL must not leak in.
    env: dict[str, str | None] = {"DEMO_UPSTREAM_URL": None, "DEMO_PORT": str(port)}
    args = ["-m", "demo_app", "--no-loopwatch", "--upstream-port", str(upstream_port)]
    with serve_in_subprocess(args, port=port, env=env, path="/docs") as proc:
        dashboard = httpx.get(f"http://127.0.0.1:{port}/dashboard/1")
        assert dashboard.status_code == 200
        stats = httpx.get(f"http://127.0.0.1:{upstream_port}/_sim/stats").json()
        assert stats["by_path"]["/users/1"] == 1
        proc.terminate()
        output = proc.communicate(timeout=10)[0].decode()
    assert f"http://127.0.0.1:{port}/docs" in output
    assert f"http://127.0.0.1:{upstream_port}" in output


@pytest.fixture(scope="module")
def demo() -> Iterator[Stack]:
    with serve_stack() as stack:
        yield stack


TABLE_ROW = re.compile(r"^(?P<route>\S+)\s+(?P<count>\d+)\s+(?P<errors>\d+)(\s+[\d.]+){4}$")


def table(output: str) -> dict[str, tuple[int, int]]:
    """route -> (count, errors), from the load generator's table."""
    rows = {}
    for line in output.splitlines():
        match = TABLE_ROW.match(line)
        if match:
            rows[match["route"]] = (int(match["count"]), int(match["errors"]))
    return rows


def test_load_generator_runs_for_its_duration_and_prints_a_table(demo: Stack) -> None:
    mix = "/data=3,/users/1=1,/antipatterns/sleep?ms=20=1"
    start = time.monotonic()
    result = run(
        "-m",
        "demo_app.load",
        demo.url,
        "--duration",
        "2",
        "--concurrency",
        "4",
        "--mix",
        mix,
        "--progress",
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "p50 ms" in result.stdout and "p99 ms" in result.stdout
    rows = table(result.stdout)
    assert set(rows) == {"/data", "/users/1", "/antipatterns/sleep?ms=20", "all"}
    assert all(count > 0 and errors == 0 for count, errors in rows.values()), rows
    assert rows["all"][0] == sum(count for route, (count, _) in rows.items() if route != "all")
    assert demo.sim_stats()["by_path"]["/posts/1"] >= rows["/data"][0]
    assert re.search(r"\d+ requests", result.stderr)  # the progress line
    assert 2 <= elapsed < 10, elapsed


def test_load_generator_stops_cleanly_on_sigterm(demo: Stack) -> None:
    demo.reset()
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo_app.load", demo.url, "--duration", "0", "--mix", "/data=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until = time.monotonic() + 10
        while demo.sim_stats()["requests"] < 20:  # running, and sending
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < wait_until, "no load arrived"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert table(stdout)["/data"][0] > 0
    assert stderr == ""  # no traceback, and no progress line when stderr is not a terminal


def test_load_generator_rejects_a_bad_mix(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_main(["http://127.0.0.1:1", "--mix", "/data"])
    assert exited.value.code == 2
    assert "needs a weight" in capsys.readouterr().err


@pytest.mark.asyncio
async def test_load_counts_requests_and_failures_per_route(demo: Stack) -> None:
    demo.reset()
    result = await run_load(
        demo.url,
        parse_mix("/data=1,/users/999=1"),
        concurrency=5,
        duration=0,
        requests=60,
        headers=[("X-Sim-Delay-Ms", "5")],
        seed=1,
    )
    data, missing = result.routes["/data"], result.routes["/users/999"]
    assert data.latency.count + missing.latency.count == result.total.latency.count == 60
    assert data.errors == 0
    assert dict(missing.failures) == {"404": missing.latency.count}
    assert data.latency.quantile(0.5) >= 0.005  # the header reached the simulator
    assert demo.sim_stats()["requests"] == 60
