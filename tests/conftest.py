from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

LOOPS = ["asyncio", "uvloop"]

#: Test files of what surrounds loopwatch -- the demo, the dashboards and rules, the stack and
#: the fleet, pages in a browser -- rather than its hot path: marked ``system``. CI runs them
#: on the newest Python (compiled and pure Python) and everything else on every Python and
#: path.
SYSTEM_FILES = (
    "test_dashboards.py", "test_rules.py", "test_stack.py", "test_stack_compose.py",
    "test_stack_docs.py", "test_fleet.py", "test_ui_browser.py", "test_ui_screenshot.py",
    "test_demo_background.py", "test_demo_cli.py", "test_demo_concurrency.py",
    "test_demo_config.py", "test_demo_contract.py", "test_demo_docs.py", "test_demo_errors.py",
    "test_demo_headline.py", "test_demo_routes.py", "test_demo_upstream.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SYSTEM_FILES:
            item.add_marker(pytest.mark.system)


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(loop_kind: str) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        return run_on(loop_kind, coro)

    return runner


def run_on(loop_kind: str, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion on a fresh loop of this kind, as ``asyncio.run`` does
    (``asyncio.Runner`` on 3.11+, the same steps by hand on 3.10)."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=lambda: new_loop(loop_kind)) as r:
            return r.run(coro)
    return _run_without_runner(new_loop(loop_kind), coro)


def _run_without_runner(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
    """What ``asyncio.Runner`` (3.11) does, for Python 3.10: run, then cancel what is left,
    close async generators and the default executor, and close the loop."""
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
