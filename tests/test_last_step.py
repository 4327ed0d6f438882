"""A block in the last step of whatever watches it is recorded like any other: with its
duration, line and hint. Each place where a step's end is the event that records it: a watch
that ends inside the blocking step, a monitor stopped there, a loop stopped there, a task
cancelled, and a request whose handler blocks and returns without another await.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

import loopwatch
from loopwatch._hints import SLEEP_HINT
from harness.servers import serve_in_thread
from tests.conftest import new_loop
from tests.events import of_code

pytest_plugins = ["pytester"]


def blocking_call(seconds: float = 0.15) -> None:
    time.sleep(seconds)  # BLOCKING-LINE


BLOCKING_LINE = next(
    n for n, text in enumerate(open(__file__).read().splitlines(), 1) if "# BLOCKING-LINE" in text
    and "next(" not in text
)


def assert_is_the_block(event: loopwatch.BlockEvent, threshold: float = 0.05) -> None:
    # A timed step is measured around the step itself; code outside timed steps (uvloop: a
    # task older than the monitor) from the lag probe, which the idle probe may have been
    # due up to 0.75 x the threshold after the block began.
    slack = 0.001 if event.timed else 0.75 * threshold
    assert 0.15 - slack <= event.duration <= 0.15 + 0.05, event
    assert event.blocking_frame is not None, event
    assert event.blocking_frame.function == "blocking_call", event.frames[:3]
    assert event.blocking_frame.line == BLOCKING_LINE
    assert event.hint == SLEEP_HINT


def test_a_watch_that_ends_in_the_blocking_step_records_it(run: Any) -> None:
    async def main() -> loopwatch.Watch:
        async with loopwatch.watch(block_threshold=0.05, log_blocks=False) as w:
            blocking_call()  # and no await after it
        return w

    w = run(main())
    blocks = of_code(w.blocks)
    assert len(blocks) == 1, blocks
    assert_is_the_block(blocks[0])


def test_a_watch_joined_to_a_running_monitor_records_the_running_block(run: Any) -> None:
    """The monitor goes on (it reports the whole step once, when it ends); the watch, which
    ends inside the step, takes the block as it stands then."""

    async def main() -> tuple[loopwatch.Watch, loopwatch.Monitor, int]:
        monitor = loopwatch.Monitor(block_threshold=0.05, log_blocks=False).start()
        await asyncio.sleep(0.05)
        async with loopwatch.watch(block_threshold=0.05, log_blocks=False) as w:
            blocking_call()
        during = monitor.block_count
        await asyncio.sleep(0.05)
        monitor.stop()
        return w, monitor, during

    w, monitor, during = run(main())
    assert w.monitor is monitor
    blocks = of_code(w.blocks)
    assert len(blocks) == 1
    assert_is_the_block(blocks[0])
    assert during == 0 and monitor.block_count == 1  # once, when the step ended
    assert monitor.blocks[0].duration >= blocks[0].duration


def test_a_monitor_stopped_in_the_blocking_step_records_it(run: Any) -> None:
    async def main() -> loopwatch.Monitor:
        monitor = loopwatch.Monitor(block_threshold=0.05, log_blocks=False).start()
        await asyncio.sleep(0.05)
        blocking_call()
        monitor.stop()
        return monitor

    monitor = run(main())
    assert monitor.block_count == 1
    assert_is_the_block(monitor.blocks[0])


# (uvloop does not time plain callbacks; the lag probe reports them, once the loop runs again.)
@pytest.mark.parametrize(("loop_kind", "how"), [
    ("asyncio", "task"), ("asyncio", "callback"), ("uvloop", "task")])
def test_a_loop_stopped_in_the_blocking_step_records_it(loop_kind: str, how: str) -> None:
    """The step blocks, then stops the loop: run_forever() returns right after that step."""
    loop = new_loop(loop_kind)
    try:
        monitor = loopwatch.Monitor(loop, block_threshold=0.05, log_blocks=False).start()
        loop.run_until_complete(asyncio.sleep(0.05))

        def block_then_stop() -> None:
            blocking_call()
            loop.stop()

        async def task() -> None:
            block_then_stop()

        if how == "task":
            loop.create_task(task())
        else:
            loop.call_soon(block_then_stop)
        loop.run_forever()
        assert monitor.block_count == 1, list(monitor.blocks)
        assert_is_the_block(monitor.blocks[0])
        assert monitor.blocks[0].timed
        monitor.stop()
    finally:
        loop.close()


def test_a_task_blocking_as_it_is_cancelled_records_it(run: Any) -> None:
    started = asyncio.Event

    async def cleanup_blocks(ready: asyncio.Event) -> None:
        with loopwatch.owner_scope(loopwatch.Owner("JOB", "cleanup")):
            try:
                ready.set()
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                blocking_call()  # the cleanup blocks, in the step that the cancel runs
                raise

    async def main() -> loopwatch.Monitor:
        monitor = loopwatch.Monitor(block_threshold=0.05, log_blocks=False).start()
        await asyncio.sleep(0.05)
        ready = asyncio.Event()
        task = asyncio.create_task(cleanup_blocks(ready))
        await ready.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        monitor.stop()
        return monitor

    del started
    monitor = run(main())
    assert monitor.block_count == 1, list(monitor.blocks)
    event = monitor.blocks[0]
    assert_is_the_block(event)
    assert event.route == "cleanup" and event.method == "JOB"


class AnswersThenBlocks:
    """An ASGI route that answers, then blocks, and returns without another await."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        blocking_call()


