"""``python -m demo_app`` and ``python -m demo_app.load`` as a user runs them."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest_demo import Stack, serve, serve_simulator, serve_stack, timed
from harness.servers import free_port, serve_in_subprocess
from prometheus_client import CollectorRegistry

from demo_app import Settings, create_app
from demo_app.__main__ import main as demo_main
from demo_app.load import DEFAULT_MIX, parse_mix, run_load
from demo_app.load import main as load_main


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
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
        parse_mix("/data=1,/users/101=1"),
        concurrency=5,
        duration=0,
        requests=60,
        headers=[("X-Sim-Delay-Ms", "5")],
        seed=1,
    )
    data, refused = result.routes["/data"], result.routes["/users/101"]
    assert data.latency.count + refused.latency.count == result.total.latency.count == 60
    assert data.errors == 0
    assert dict(refused.failures) == {"422": refused.latency.count}  # no user 101 upstream
    assert data.latency.quantile(0.5) >= 0.005  # the header reached the simulator
    assert demo.sim_stats()["requests"] == data.latency.count


# -- what a user copies: the banner's commands, -n, stopping, the default mix, the log -----------

ROOT = Path(__file__).resolve().parent.parent
#: A PATH with the system's programs only: a bare ``python`` there is not the demo's.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def banner_commands(banner: str) -> list[str]:
    """The lines of the demo's banner that are commands to type (curl or a Python)."""
    commands = []
    for line in banner.splitlines():
        for text in (line.strip(), line.partition(": ")[2].strip()):  # "Keep it busy: cmd"
            words = shlex.split(text) if text else []
            if words and (words[0] == "curl" or "python" in Path(words[0]).name):
                commands.append(text)
                break
    return commands


def test_the_banners_commands_work_as_printed(tmp_path: Path) -> None:
    """Every command the banner prints runs as printed from the checkout, with nothing but
    the system's programs on PATH (a fresh machine after ``bash scripts/demo.sh``)."""
    port, upstream_port = free_port(), free_port()
    args = ["-m", "demo_app", "--port", str(port), "--upstream-port", str(upstream_port)]
    env: dict[str, str | None] = {"DEMO_UPSTREAM_URL": None}
    with serve_in_subprocess(args, port=port, env=env, path="/docs") as demo:
        banner = ""
        while "demo_app.load" not in banner:  # printed once both servers are up
            banner += demo.stdout.readline().decode()  # type: ignore[union-attr]
        commands = banner_commands(banner)
        assert len(commands) >= 3, banner
        clean_env = {"PATH": SYSTEM_PATH, "HOME": str(tmp_path), "LANG": "C.UTF-8"}
        for command in commands:
            argv = shlex.split(command)
            if argv[0] == "curl":
                argv[1:1] = ["--silent", "--show-error", "--fail", "--max-time", "10"]
                done = subprocess.run(argv, cwd=ROOT, env=clean_env, capture_output=True,
                                      text=True, timeout=30)
                assert done.returncode == 0, (command, done.stderr)
                continue
            # The load generator, until Ctrl-C (``--duration 0``): interrupt it once it sends.
            before = httpx.get(f"http://127.0.0.1:{upstream_port}/_sim/stats").json()["requests"]
            load = subprocess.Popen(argv, cwd=ROOT, env=clean_env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 15
                while (httpx.get(f"http://127.0.0.1:{upstream_port}/_sim/stats").json()["requests"]
                       < before + 10):
                    assert load.poll() is None, (command, load.communicate())
                    assert time.monotonic() < deadline, f"{command}: no load arrived"
                    time.sleep(0.1)
                load.send_signal(signal.SIGINT)
                stdout, stderr = load.communicate(timeout=30)
            finally:
                load.kill()
            assert load.returncode == 0, (command, stderr)
            assert table(stdout)["all"][0] > 0, stdout
        demo.terminate()
        demo.communicate(timeout=10)


LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[.,]\d{3}\S* +WARNING +loopwatch\b.*event loop blocked"
)


