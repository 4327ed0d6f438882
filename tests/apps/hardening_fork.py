"""A gunicorn ``--preload``-like fork, run as ``python -m tests.apps.hardening_fork LOOP [--monitor-at-fork]``.

The parent imports loopwatch and builds the app (middleware and metrics included), then forks.
The child serves the app with uvicorn on a fresh loop and checks from a helper thread that
everything works: requests, a block with its stack, ``/metrics``, ``/loopwatch/events``.
The parent checks that the fork left it alone (no monitor, no watchdog thread) and then
serves the same app itself. With ``--monitor-at-fork``, the parent has a monitor running on
a loop in another thread when it forks (the child inherits loopwatch's module state but not
that thread). One JSON line on stdout reports both sides.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry

import loopwatch
from tests.apps import hardening_app
from harness.servers import free_port


def exercise(app: Any, loop_kind: str) -> dict[str, Any]:
    """Serve ``app`` on this process's main thread; check it from a helper thread."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop=loop_kind,
                            log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    result: dict[str, Any] = {"pid": os.getpid()}

    def check() -> None:
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 15
            while not server.started:
                if time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.01)
            with httpx.Client(base_url=url, timeout=10) as client:
                result["json"] = client.get("/json").status_code
                result["served_by"] = client.get("/pid").json()["pid"]
                result["block"] = client.get("/block?ms=250").status_code
                time.sleep(0.1)
                events = client.get("/loopwatch/events/").json()
                last = events["events"][-1] if events["events"] else {}
                result["event_route"] = last.get("route")
                result["event_location"] = (last.get("location") or "").rsplit("/", 1)[-1]
                result["event_duration"] = last.get("duration")
                text = client.get("/metrics/").text
                result["metrics_has_block"] = (
                    'loopwatch_event_loop_block_duration_seconds_count{method="GET",'
                    'route="/block"} 1.0' in text)
                result["threads_while_serving"] = sorted(
                    t.name for t in threading.enumerate() if t.name == "loopwatch-watchdog")
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["error"] = repr(exc)
        finally:
            server.should_exit = True

    helper = threading.Thread(target=check, daemon=True)
    helper.start()
    if loop_kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(server.serve())
    finally:
        loop.close()
    helper.join(10)
    result["threads_after"] = sorted(
        t.name for t in threading.enumerate() if t.name == "loopwatch-watchdog")
    return result


def background_monitor() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """A loop in another thread with a monitor running on it, as a parent might have."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    async def main() -> None:
        loopwatch.Monitor(log_blocks=False).start()
        await asyncio.sleep(0.05)
        ready.set()
        while True:
            await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True,
                              name="parent-loop")
    thread.start()
    ready.wait(10)
    return loop, thread


def main() -> None:
    loop_kind = sys.argv[1]
    monitor_at_fork = "--monitor-at-fork" in sys.argv
    registry = CollectorRegistry()
    app = hardening_app.build_corpus(registry, log_blocks=False)  # before the fork
    if monitor_at_fork:
        background_monitor()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        code = 1
        try:
            result = exercise(app, loop_kind)
            code = 0 if "error" not in result else 1
        except BaseException as exc:  # noqa: BLE001
            result = {"error": repr(exc)}
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(result))
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as source:
        child = json.loads(source.read() or "{}")
    _, status = os.waitpid(pid, 0)
    parent: dict[str, Any] = {
        "child_exit": os.waitstatus_to_exitcode(status),
        "threads_after_fork": sorted(t.name for t in threading.enumerate()
                                     if t.name == "loopwatch-watchdog"),
    }
    parent.update(exercise(app, loop_kind))
    print("HARDENING-FORK " + json.dumps({"parent": parent, "child": child,
                                          "parent_pid": os.getpid()}), flush=True)


if __name__ == "__main__":
    main()