def test_a_request_that_blocks_in_its_last_step_is_charged_and_named(loop_kind: str) -> None:
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.routing import Route

    registry = CollectorRegistry()
    app = Starlette(routes=[Route("/last", AnswersThenBlocks())])
    app.add_middleware(loopwatch.LoopWatchMiddleware, registry=registry, block_threshold=0.05,
                       log_blocks=False)
    with serve_in_thread(app, loop=loop_kind) as server:
        assert httpx.get(server.url + "/last").status_code == 200
        deadline = time.monotonic() + 5
        while (monitor := loopwatch.get_monitor(server.loop)) is None or not monitor.blocks:
            assert time.monotonic() < deadline, "no block event"
            time.sleep(0.01)
        event = monitor.blocks[-1]
        assert_is_the_block(event)
        assert (event.method, event.route) == ("GET", "/last")
        from loopwatch._metrics import flush_all

        flush_all()
        blocking = registry.get_sample_value(
            "loopwatch_request_blocking_seconds_sum", {"method": "GET", "route": "/last"})
        assert blocking is not None and blocking >= 0.14, blocking


README_TEST = """
import time
import pytest

def blocking_call():
    time.sleep(0.15)

@pytest.mark.asyncio
@pytest.mark.loopwatch(max_block=0.05)
async def test_blocks():
    blocking_call()
"""


@pytest.mark.parametrize("how", ["marker", "option"])
def test_the_pytest_gate_fails_a_test_whose_last_step_blocks(
    pytester: pytest.Pytester, loop_kind: str, how: str
) -> None:
    source = README_TEST
    if how == "option":
        source = source.replace("@pytest.mark.loopwatch(max_block=0.05)\n", "")
    if loop_kind == "uvloop":
        pytester.makeconftest(
            "import uvloop\n\n"
            "def pytest_asyncio_loop_factories(config, item):\n"
            "    return {'uvloop': uvloop.new_event_loop}\n")
    path = pytester.makepyfile(test_it=source)
    text = path.read_text().splitlines()
    sleep_line = next(n for n, t in enumerate(text, 1) if "time.sleep" in t)
    call_line = next(n for n, t in enumerate(text, 1) if t.strip() == "blocking_call()")
    args = ["-p", "asyncio", "--asyncio-mode=strict"]
    if how == "option":
        args.append("--loopwatch-max-block=0.05")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*loopwatch: the event loop was blocked 1 time(s) for 50 ms or more:",
        # "(of which N ms waiting for a CPU)" after the function on a busy host
        f"  - event loop blocked for 1[45]?.? ms in task 'Task-*' at test_it.py:{sleep_line} in "
        "blocking_call()*; hint: time.sleep() blocks the event loop: use `await asyncio.sleep(...)`",
        f"      test_it.py:{sleep_line} in blocking_call",
        f"      test_it.py:{call_line} in test_blocks",
    ])
