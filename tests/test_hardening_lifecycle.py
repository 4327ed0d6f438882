"""Lifecycle: start and stop many times, several apps in one process, fork, SIGTERM.

Each of these ends with nothing of loopwatch left behind: no watchdog thread, no hook on
``Handle._run``, the task factory as it was, no monitor registered for a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch import _hooks, _monitor
from loopwatch._metrics import metrics_for
from tests.apps import hardening_app
from tests.conftest import run_on
from harness.servers import free_port, serve_in_thread, uvicorn_args

ROOT = Path(__file__).resolve().parent.parent


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "loopwatch-watchdog" and t.is_alive()]


def wait_for(condition: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


async def _block(seconds: float) -> None:
    time.sleep(seconds)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    metrics_for(registry).flush()
    return registry.get_sample_value(name, labels) or 0.0


# -- start/stop -----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_start_and_stop_300_times_on_one_loop_and_on_100_loops(loop_kind: str) -> None:
    before = len(watchdogs())

    def user_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
        return asyncio.Task(coro, loop=loop, **kw)

    async def cycles() -> list[Any]:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(user_factory)
        seen = []
        for i in range(300):
            monitor = loopwatch.Monitor(log_blocks=False, block_threshold=0.05).start()
            if i % 50 == 0:
                await asyncio.sleep(0.02)  # let the probe and the watchdog really start
                assert monitor.watchdog_thread is not None
                # A block in a task made after start (timed on uvloop too), seen by this
                # cycle's monitor.
                await asyncio.create_task(_block(0.06))
                seen.append(monitor.block_count)
            else:
                await asyncio.sleep(0)
            assert await asyncio.create_task(asyncio.sleep(0, result=i)) == i
            monitor.stop()
            assert loopwatch.get_monitor() is None
        assert loop.get_task_factory() is user_factory  # restored every time
        return seen

    assert run_on(loop_kind, cycles()) == [1] * 6
    for _ in range(100):
        async def once() -> None:
            monitor = loopwatch.Monitor(log_blocks=False).start()
            await asyncio.sleep(0.001)
            monitor.stop()

        run_on(loop_kind, once())
    wait_for(lambda: len(watchdogs()) <= before, "every watchdog thread ended")
    assert asyncio.events.Handle._run is _hooks._original_run
    assert _hooks._handle_users == 0 and not _hooks.handle_hook_installed()
    assert not _monitor._monitors


def test_the_same_app_served_five_times_is_watched_each_time() -> None:
    """One app object (one middleware instance) through five servers, alternating loops: each
    run starts its monitor on the new loop, stops it at shutdown, and metrics continue."""
    registry = CollectorRegistry()
    app = hardening_app.build_corpus(registry, log_blocks=False)
    baseline = len(watchdogs())
    for i, loop in enumerate(["asyncio", "uvloop"] * 2 + ["asyncio"]):
        with serve_in_thread(app, loop=loop) as server:
            assert httpx.get(server.url + "/json").status_code == 200
            monitor = loopwatch.get_monitor(server.loop)
            assert monitor is not None and monitor.active
            assert monitor.mode == ("task-factory" if loop == "uvloop" else "handle")
        assert not monitor.active
        wait_for(lambda: len(watchdogs()) <= baseline, "the watchdog ended")
        assert value(registry, "loopwatch_requests_total", method="GET", route="/json",
                     status="200") == i + 1


def test_without_lifespan_the_monitor_does_not_outlive_its_server() -> None:
    """A server without lifespan (``--lifespan off``, or one that does not support it) never
    tells the middleware it stops: the monitor must not keep a watchdog thread (and the
    closed loop) alive forever, and the same app served again must be watched again."""
    registry = CollectorRegistry()
    app = hardening_app.build_corpus(registry, log_blocks=False)
    baseline = len(watchdogs())
    watched = []
    for _ in range(3):
        with serve_in_thread(app, loop="asyncio", lifespan="off") as server:
            assert httpx.get(server.url + "/json").status_code == 200
            watched.append(loopwatch.get_monitor(server.loop) is not None)
    assert watched == [True, True, True], "a later server of the same app ran unwatched"
    wait_for(lambda: len(watchdogs()) <= baseline,
             f"the watchdog threads of closed loops ended ({len(watchdogs())} alive)", 3.0)


def test_a_failed_startup_leaves_no_monitor_running() -> None:
    @contextlib.asynccontextmanager
    async def failing(app: FastAPI) -> Any:
        raise RuntimeError("the app's own startup failed")
        yield  # pragma: no cover

    app = FastAPI(lifespan=failing)
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=CollectorRegistry())
    baseline = len(watchdogs())
    loop = asyncio.new_event_loop()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                           lifespan="on", log_level="critical"))
    try:
        with pytest.raises(SystemExit):
            loop.run_until_complete(server.serve())
        assert loopwatch.get_monitor(loop) is None, "the monitor still runs on the loop"
    finally:
        loop.close()
    wait_for(lambda: len(watchdogs()) <= baseline, "the watchdog thread ended", 2.0)


# -- two apps, separate registries, one process -------------------------------------------------


def test_two_apps_in_two_threads_keep_separate_metrics() -> None:
    a_registry, b_registry = CollectorRegistry(), CollectorRegistry()
    a = hardening_app.build_corpus(a_registry, log_blocks=False)
    b = hardening_app.build_corpus(b_registry, log_blocks=False)
    with serve_in_thread(a, loop="asyncio") as sa, serve_in_thread(b, loop="uvloop") as sb:
        for _ in range(3):
            httpx.get(sa.url + "/json")
        httpx.get(sb.url + "/block?ms=150")
        monitor_a, monitor_b = loopwatch.get_monitor(sa.loop), loopwatch.get_monitor(sb.loop)
        assert monitor_a is not None and monitor_b is not None and monitor_a is not monitor_b
        assert value(a_registry, "loopwatch_requests_total", method="GET", route="/json",
                     status="200") == 3
        assert value(b_registry, "loopwatch_requests_total", method="GET", route="/json",
                     status="200") == 0
        assert value(b_registry, "loopwatch_requests_total", method="GET", route="/block",
                     status="200") == 1
        # The block on B's loop is B's alone.
        assert monitor_b.block_count == 1 and monitor_a.block_count == 0
        assert value(a_registry, "loopwatch_event_loop_block_duration_seconds_count",
                     method="GET", route="/block") == 0
    # Stopping A first, then B: each stopped its own monitor only.
    assert not monitor_a.active and not monitor_b.active


def test_two_apps_on_one_loop_keep_their_metrics_when_one_shuts_down() -> None:
    """Two apps served on the same loop share its one monitor. When one of them shuts down,
    the other must go on being watched: loop metrics keep flowing into its registry and its
    finished requests are folded in by the probe."""
    registries = [CollectorRegistry(), CollectorRegistry()]
    apps = [hardening_app.build_corpus(r, log_blocks=False) for r in registries]
    servers = [uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(),
                                             log_level="warning")) for app in apps]
    out: dict[str, Any] = {}

    async def main() -> None:
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        while not all(s.started for s in servers):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        servers[0].should_exit = True
        await tasks[0]
        out["monitor_after_a"] = loopwatch.get_monitor()
        lag_before = registries[1].get_sample_value("loopwatch_event_loop_lag_seconds_count")
        port = servers[1].config.port
        async with httpx.AsyncClient() as client:
            for _ in range(5):
                await client.get(f"http://127.0.0.1:{port}/json")
        await asyncio.sleep(1.0)
        out["lag_growth"] = (registries[1].get_sample_value(
            "loopwatch_event_loop_lag_seconds_count") or 0) - (lag_before or 0)
        out["pending"] = metrics_for(registries[1]).pending
        servers[1].should_exit = True
        await tasks[1]
        out["monitor_after_b"] = loopwatch.get_monitor()

    asyncio.run(main())
    assert out["monitor_after_a"] is not None, "B's loop is no longer watched once A stopped"
    assert out["lag_growth"] > 5, out
    assert out["pending"] == 0, out  # B's requests were folded in without a scrape
    assert out["monitor_after_b"] is None  # the last app to stop stopped the monitor


# -- fork -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["asyncio", "uvloop", "asyncio --monitor-at-fork"])
def test_fork_after_import_child_works_and_parent_is_unaffected(variant: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.apps.hardening_fork", *variant.split()],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("HARDENING-FORK ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(line.split(" ", 1)[1])
    parent, child = report["parent"], report["child"]
    assert "error" not in child and "error" not in parent, report
    assert parent["child_exit"] == 0
    assert child["pid"] != report["parent_pid"] and child["served_by"] == child["pid"]
    for side in (child, parent):
        assert (side["json"], side["block"]) == (200, 200), side
        assert side["event_route"] == "/block", side
        assert side["event_location"].startswith("hardening_app.py:"), side
        assert 0.25 <= side["event_duration"] < 0.5, side
        assert side["metrics_has_block"], side
        assert "loopwatch-watchdog" in side["threads_while_serving"]
    # The child's watchdog ran in the child; the parent's threads are the parent's own.
    assert child["threads_after"] == []
    expected_parent = ["loopwatch-watchdog"] if "monitor-at-fork" in variant else []
    assert parent["threads_after_fork"] == expected_parent
    assert parent["threads_after"] == expected_parent


# -- SIGTERM -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def uvicorn_process(loop: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HARDENING_REPORT_EXIT": "1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [sys.executable, *uvicorn_args("tests.apps.hardening_app:app", port, loop=loop)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            try:
                if httpx.get(url + "/pid", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


#: uvicorn shuts down gracefully on SIGTERM, then raises the signal again so that the process
#: ends the way an unhandled SIGTERM would: the exit status is "killed by SIGTERM".
GRACEFUL = (0, -signal.SIGTERM)


def _terminate(proc: subprocess.Popen[bytes]) -> tuple[float, int, str]:
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return float("inf"), -9, err.decode(errors="replace")
    return time.monotonic() - start, proc.returncode, err.decode(errors="replace")


def _exit_report(stderr: str) -> tuple[list[str], bool]:
    line = next((x for x in stderr.splitlines() if x.startswith("HARDENING-EXIT ")), None)
    assert line, stderr[-2000:]
    threads = json.loads(line.split("threads=", 1)[1].split(" monitor_stopped=")[0])
    return threads, line.endswith("monitor_stopped=True")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_sigterm_stops_the_server_within_a_second_with_the_watchdog_joined(loop: str) -> None:
    with uvicorn_process(loop) as (proc, url), httpx.Client(base_url=url, timeout=10) as client:
        assert client.get("/block?ms=150").status_code == 200  # the watchdog has worked
        assert client.get("/json").status_code == 200  # and an idle keep-alive connection
        took, code, stderr = _terminate(proc)
    assert code in GRACEFUL, stderr[-2000:]
    assert took < 1.0, f"{took:.2f} s to shut down"
    threads, stopped = _exit_report(stderr)
    assert "loopwatch-watchdog" not in threads, threads
    assert stopped


def test_sigterm_during_a_block_waits_for_it_then_exits_promptly() -> None:
    with uvicorn_process("asyncio") as (proc, url):
        result: dict[str, Any] = {}

        def blocked() -> None:
            result["status"] = httpx.get(url + "/block?ms=600", timeout=10).status_code

        thread = threading.Thread(target=blocked)
        thread.start()
        time.sleep(0.2)  # the block has begun
        took, code, stderr = _terminate(proc)
        thread.join(10)
    assert result.get("status") == 200  # graceful: the request in flight was answered
    assert code in GRACEFUL, stderr[-2000:]
    assert took < 0.4 + 1.0, f"{took:.2f} s to shut down"  # the rest of the block + 1 s
    threads, stopped = _exit_report(stderr)
    assert "loopwatch-watchdog" not in threads and stopped