def test_block_log_lines_carry_a_time_stamp_and_a_level() -> None:
    port, upstream_port = free_port(), free_port()
    args = ["-m", "demo_app", "--port", str(port), "--upstream-port", str(upstream_port)]
    with serve_in_subprocess(args, port=port, env={"DEMO_UPSTREAM_URL": None},
                             path="/docs") as demo:
        assert httpx.get(f"http://127.0.0.1:{port}/antipatterns/sleep?ms=250").status_code == 200
        demo.terminate()
        output = demo.communicate(timeout=10)[0].decode()
    blocked = [line for line in output.splitlines() if "event loop blocked" in line]
    assert blocked, output
    assert all(LOG_LINE.match(line) for line in blocked), blocked


def test_requests_flag_sends_exactly_that_many_however_long_it_takes(demo: Stack) -> None:
    """``-n 12`` of a 0.9 s route, one at a time, takes ~11 s: longer than the default
    duration (10 s), which must not cut the run short."""
    demo.reset()
    result = run("-m", "demo_app.load", demo.url, "-n", "12", "-c", "1", "--mix", "/weather=1",
                 "-H", "X-Sim-Delay-Ms: 900", timeout=60)
    assert result.returncode == 0, result.stderr
    assert table(result.stdout)["all"] == (12, 0), result.stdout
    assert demo.sim_stats()["by_path"] == {"/weather": 12}


def test_stopping_leaves_no_abandoned_request_blocking_the_demo(demo: Stack) -> None:
    """When its time is up the load generator waits for the requests it has in flight: it
    counts every request the demo served, and once it exits the demo is free at once."""
    demo.reset()
    mix = "/antipatterns/requests-get?ms=300=1"  # each blocks the demo's loop for 300 ms
    result = run("-m", "demo_app.load", demo.url, "--duration", "1", "-c", "10", "--mix", mix)
    _, seconds = timed(lambda: demo.client.get("/data"))  # right after the load generator exits
    assert result.returncode == 0, result.stderr
    assert seconds < 1.0, f"the demo was still busy for {seconds:.1f} s"
    counted = table(result.stdout)["all"][0]
    served = demo.sim_stats()["by_path"]["/weather"]
    assert served == counted, f"the demo served {served} requests, the load counted {counted}"


def default_mix_routes() -> list[str]:
    return [path for path, _ in parse_mix(DEFAULT_MIX)]


def test_every_antipattern_in_the_default_mix_shows_as_a_block() -> None:
    """Each request to a blocking anti-pattern of the default mix is a block event in
    loopwatch, so a user who runs the load generator as documented sees each one."""
    blocking = [path for path in default_mix_routes() if path.startswith("/antipatterns/")]
    assert blocking
    with serve_simulator() as (upstream_url, _):
        app = create_app(Settings(upstream_url=upstream_url), registry=CollectorRegistry())
        with serve(app, "asyncio") as server:
            result = run("-m", "demo_app.load", server.url, "-n", "45", "-c", "3", "--seed", "5")
            events = httpx.get(f"{server.url}/loopwatch/events/").json()["events"]
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows["all"] == (45, 0), result.stdout
    by_route = Counter(event["route"] for event in events)
    for path in blocking:
        assert rows[path][0] > 0, f"--seed 5 never picked {path}: choose another seed"
        template = path.partition("?")[0]
        assert by_route[template] == rows[path][0], (path, rows[path], by_route)


def test_a_second_signal_abandons_the_requests_in_flight(demo: Stack) -> None:
    """Ctrl-C waits for the answers; Ctrl-C again gives up on them, saying how many."""
    mix = "/antipatterns/requests-get?ms=400=1"  # 10 in flight: 4 s to drain
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo_app.load", demo.url, "--duration", "0", "-c", "10",
         "--mix", mix],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert stderr == ""  # no traceback, no "exception was never retrieved"
    abandoned = re.search(r"^(\d+) requests abandoned unanswered", stdout, re.MULTILINE)
    assert abandoned and int(abandoned[1]) > 0, stdout
