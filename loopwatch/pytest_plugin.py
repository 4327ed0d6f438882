"""pytest plugin: fail a test whose event loop blocked longer than a limit.

Loaded automatically when loopwatch is installed (entry point ``pytest11``); it does nothing
for a test unless asked to:

* ``@pytest.mark.loopwatch(max_block=0.05)`` on an async test fails it if any single
  callback or task step held its event loop for 50 ms or more, and reports the blocking line
  and the hint;
* ``--loopwatch-max-block=0.05`` (or the ini option ``loopwatch_max_block``) does the same
  for every async test;
* the ``loopwatch`` fixture gives the test the :class:`~loopwatch.Watch` of its loop
  (``loopwatch.blocks``) without failing it.

It wraps the test's coroutine function, so it works with whichever plugin runs the
coroutine (pytest-asyncio, anyio) and watches the loop the test really runs on.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest

from ._config import Config
from ._events import BlockEvent
from ._hooks import timed_await
from ._watch import Watch

__all__ = ["LoopWatchFixture"]

_DEFAULT_THRESHOLD = 0.1


class LoopWatchFixture:
    """What the ``loopwatch`` fixture returns: the watch of the test's event loop."""

    def __init__(self) -> None:
        self.watch: Watch | None = None

    @property
    def blocks(self) -> list[BlockEvent]:
        """Block events seen so far during the test (empty outside an async test), the step
        running now included once it has held the loop for the threshold (a test that checks
        right after a blocking call, with no await in between, sees that call's block)."""
        watch = self.watch
        if watch is None:
            return []
        seen = list(watch.blocks)
        monitor = watch.monitor
        if monitor is not None and monitor.active:
            running = monitor._running_block()
            if running is not None and running.duration >= watch.config.block_threshold:
                seen.append(running)
        return seen

    def assert_no_blocks(self, max_block: float | None = None) -> None:
        """Fail the test now if a block of ``max_block`` seconds or more was seen."""
        limit = max_block if max_block is not None else 0.0
        offending = [b for b in self.blocks if b.duration >= limit]
        if offending:
            pytest.fail(_report(offending, limit or _threshold(self.watch)), pytrace=False)

    def __repr__(self) -> str:
        return f"<loopwatch fixture {self.watch!r}>"


def _threshold(watch: Watch | None) -> float:
    return watch.config.block_threshold if watch is not None else _DEFAULT_THRESHOLD


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loopwatch", "event-loop blocking checks (loopwatch)")
    group.addoption(
        "--loopwatch-max-block",
        dest="loopwatch_max_block",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fail every async test whose event loop blocked this long or longer",
    )
    parser.addini(
        "loopwatch_max_block",
        "fail every async test whose event loop blocked this long or longer (seconds)",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    _global_limit(config)  # a bad value is a usage error before any test runs
    config.addinivalue_line(
        "markers",
        "loopwatch(max_block=0.1): fail this async test if its event loop blocked for "
        "max_block seconds or more, reporting the blocking line and a hint",
    )


def _global_limit(config: pytest.Config) -> float | None:
    value = config.getoption("loopwatch_max_block")
    if value is None:
        raw = str(config.getini("loopwatch_max_block") or "").strip()
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise pytest.UsageError(
                f"loopwatch: invalid ini option loopwatch_max_block={raw!r}; "
                "allowed: a number of seconds > 0"
            ) from None
    if not value > 0:
        raise pytest.UsageError(
            f"loopwatch: invalid --loopwatch-max-block={value!r}; allowed: a number of seconds > 0"
        )
    return float(value)


def _limit_for(item: pytest.Item) -> tuple[float | None, bool]:
    """(max_block, explicitly asked for) for this item."""
    marker = item.get_closest_marker("loopwatch")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError(
                f"{item.nodeid}: use @pytest.mark.loopwatch(max_block=SECONDS), "
                f"not positional arguments {marker.args!r}"
            )
        unknown = set(marker.kwargs) - {"max_block"}
        if unknown:
            raise pytest.UsageError(
                f"{item.nodeid}: unknown loopwatch marker option {sorted(unknown)[0]!r}; "
                "allowed: max_block"
            )
        max_block = marker.kwargs.get("max_block", _DEFAULT_THRESHOLD)
        bad_type = isinstance(max_block, bool) or not isinstance(max_block, (int, float))
        if bad_type or not max_block > 0:
            raise pytest.UsageError(
                f"{item.nodeid}: invalid loopwatch max_block={max_block!r}; "
                "allowed: a number of seconds > 0"
            )
        return float(max_block), True
    return _global_limit(item.config), False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        _limit_for(item)  # a bad marker is a usage error, not a failure of one test


@pytest.fixture
def loopwatch() -> LoopWatchFixture:
    """The watch of this async test's event loop: ``loopwatch.blocks``."""
    return LoopWatchFixture()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    func = getattr(item, "obj", None)
    if not isinstance(item, pytest.Function) or func is None:
        yield
        return
    limit, explicit = _limit_for(item)
    fixture = item.funcargs.get("loopwatch")
    if not isinstance(fixture, LoopWatchFixture):
        fixture = None
    if limit is None and fixture is None:
        yield
        return
    if not inspect.iscoroutinefunction(func):
        if explicit:
            item.warn(pytest.PytestWarning(
                "@pytest.mark.loopwatch has no effect on a test that is not a coroutine "
                "function: there is no event loop to watch"
            ))
        yield
        return
    threshold = limit if limit is not None else _DEFAULT_THRESHOLD
    config = Config(
        block_threshold=threshold,
        probe_interval=min(0.01, threshold / 2),
        log_blocks=False,
    )
    item.obj = _watched(func, config, limit, fixture, item.config.rootpath)
    try:
        yield
    finally:
        item.obj = func


def _watched(
    func: Callable[..., Any], config: Config, limit: float | None,
    fixture: LoopWatchFixture | None, rootdir: Path,
) -> Callable[..., Any]:
    @functools.wraps(func)
    async def run_watched(*args: Any, **kwargs: Any) -> Any:
        watch = Watch(config)
        if fixture is not None:
            fixture.watch = watch
        async with watch:
            body = func(*args, **kwargs)
            monitor = watch.monitor
            if monitor is not None and monitor.mode == "task-factory" and watch.owns_monitor:
                # uvloop: the test's own task is older than the monitor, so its steps are
                # not timed; time them here, exactly, as any task's.
                result = await timed_await(body, monitor)
            else:
                result = await body
        if limit is not None:
            offending = [b for b in watch.blocks if b.duration >= limit]
            if offending:
                pytest.fail(_report(offending, limit, rootdir), pytrace=False)
        return result

    return run_watched


def _report(blocks: list[BlockEvent], limit: float, rootdir: Path | None = None) -> str:
    def where(location: str) -> str:
        if rootdir is None:
            return location
        try:
            return os.path.relpath(location, rootdir) if location.startswith(
                str(rootdir) + os.sep) else location
        except ValueError:  # another drive (Windows)
            return location

    lines = [
        f"loopwatch: the event loop was blocked {len(blocks)} time(s) for "
        f"{limit * 1000:.0f} ms or more:"
    ]
    for event in blocks:
        summary = event.summary()
        frame = event.blocking_frame
        if frame is not None:
            summary = summary.replace(f" at {frame.location} ", f" at {where(frame.location)} ", 1)
        lines.append(f"  - {summary}")
        shown = [f for f in event.frames if not f.is_library][:5] or list(event.frames[:3])
        for frame in shown:
            lines.append(f"      {where(frame.location)} in {frame.function}")
    return "\n".join(lines)
