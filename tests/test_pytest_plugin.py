"""The pytest plugin, run on real test files with pytester (in a subprocess)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

HEADER = """
import asyncio, time
import pytest

def blocking_call():
    time.sleep(0.15)  # BLOCKING-LINE
"""


def _line_of(source: str, marker: str) -> int:
    for number, text in enumerate(source.splitlines(), start=1):
        if marker in text:
            return number
    raise AssertionError(marker)


def test_marker_fails_a_blocking_test_with_line_and_hint(pytester: pytest.Pytester) -> None:
    source = HEADER + """
@pytest.mark.asyncio
@pytest.mark.loopwatch(max_block=0.05)
async def test_blocks():
    blocking_call()
    await asyncio.sleep(0)

@pytest.mark.asyncio
@pytest.mark.loopwatch(max_block=0.05)
async def test_awaits():
    await asyncio.sleep(0.15)
"""
    path = pytester.makepyfile(test_it=source)
    result = pytester.runpytest_subprocess("-p", "asyncio", "--asyncio-mode=strict")
    result.assert_outcomes(passed=1, failed=1)
    line = _line_of(path.read_text(), "BLOCKING-LINE")
    result.stdout.fnmatch_lines([
        "*loopwatch: the event loop was blocked 1 time(s) for 50 ms or more*",
        f"*test_it.py:{line} in blocking_call*asyncio.sleep*",
    ])


def test_limit_above_the_block_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it=HEADER + """
@pytest.mark.asyncio
@pytest.mark.loopwatch(max_block=0.5)
async def test_blocks_less_than_limit():
    blocking_call()
    await asyncio.sleep(0)
""")
    result = pytester.runpytest_subprocess("-p", "asyncio")
    result.assert_outcomes(passed=1)


def test_command_line_option_applies_to_every_async_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it=HEADER + """
@pytest.mark.asyncio
async def test_one():
    blocking_call()
    await asyncio.sleep(0)

@pytest.mark.asyncio
async def test_two():
    await asyncio.sleep(0.01)

def test_sync():
    blocking_call()
""")
    result = pytester.runpytest_subprocess("-p", "asyncio", "--loopwatch-max-block=0.1")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_one*"])
    result = pytester.runpytest_subprocess("-p", "asyncio")
    result.assert_outcomes(passed=3)


def test_fixture_exposes_blocks_without_failing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it=HEADER + """
@pytest.mark.asyncio
async def test_sees_blocks(loopwatch):
    blocking_call()
    await asyncio.sleep(0.02)
    assert len(loopwatch.blocks) == 1
    assert loopwatch.blocks[0].hint and "asyncio.sleep" in loopwatch.blocks[0].hint

@pytest.mark.asyncio
async def test_assert_helper(loopwatch):
    blocking_call()
    await asyncio.sleep(0.02)
    loopwatch.assert_no_blocks(max_block=0.1)
""")
    result = pytester.runpytest_subprocess("-p", "asyncio")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_assert_helper*", "*blocked 1 time(s) for 100 ms*"])


def test_uvloop_tests_are_watched_too(pytester: pytest.Pytester) -> None:
    pytester.makeconftest("""
import pytest, uvloop

@pytest.fixture(scope="session")
def event_loop_policy():
    return uvloop.EventLoopPolicy()
""")
    pytester.makepyfile(test_it=HEADER + """
@pytest.mark.asyncio
@pytest.mark.loopwatch(max_block=0.05)
async def test_blocks_on_uvloop():
    assert "uvloop" in type(asyncio.get_running_loop()).__module__
    await asyncio.create_task(asyncio.to_thread(lambda: None))
    blocking_call()
    await asyncio.sleep(0.02)
""")
    result = pytester.runpytest_subprocess("-p", "asyncio", "-W", "ignore::DeprecationWarning")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*blocked 1 time(s)*", "*blocking_call*"])


def test_bad_marker_arguments_are_usage_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it="""
import pytest

@pytest.mark.asyncio
@pytest.mark.loopwatch(max_block=-1)
async def test_bad():
    pass
""")
    result = pytester.runpytest_subprocess("-p", "asyncio")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*invalid loopwatch max_block=-1*allowed*"])


def test_bad_command_line_value_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--loopwatch-max-block=0")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*invalid --loopwatch-max-block=0.0*allowed*"])
