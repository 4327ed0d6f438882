"""The C hot path (loopwatch._speedups) and its pure-Python twins do the same thing.

Each twin is tested side by side with the other on the same inputs: the step hooks
(``Handle._run`` for asyncio, ``TimedCoroutine`` for uvloop), the request owner that is the
request's ``send``, and the running totals of a (method, route). The whole suite runs the C
path where it was built; ``test_pure_python_path_end_to_end`` runs the middleware and monitor
tests again with ``LOOPWATCH_PURE_PYTHON=1``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import math
import os
import random
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

import pytest

from loopwatch import _hooks, _metrics, _middleware
from loopwatch._accel import StepState, speedups
from loopwatch._attribution import Owner, current_owner

from needs import missing

ROOT = Path(__file__).resolve().parent.parent


def _c() -> Any:
    if speedups is None:
        missing("loopwatch._speedups was not built (no compiler at install time?)")
    return speedups


def test_the_extension_is_built_and_in_use() -> None:
    """CI installs with a compiler: the figures in docs/performance.md are for the C path."""
    c = _c()
    assert _hooks._timed is c.timed
    assert _middleware._new_owner is c.new_owner
    assert _metrics._new_totals is c.Totals
    # Its clock is time.perf_counter's (the watchdog compares the two).
    before = time.perf_counter()
    now = c.clock()
    after = time.perf_counter()
    assert before <= now <= after


# -- running totals -------------------------------------------------------------------------

BOUNDS_D = (0.005, 0.01, 0.025, 0.05, 0.1)
BOUNDS_B = (0.0005, 0.001, 0.0025)


def _totals_kinds() -> list[Any]:
    return [pytest.param(_metrics.Totals, id="python"), pytest.param("c", id="c")]


def _make_totals(kind: Any) -> Any:
    cls = _c().Totals if kind == "c" else kind
    return cls(BOUNDS_D, BOUNDS_B)


@pytest.mark.parametrize("kind", _totals_kinds())
def test_totals_match_prometheus_bucketing_on_edges(kind: Any) -> None:
    totals = _make_totals(kind)
    values = [0.0, 0.005, 0.0050001, 0.01, 0.1, 0.1000001, 5.0, float("nan")]
    for v in values:
        totals.add(200, v, v / 10)
    d, b, d_sum, b_sum, statuses, count = totals.snapshot()
    # A value equal to a bound is in that bound's bucket, as prometheus_client's observe()
    # puts it (bisect_left); NaN lands in the first.
    assert d == [3, 2, 0, 0, 1, 2]
    expected_b = [0] * (len(BOUNDS_B) + 1)
    for v in values:
        expected_b[bisect.bisect_left(BOUNDS_B, v / 10)] += 1
    assert b == expected_b
    assert count == len(values) and statuses == {200: len(values)}
    assert math.isnan(d_sum) and math.isnan(b_sum)


@pytest.mark.parametrize("kind", _totals_kinds())
def test_totals_statuses_in_and_out_of_the_usual_range(kind: Any) -> None:
    totals = _make_totals(kind)
    for status in (200, 200, 404, 599, 100, 0, 99, 600, 1000, 500):
        totals.add(status, 0.001, 0.0)
    statuses = totals.snapshot()[4]
    assert statuses == {200: 2, 404: 1, 599: 1, 100: 1, 0: 1, 99: 1, 600: 1, 1000: 1, 500: 1}
    assert totals.count == 10


def test_c_and_python_totals_agree_on_random_values() -> None:
    c_totals = _make_totals("c")
    py_totals = _make_totals(_metrics.Totals)
    rng = random.Random(7)
    for _ in range(5000):
        status = rng.choice((200, 201, 404, 500, 503))
        duration = rng.expovariate(40)
        blocking = rng.choice((0.0, rng.expovariate(1000), *BOUNDS_B))
        c_totals.add(status, duration, blocking)
        py_totals.add(status, duration, blocking)
    c_snap, py_snap = c_totals.snapshot(), py_totals.snapshot()
    assert c_snap[0] == py_snap[0] and c_snap[1] == py_snap[1]
    assert c_snap[2] == pytest.approx(py_snap[2], rel=1e-12)
    assert c_snap[3] == pytest.approx(py_snap[3], rel=1e-12)
    assert c_snap[4] == py_snap[4] and c_snap[5] == py_snap[5] == 5000


def test_c_totals_refuse_bad_input_by_name() -> None:
    c = _c()
    with pytest.raises(ValueError, match="duration bounds must increase"):
        c.Totals((0.1, 0.05), BOUNDS_B)
    with pytest.raises(TypeError):
        c.Totals(None, BOUNDS_B)
    totals = c.Totals(BOUNDS_D, BOUNDS_B)
    with pytest.raises(TypeError):
        totals.add("200", 0.1, 0.0)
    with pytest.raises(TypeError, match=r"add\(\) takes"):
        totals.add(200, 0.1)
    assert totals.count == 0  # nothing half-recorded


# -- the request owner, which is the request's send -----------------------------------------

def _owner_makers() -> list[Any]:
    return [pytest.param(_middleware._py_new_owner, id="python"), pytest.param("c", id="c")]


def _new_owner(maker: Any, scope: Any, send: Any) -> Any:
    """An owner and the request's send it gives the app (the C owner is its own send)."""
    if maker == "c":
        owner = _c().new_owner(scope, "", send)
        return owner, owner
    owner = maker(scope, "", send)
    return owner, owner.send_wrapper


@pytest.mark.parametrize("maker", _owner_makers())
def test_owner_as_send_notes_status_and_end_and_returns_the_servers_awaitable(
    maker: Any,
) -> None:
    seen: list[Any] = []
    marker = object()

    def server_send(message: Any) -> Any:
        seen.append(message)
        return marker

    scope = {"type": "http", "method": "GET", "path": "/x"}
    owner, send = _new_owner(maker, scope, server_send)
    assert owner.busy == 0.0 and owner.status == 0 and owner.ended == 0.0
    start = {"type": "http.response.start", "status": 201, "headers": []}
    assert send(start) is marker
    assert owner.status == 201 and owner.ended == 0.0
    part = {"type": "http.response.body", "body": b"a", "more_body": True}
    assert send(part) is marker and owner.ended == 0.0
    before = time.perf_counter()
    last = {"type": "http.response.body", "body": b"b"}
    assert send(last) is marker
    assert before <= owner.ended <= time.perf_counter()
    assert seen == [start, part, last]  # the very same objects, unchanged
    assert start == {"type": "http.response.start", "status": 201, "headers": []}


@pytest.mark.parametrize("maker", _owner_makers())
def test_owner_as_send_leaves_odd_messages_to_the_server(maker: Any) -> None:
    """Whatever the app sends, the server's send sees it and answers as without loopwatch."""
    seen: list[Any] = []

    def server_send(message: Any) -> Any:
        seen.append(message)
        if not isinstance(message, dict) or "type" not in message:
            raise KeyError("type")
        return None

    owner, send = _new_owner(maker, {"method": "GET"}, server_send)
    if maker == "c":  # the C twin never raises on its own; the server's send does
        with pytest.raises(KeyError):
            send({})
        send({"type": "http.response.start"})  # no status: noted as none
        assert owner.status == 0
        send({"type": "http.response.start", "status": "200"})
        assert owner.status == 0
    assert send({"type": "websocket.send", "text": "x"}) is None
    assert seen[-1] == {"type": "websocket.send", "text": "x"}


def test_c_owner_is_charged_by_the_hooks_and_labels_itself() -> None:
    c = _c()
    scope = {"type": "http", "method": "BREW", "path": "/pot", "root_path": ""}
    owner = c.new_owner(scope, "", None)
    owner.busy += 0.25
    assert owner.busy == 0.25
    assert owner.labels() == ("_OTHER", "<unmatched>")
    assert "busy=0.25" in repr(owner)
    assert {owner: 1}[owner] == 1  # hashable (the middleware keeps owners in a set)


# -- the step hooks --------------------------------------------------------------------------

class FakeMonitor:
    """What the hooks touch on a Monitor, recorded."""

    def __init__(self, threshold: float = 10.0) -> None:
        self.step_start = 0.0
        self.busy = 0.0
        self.threshold = threshold
        self.blocks: list[tuple[float, float, Any, Any]] = []
        self.starts_seen: list[float] = []

    def on_block(self, t0: float, dt: float, owner: Any, callback: Any) -> None:
        self.blocks.append((t0, dt, owner, callback))


def _timed_makers() -> list[Any]:
    return [pytest.param(_hooks._py_timed, id="python"), pytest.param("c", id="c")]


def _timed(maker: Any, coro: Any, monitor: Any) -> Any:
    make = _c().timed if maker == "c" else maker
    return make(coro, monitor)


@types.coroutine
def _yield(value: Any = None) -> Any:
    return (yield value)


@pytest.mark.parametrize("maker", _timed_makers())
def test_timed_coroutine_runs_and_charges_each_step(maker: Any) -> None:
    monitor = FakeMonitor(threshold=0.015)
    owner = Owner("GET", "/x")

    async def body() -> str:
        monitor.starts_seen.append(monitor.step_start)
        got = await _yield("first")
        time.sleep(0.02)  # a block in the second step
        await _yield("second")
        return f"done {got}"

    async def drive() -> Any:  # as a task would, inside a running loop
        ctx = contextvars.copy_context()
        ctx.run(current_owner.set, owner)
        timed = _timed(maker, body(), monitor)
        assert ctx.run(timed.send, None) == "first"
        assert monitor.starts_seen[0] > 0 and monitor.step_start == 0.0
        assert ctx.run(timed.send, 42) == "second"
        with pytest.raises(StopIteration) as stop:
            ctx.run(timed.send, None)
        assert stop.value.value == "done 42"
        return asyncio.current_task()

    driver = asyncio.run(drive())
    assert 0.02 <= owner.busy == pytest.approx(monitor.busy, abs=1e-9)
    assert len(monitor.blocks) == 1
    assert monitor.blocks[0][3] is driver  # the block names the task that ran the step
    t0, dt, blamed, _task = monitor.blocks[0]
    assert blamed is owner and dt >= 0.02


@pytest.mark.parametrize("maker", _timed_makers())
def test_timed_coroutine_delegates_throw_close_and_introspection(maker: Any) -> None:
    monitor = FakeMonitor()

    async def body() -> None:
        try:
            await _yield()
        except ValueError as exc:
            await _yield(f"caught {exc}")
        await _yield("again")

    coro = body()
    timed = _timed(maker, coro, monitor)
    assert timed.wrapped() is coro
    assert timed.cr_frame is coro.cr_frame and timed.__qualname__ == coro.__qualname__
    assert repr(timed) == repr(coro)
    timed.send(None)
    assert timed.throw(ValueError("x")) == "caught x"
    timed.close()
    assert coro.cr_frame is None  # closed
    with pytest.raises(AttributeError):
        timed.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("maker", _timed_makers())
def test_timed_coroutine_passes_exceptions_through(maker: Any) -> None:
    monitor = FakeMonitor()

    async def body() -> None:
        raise LookupError("from the app")

    timed = _timed(maker, body(), monitor)
    with pytest.raises(LookupError, match="from the app"):
        timed.send(None)
    assert monitor.step_start == 0.0 and monitor.busy > 0


def test_c_timed_coroutine_runs_as_a_task_with_the_c_fast_path() -> None:
    """A Task takes the C TimedCoroutine (it is a Coroutine) and steps it by am_send."""
    c = _c()
    monitor = FakeMonitor()

    async def child(n: int) -> int:
        for _ in range(n):
            await asyncio.sleep(0)
        return n

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.Task(c.timed(child(i), monitor), loop=loop) for i in range(5)]
        return list(await asyncio.gather(*tasks))

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]
    assert monitor.busy > 0


class PythonGetCoroTask(asyncio.Task):  # type: ignore[type-arg]
    """A Task type whose get_coro is a Python method: unwrap_get_coro leaves it alone."""

    def get_coro(self) -> Any:
        return super().get_coro()


def test_c_timed_coroutine_called_is_its_coroutine_and_stands_in_for_get_coro() -> None:
    """Where the Task type's get_coro does not unwrap, the C factory shadows each task's
    get_coro with the TimedCoroutine itself (no bound method per task): called, it returns
    the task's own coroutine, and takes no arguments."""
    c = _c()
    monitor = StateMonitor()
    monitor.active = True
    factory = c.TaskFactory(monitor, lambda loop, coro, **kw: asyncio.Task(coro, loop=loop),
                            PythonGetCoroTask)

    async def work() -> int:
        await asyncio.sleep(0)
        return 3

    async def main() -> None:
        coro = work()
        task = factory(asyncio.get_running_loop(), coro)
        timed = task.get_coro  # the instance attribute: the wrapper itself
        assert type(timed) is c.TimedCoroutine and timed._coro is coro and timed() is coro
        assert task.get_coro() is coro
        with pytest.raises(TypeError, match=r"get_coro\(\) takes no arguments"):
            timed(1)
        with pytest.raises(TypeError, match=r"get_coro\(\) takes no arguments"):
            timed(x=1)
        assert await task == 3

    asyncio.run(main())
    assert monitor.busy > 0


def test_c_task_get_coro_unwraps_for_the_process_and_no_task_shadows_it() -> None:
    """unwrap_get_coro replaces asyncio.Task's own get_coro, once per process: a task over a
    C TimedCoroutine answers with its own coroutine, any other task exactly as before. The
    factory's tasks then carry no get_coro of their own (an instance dict per task)."""
    import inspect

    c = _c()
    assert c.unwrap_get_coro(asyncio.Task) is True
    assert c.unwrap_get_coro(asyncio.Task) is True  # done already: the same answer
    method = vars(asyncio.Task)["get_coro"]
    assert type(method) is type(vars(asyncio.Task)["done"])  # a C method of the type's own
    assert method.__objclass__ is asyncio.Task
    assert str(inspect.signature(asyncio.Task.get_coro)) == "(self, /)"
    # Nothing else: a Python get_coro, a type without one, something not a type.
    assert c.unwrap_get_coro(PythonGetCoroTask) is False
    assert c.unwrap_get_coro(int) is False
    with pytest.raises(TypeError, match="takes a Task type, not int"):
        c.unwrap_get_coro(1)
    with pytest.raises(TypeError, match="doesn't apply to a 'object' object"):
        asyncio.Task.get_coro(object())

    monitor = StateMonitor()
    monitor.active = True
    factory = c.TaskFactory(monitor, lambda loop, coro, **kw: asyncio.Task(coro, loop=loop),
                            asyncio.Task)

    async def work(n: int) -> int:
        await asyncio.sleep(0)
        return n

    async def main() -> None:
        loop = asyncio.get_running_loop()
        coro, plain_coro, by_hand_coro = work(1), work(2), work(3)
        task = factory(loop, coro)
        plain = asyncio.Task(plain_coro, loop=loop)
        by_hand = asyncio.Task(c.timed(by_hand_coro, monitor), loop=loop)
        assert type(task._coro) is c.TimedCoroutine and task.get_coro() is coro
        assert task.get_coro.__self__ is task  # the type's method, no attribute of the task
        assert plain.get_coro() is plain_coro and by_hand.get_coro() is by_hand_coro
        assert await asyncio.gather(task, plain, by_hand) == [1, 2, 3]
        assert task.get_coro() is coro and plain.get_coro() is plain_coro

    asyncio.run(main())
    assert monitor.busy > 0


def test_c_accounting_failure_never_changes_the_step() -> None:
    """A monitor whose accounting raises: the step's result still comes through, the
    failure is reported as unraisable (never raised into the app)."""
    c = _c()

    class Broken(FakeMonitor):
        def on_block(self, *args: Any) -> None:
            raise RuntimeError("sink broke")

    monitor = Broken(threshold=0.0)
    caught: list[Any] = []

    async def body() -> str:
        return "fine"

    async def drive() -> Any:
        with pytest.raises(StopIteration) as stop:
            c.timed(body(), monitor).send(None)
        return stop.value.value

    old_hook = sys.unraisablehook
    sys.unraisablehook = caught.append
    try:
        assert asyncio.run(drive()) == "fine"
    finally:
        sys.unraisablehook = old_hook
    assert len(caught) == 1 and isinstance(caught[0].exc_value, RuntimeError)


def _run_hooks() -> list[Any]:
    return [pytest.param(_hooks._py_timed_run, id="python"), pytest.param("c", id="c")]


class StateMonitor(StepState, FakeMonitor):  # type: ignore[misc]
    """A FakeMonitor on the StepState base, as Monitor is (the C hooks' direct path)."""


@pytest.mark.parametrize("monitor_type", [FakeMonitor, StateMonitor])
@pytest.mark.parametrize("hook", _run_hooks())
def test_handle_run_hook_times_the_callback_and_charges_its_context(
    hook: Any, monitor_type: type,
) -> None:
    run = _c().handle_run(asyncio.events.Handle) if hook == "c" else hook
    loop = asyncio.new_event_loop()
    try:
        monitor = monitor_type(threshold=0.015)
        owner = Owner("GET", "/h")
        ctx = contextvars.copy_context()
        ctx.run(current_owner.set, owner)
        calls: list[Any] = []

        def callback(x: int) -> None:
            calls.append((x, monitor.step_start))
            time.sleep(0.02)

        handle = asyncio.Handle(callback, (7,), loop, context=ctx)
        loop._loopwatch_monitor = monitor  # type: ignore[attr-defined]
        run(handle)
        assert calls[0][0] == 7 and calls[0][1] > 0 and monitor.step_start == 0.0
        assert owner.busy >= 0.02 and owner.busy == pytest.approx(monitor.busy, abs=1e-9)
        assert monitor.blocks[0][2] is owner and monitor.blocks[0][3] is callback

        # Not watched: the callback runs, nothing is charged.
        loop._loopwatch_monitor = None  # type: ignore[attr-defined]
        busy = monitor.busy
        run(asyncio.Handle(lambda *a: calls.append(a), (1, 2, 3), loop))
        assert calls[-1] == (1, 2, 3) and monitor.busy == busy
    finally:
        del loop._loopwatch_monitor  # type: ignore[attr-defined]
        loop.close()


def _failing_handle_reports(run: Any, watched: bool) -> tuple[dict[str, Any], Any]:
    """The exception-handler context the loop gets for a callback that raises."""
    loop = asyncio.new_event_loop()
    try:
        if watched:
            loop._loopwatch_monitor = StateMonitor()  # type: ignore[attr-defined]
        errors: list[dict[str, Any]] = []
        marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="")

        def handler(_loop: Any, context: dict[str, Any]) -> None:
            # Python >= 3.12 runs a custom handler in the handle's context (the context's
            # own run() again); before, a handler could run something there itself.
            there = (marker.get() if sys.version_info >= (3, 12)
                     else context["handle"]._context.run(marker.get))
            errors.append({**context, "handler saw": marker.get(), "ran there": there})

        loop.set_exception_handler(handler)

        def broken_callback(x: int) -> None:
            raise ZeroDivisionError(f"bad {x}")

        ctx = contextvars.copy_context()
        ctx.run(marker.set, "the handle's")
        handle = asyncio.Handle(broken_callback, (5,), loop, context=ctx)
        run(handle)
        assert handle._context is ctx  # type: ignore[attr-defined]  # put back
        (context,) = errors
        return context, handle
    finally:
        loop.close()


@pytest.mark.parametrize("hook", _run_hooks())
@pytest.mark.parametrize("watched", [True, False])
def test_handle_run_hook_reports_a_failing_callback_exactly_as_asyncio(
    hook: Any, watched: bool,
) -> None:
    run = _c().handle_run(asyncio.events.Handle) if hook == "c" else hook
    ours, handle = _failing_handle_reports(run, watched)
    original, original_handle = _failing_handle_reports(_hooks._original_run, False)
    assert ours["handle"] is handle
    assert ours["message"] == original["message"].replace(
        hex(id(original_handle)), hex(id(handle)))
    assert ours.keys() == original.keys()
    assert ours["ran there"] == original["ran there"] == "the handle's"
    assert ours["handler saw"] == original["handler saw"]
    exc = ours["exception"]
    assert isinstance(exc, ZeroDivisionError) and str(exc) == "bad 5"
    names = [f.name for f in traceback.extract_tb(exc.__traceback__)]
    expected = [f.name for f in traceback.extract_tb(
        original["exception"].__traceback__)]
    assert names == expected == ["_run", "broken_callback"]


@pytest.mark.parametrize("hook", _run_hooks())
def test_handle_run_hook_lets_system_exit_through(hook: Any) -> None:
    run = _c().handle_run(asyncio.events.Handle) if hook == "c" else hook
    loop = asyncio.new_event_loop()
    try:
        loop._loopwatch_monitor = StateMonitor()  # type: ignore[attr-defined]

        def leave() -> None:
            raise SystemExit(3)

        with pytest.raises(SystemExit):
            run(asyncio.Handle(leave, (), loop))
    finally:
        loop.close()


def test_c_task_factory_times_plain_coroutines_and_defers_the_rest() -> None:
    c = _c()
    monitor = StateMonitor()
    monitor.active = True
    deferred: list[Any] = []

    def fallback(loop: Any, coro: Any, **kwargs: Any) -> Any:
        deferred.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    factory = c.TaskFactory(monitor, fallback, asyncio.Task)
    assert factory.fallback is fallback

    async def work(n: int) -> int:
        await asyncio.sleep(0)
        return n * 2

    @types.coroutine
    def generator_based() -> Any:
        yield
        return "gen"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(factory)
        coro = work(21)
        task = loop.create_task(coro)
        assert type(task) is asyncio.Task and task.get_coro() is coro
        assert await task == 42 and not deferred
        gen = generator_based()
        if sys.version_info < (3, 12):
            assert await loop.create_task(gen) == "gen" and deferred == [gen]
        else:  # no Task takes a generator-based coroutine any more: the fallback's answer
            with pytest.raises(TypeError):
                loop.create_task(gen)
            assert deferred == [gen]
        # A context= (uvloop passes context=None with every task) goes to the Task.
        ctx = contextvars.copy_context()
        ctx.run(current_owner.set, Owner("GET", "/ctx"))

        async def owner_route() -> Any:
            return current_owner.get().route  # type: ignore[union-attr]

        if sys.version_info >= (3, 11):
            assert await loop.create_task(owner_route(), context=ctx) == "/ctx"
        else:  # no context= yet: a task copies the context it is created in
            assert await ctx.run(loop.create_task, owner_route()) == "/ctx"
        assert await factory(loop, work(1), context=None) == 2
        assert len(deferred) == 1
        odd = work(1)
        with pytest.raises(TypeError):
            factory(loop, odd, bogus=1)  # the fallback's answer (here: Task's) to the unknown
        assert deferred[-1] is odd
        odd.close()
        monitor.active = False
        idle = work(2)
        assert await loop.create_task(idle) == 4 and deferred[-1] is idle
        loop.set_task_factory(None)

    busy_before = monitor.busy
    asyncio.run(main())
    assert monitor.busy > busy_before


# -- the pure-Python path, end to end ---------------------------------------------------------

def test_pure_python_path_end_to_end() -> None:
    """The middleware and monitor suites again, with LOOPWATCH_PURE_PYTHON=1 (the path of an
    install without a compiler), in a fresh interpreter."""
    env = {**os.environ, "LOOPWATCH_PURE_PYTHON": "1"}
    check = subprocess.run(
        [sys.executable, "-c", "from loopwatch._accel import StepState, speedups; print(speedups)"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert check.stdout.strip() == "None"
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
             "tests/test_middleware.py", "tests/test_monitor.py", "tests/test_metrics.py",
             "-k", "not pure_python"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )

    # These suites have real-server timing tests; on a loaded machine one of them can be
    # unlucky once. A second run must pass whole, and the first run's failure is shown.
    first = run()
    proc = first if first.returncode == 0 else run()
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    if proc is not first:
        tail += "\n--- first run ---\n" + first.stdout[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


# -- references: the C objects let go of what they hold ---------------------------------------

def test_c_hot_path_leaks_no_references() -> None:
    """After thousands of tasks, requests and failing callbacks through the C path, every
    object they touched is back to the reference count it started with."""
    c = _c()
    monitor = StateMonitor()
    monitor.active = True
    result = object()
    scope = {"type": "http", "method": "GET", "path": "/r"}
    error = ValueError("kept by the test")

    def server_send(message: Any) -> Any:
        return None

    async def child() -> object:
        await asyncio.sleep(0)
        return result

    def broken() -> None:
        raise error

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert c.unwrap_get_coro(asyncio.Task)
        # asyncio.Task: get_coro() unwraps; PythonGetCoroTask: shadowed on each task
        for task_type in (asyncio.Task, PythonGetCoroTask):
            loop.set_task_factory(c.TaskFactory(monitor, lambda *a, **k: None, task_type))
            for _ in range(1000):
                assert await loop.create_task(child()) is result
        loop.set_task_factory(None)

    before = (sys.getrefcount(monitor), sys.getrefcount(result), sys.getrefcount(scope),
              sys.getrefcount(server_send), sys.getrefcount(error))
    asyncio.run(main())
    for _ in range(2000):
        owner = c.new_owner(scope, "", server_send)
        owner({"type": "http.response.start", "status": 200})
        owner({"type": "http.response.body", "body": b""})
        del owner
    loop = asyncio.new_event_loop()
    loop._loopwatch_monitor = monitor  # type: ignore[attr-defined]
    loop.set_exception_handler(lambda _loop, _context: None)
    run = c.handle_run(asyncio.events.Handle)
    for _ in range(500):
        run(asyncio.Handle(broken, (), loop))
    del loop._loopwatch_monitor  # type: ignore[attr-defined]
    loop.close()
    del loop, run
    error.__traceback__ = None  # the traceback of the last raise refers to frames, not leaks
    after = (sys.getrefcount(monitor), sys.getrefcount(result), sys.getrefcount(scope),
             sys.getrefcount(server_send), sys.getrefcount(error))
    assert after == before


def test_c_in_flight_behaves_as_the_set_it_replaces() -> None:
    """The middleware's in-flight container: C owners are linked through their own fields,
    anything else kept in a set; it behaves as a set of its members would, holds each member
    while it is in, and lets the collector through the cycles a member can close."""
    import gc
    import weakref

    c = _c()
    in_flight, reference = c.InFlight(), set()
    owners = [c.new_owner({}, "", None) for _ in range(5)]
    plain = _middleware._py_new_owner({}, "", None)
    other = c.InFlight()
    other.add(owners[4])  # linked in another: kept here in the set beside the links
    steps = [("add", 0), ("add", 1), ("add", 0), ("add", "plain"), ("add", 4),
             ("discard", 1), ("discard", 1), ("add", 2), ("discard", "plain"), ("add", 3),
             ("discard", 0), ("add", 1), ("add", "plain"), ("discard", 4), ("add", 4)]
    for verb, which in steps:
        member = plain if which == "plain" else owners[which]  # type: ignore[index]
        getattr(in_flight, verb)(member)
        getattr(reference, verb)(member)
        assert len(in_flight) == len(reference) and bool(in_flight) == bool(reference)
        assert set(in_flight) == reference and sorted(map(id, in_flight.list())) == sorted(
            map(id, reference))
        assert all((m in in_flight) == (m in reference) for m in [*owners, plain])
    other.discard(owners[4])
    assert owners[4] in in_flight and len(other) == 0
    in_flight.discard(owners[4])
    in_flight.add(owners[4])  # now free: linked
    assert owners[4] in in_flight and len(in_flight) == len(reference)

    first = owners[0]
    before = sys.getrefcount(first)
    in_flight.add(first)
    held = sys.getrefcount(first)  # (not inside the assert: pytest keeps its operands)
    in_flight.discard(first)
    after = sys.getrefcount(first)
    assert (held, after) == (before + 1, before)  # held while in, let go after

    cyclic = c.InFlight()
    owner = c.new_owner({"kept": cyclic}, "", None)  # owner -> scope -> in-flight -> owner
    cyclic.add(owner)
    gone = weakref.ref(owner)
    del owner, cyclic
    gc.collect()
    assert gone() is None
    with pytest.raises(TypeError, match="takes no arguments"):
        c.InFlight([])


# -- the end of a request -------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["python", "c"])
def test_finish_records_into_cached_totals_or_hands_back_what_to_record(impl: Any) -> None:
    from loopwatch._monitor import Monitor

    if impl == "c":
        c = _c()
        finish, new_totals = c.finish, c.Totals
        new = c.new_owner
    else:
        finish, new_totals = _middleware._py_finish, _metrics.Totals
        new = _middleware._py_new_owner
    route = object()
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/r", "route": route}
    totals = new_totals(BOUNDS_D, BOUNDS_B)
    cache: dict[Any, Any] = {("GET", id(route)): (route, totals, "GET", "/r")}
    monitor = Monitor()
    owner = new(scope, "", None)
    owner.busy = 0.002
    owner.status = 201
    start = time.perf_counter() - 0.02

    # Cached, no step running: recorded with the owner's own loop time.
    assert finish(owner, monitor, start, cache, scope, "") is None
    d, b, d_sum, b_sum, statuses, count = totals.snapshot()
    assert count == 1 and statuses == {201: 1}
    assert 0.02 <= d_sum < 1.0 and b_sum == pytest.approx(0.002)
    # Released: the labels stay (for a block event of the last step), the request goes.
    assert owner.labels() == ("GET", "/r")
    assert owner.scope is None and owner.send is None and owner.root_path is None

    # A step still running: its time so far is charged, and the monitor remembers the owner.
    monitor.step_start = time.perf_counter() - 0.005
    owner.ended = start + 0.001
    assert finish(owner, monitor, start, cache, scope, "") is None
    d, b, d_sum2, b_sum2, statuses, count = totals.snapshot()
    assert count == 2 and d_sum2 - d_sum == pytest.approx(0.001)
    assert 0.007 <= b_sum2 - b_sum < 0.5
    assert monitor._closing == (monitor.step_start, owner)
    monitor.step_start = 0.0

    # Not cached (another route, another root_path, no route): handed back.
    owner.status = 0  # no response started: recorded as 500
    for other_scope, root in ((dict(scope, route=object()), ""), (scope, "/api"),
                              ({k: v for k, v in scope.items() if k != "route"}, "")):
        missed = finish(owner, None, start, cache, other_scope, root)
        assert missed is not None and missed[0] == 500 and missed[2] == pytest.approx(0.002)
        assert missed[1] == pytest.approx(0.001)  # (ended - start)
    assert totals.count == 2
    # A scope that is another mapping: recorded (Python) or handed back (C), never lost.
    missed = finish(owner, None, start, cache, types.MappingProxyType(scope), "")
    assert (missed is None and totals.count == 3) or (missed and missed[0] == 500)


@pytest.mark.parametrize("maker", _owner_makers())
def test_a_released_owner_refuses_late_sends_by_name(maker: Any) -> None:
    """After the app returned, the owner holds no send: a late call says so."""
    owner, send = _new_owner(maker, {"method": "GET"}, lambda message: None)
    release = _c().release if maker == "c" else type(owner).release
    release(owner, "GET", "/x")
    with pytest.raises(RuntimeError, match="after the application returned"):
        send({"type": "http.response.body", "body": b""})


# -- the request path: a measured request without a coroutine of the middleware's own -----------

def _http(path: str = "/r") -> dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _request_outcome(impl: str, app: Any, drive: Any, path: str = "/r") -> dict[str, Any]:
    """Run one request through the C request path or the middleware's Python coroutine, in a
    timed step of a running monitor, and report everything observable about it."""
    from prometheus_client import CollectorRegistry

    from loopwatch import LoopWatchMiddleware

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    registry = CollectorRegistry()
    outcome: dict[str, Any] = {}

    async def main() -> None:
        mw = LoopWatchMiddleware(app, registry=registry, log_blocks=False)
        await mw(_http("/warm-up"), _receive, send)  # starts the monitor
        await asyncio.sleep(0)  # the next step is a timed one
        if impl == "python":
            mw._serve = None
        else:
            assert mw._serve is not None
        holder = [mw(_http(path), _receive, send)]  # the drive holds the only reference
        outcome["type"] = type(holder[0]).__name__
        try:
            outcome["result"] = ("returned", await drive(holder))
        except BaseException as exc:  # noqa: BLE001 - compared between the two paths
            outcome["result"] = ("raised", type(exc).__name__, str(exc))
        await asyncio.sleep(0)
        outcome["owner after"] = current_owner.get()
        outcome["in flight"] = len(mw._in_flight)
        mw.metrics.flush()
        mw._stop()

    asyncio.run(main())
    outcome["sent"] = sent
    outcome["requests"] = sorted(
        (s.labels["route"], s.labels["status"], s.value)
        for metric in registry.collect() if metric.name == "loopwatch_requests"
        for s in metric.samples if s.name == "loopwatch_requests_total"
    )
    outcome["internal errors"] = registry.get_sample_value("loopwatch_internal_errors_total")
    return outcome


async def _await(holder: list[Any]) -> Any:
    return await holder.pop()


async def _cancel_soon(holder: list[Any]) -> Any:
    task = asyncio.ensure_future(_await(holder))
    await asyncio.sleep(0)
    task.cancel()
    return await task


async def _close_midway(holder: list[Any]) -> Any:
    driver = _await(holder)
    driver.send(None)  # the app waits for a future that never comes
    driver.close()
    return "closed"


async def _dropped_midway(holder: list[Any]) -> Any:
    awaitable = holder.pop()
    awaitable.send(None)
    del awaitable  # the coroutine (or RequestCall) is finalized without a close()
    return "dropped"


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": []})
    await asyncio.sleep(0)
    await send({"type": "http.response.body", "body": b"ok"})


async def _failing_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["path"] == "/warm-up":
        return await _ok_app(scope, receive, send)
    await asyncio.sleep(0)
    raise ValueError("the app's own error")


async def _waiting_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["path"] == "/warm-up":
        return await _ok_app(scope, receive, send)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await asyncio.get_running_loop().create_future()


class _AwaitableApp:
    """An ASGI app that returns a plain awaitable (no coroutine) with a value."""

    def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        return self._run(scope, receive, send).__await__()

    def __await__(self) -> Any:  # not used; the instance's call result is what is awaited
        raise AssertionError

    async def _run(self, scope: Any, receive: Any, send: Any) -> str:
        await _ok_app(scope, receive, send)
        return "value"


class _IterAwaitable:
    def __init__(self, it: Any) -> None:
        self.it = it

    def __await__(self) -> Any:
        return self.it


def _not_awaitable_app(scope: Any, receive: Any, send: Any) -> Any:
    if scope["path"] == "/warm-up":
        return _ok_app(scope, receive, send)
    return None


SCENARIOS = {
    "returns": (_ok_app, _await, "/r"),
    "raises": (_failing_app, _await, "/r"),
    "cancelled": (_waiting_app, _cancel_soon, "/r"),
    "closed midway": (_waiting_app, _close_midway, "/r"),
    "dropped midway": (_waiting_app, _dropped_midway, "/r"),
    "plain awaitable": (lambda s, r, se: _IterAwaitable(_AwaitableApp()(s, r, se)), _await, "/r"),
    "not awaitable": (_not_awaitable_app, _await, "/r"),
    "excluded path": (_ok_app, _await, "/metrics"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_c_request_path_does_what_the_middleware_coroutine_does(scenario: str) -> None:
    """Returns, raises, cancellation, close and finalization midway, awaitables that are not
    coroutines, an app that returns no awaitable, an excluded path: the same result, the same
    messages sent, the same requests recorded, nothing left in flight or in the context."""
    c = _c()
    app, drive, path = SCENARIOS[scenario]
    python = _request_outcome("python", app, drive, path)
    native = _request_outcome("c", app, drive, path)
    assert native["type"] == ("RequestCall" if path != "/metrics" else "coroutine")
    assert python["type"] == "coroutine"
    for key in ("result", "sent", "requests", "owner after", "in flight", "internal errors"):
        assert native[key] == python[key], key
    assert native["owner after"] is None and native["in flight"] == 0
    assert native["internal errors"] == 0
    recorded = {status: value for _route, status, value in native["requests"]}
    expected = {
        "returns": {"201": 2.0}, "raises": {"201": 1.0, "500": 1.0},
        "cancelled": {"201": 1.0, "200": 1.0}, "closed midway": {"201": 1.0, "200": 1.0},
        "dropped midway": {"201": 1.0, "200": 1.0}, "plain awaitable": {"201": 2.0},
        "not awaitable": {"201": 1.0, "500": 1.0}, "excluded path": {"201": 1.0},
    }[scenario]
    assert recorded == expected
    assert isinstance(c.RequestPath, type)


def test_the_middleware_is_an_asgi3_app_to_servers_and_frameworks() -> None:
    """Its __call__ is a C entry (with the extension): to inspect, and so to every server and
    framework that tells ASGI 3 apps by an async __call__, it is the async def it stands for,
    on every Python version."""
    import inspect

    import uvicorn
    from starlette._utils import is_async_callable

    from loopwatch import LoopWatchMiddleware

    mw = LoopWatchMiddleware(_ok_app)
    call = mw.__call__
    assert inspect.iscoroutinefunction(call)  # hypercorn, Python >= 3.10
    assert asyncio.iscoroutinefunction(call)  # asgiref, uvicorn
    assert is_async_callable(mw)  # Starlette
    assert call.__name__ == "_call" and "scope" in str(inspect.signature(call))
    assert inspect.signature(mw) == inspect.signature(call)
    config = uvicorn.Config(mw)
    config.load()
    assert config.interface == "asgi3"
    assert LoopWatchMiddleware.__call__.__doc__ == LoopWatchMiddleware._call.__doc__
    if speedups is not None:
        assert isinstance(LoopWatchMiddleware.__dict__["__call__"], speedups.AsgiEntry)


def test_asgi_entry_reads_serve_from_the_slot_or_else_the_attribute() -> None:
    """The middleware's base keeps ``_serve`` in a slot the entry reads directly; a class
    not built on that base has it read as an attribute. Either way: set, the request goes
    to it; None (or unset), to the coroutine the entry stands for."""
    c = _c()
    calls: list[tuple[str, tuple[Any, ...]]] = []

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        calls.append(("coroutine", (scope, receive, send)))

    def serve(*args: Any) -> str:
        calls.append(("serve", args))
        return "served"

    class OnSlot(c.ServeSlot):  # type: ignore[misc, name-defined]
        __call__ = c.AsgiEntry(call)

    class Plain:
        _serve: Any = None
        __call__ = c.AsgiEntry(call)

    for app in (OnSlot(), Plain()):
        calls.clear()
        assert app._serve is None
        asyncio.run(app(1, 2, 3))
        app._serve = serve
        assert app(4, 5, 6) == "served"
        app._serve = None
        asyncio.run(app(7, 8, 9))
        assert calls == [("coroutine", (1, 2, 3)), ("serve", (4, 5, 6)),
                         ("coroutine", (7, 8, 9))], type(app).__name__
    slot = OnSlot()
    slot._serve = serve
    del slot._serve  # unset: the coroutine
    asyncio.run(slot(1, 2, 3))
    assert calls[-1][0] == "coroutine"
    with pytest.raises(TypeError, match="takes no arguments"):
        c.ServeSlot(1)

    class WithInit(c.ServeSlot):  # type: ignore[misc, name-defined]
        def __init__(self, a: int, *, b: int) -> None:
            self.a, self.b = a, b

    made = WithInit(1, b=2)  # the arguments are __init__'s
    assert (made.a, made.b, made._serve, made.__dict__) == (1, 2, None, {"a": 1, "b": 2})
    if speedups is not None:
        from loopwatch import LoopWatchMiddleware

        assert isinstance(LoopWatchMiddleware(_ok_app), c.ServeSlot)


def test_c_request_path_hands_anything_it_does_not_measure_to_the_coroutine() -> None:
    """Outside a step this monitor times (not started, another loop, the hook removed) and for
    scopes other than HTTP, the middleware's own coroutine runs the request."""
    c = _c()
    from prometheus_client import CollectorRegistry

    from loopwatch import LoopWatchMiddleware

    mw = LoopWatchMiddleware(_ok_app, registry=CollectorRegistry(), log_blocks=False)
    seen: list[str] = []

    async def send(message: Any) -> None:
        seen.append(message["type"])

    async def main() -> None:
        await mw(_http(), _receive, send)
        assert mw._serve is not None  # started by that first request
        first = mw(_http(), _receive, send)  # still the untimed first step
        assert asyncio.iscoroutine(first)
        await first
        await asyncio.sleep(0)
        timed = mw(_http(), _receive, send)
        assert isinstance(timed, c.RequestCall)
        await timed
        websocket = mw({"type": "websocket", "path": "/ws"}, _receive, send)
        assert asyncio.iscoroutine(websocket)
        websocket.close()
        mw._stop()
        assert mw._serve is None

    asyncio.run(main())
    assert seen == ["http.response.start", "http.response.body"] * 3


def test_c_request_path_leaks_no_references() -> None:
    """Thousands of requests through RequestCall (returned, failed, closed midway) leave the
    app, receive, send and the middleware at the reference counts they started with."""
    c = _c()
    from prometheus_client import CollectorRegistry

    from loopwatch import LoopWatchMiddleware

    async def send(message: Any) -> None:
        pass

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/fail":
            raise KeyError("x")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/wait":
            await asyncio.get_running_loop().create_future()
        await send({"type": "http.response.body", "body": b""})

    mw = LoopWatchMiddleware(app, registry=CollectorRegistry(), log_blocks=False)

    def counts() -> tuple[int, ...]:
        # a coroutine left behind holds its code object (its frame is gone once it ended)
        return tuple(sys.getrefcount(o) for o in (app, app.__code__, _receive, send, mw,
                                                  mw.monitor))

    async def main() -> None:
        await mw(_http("/warm-up"), _receive, send)
        for path in ("/ok", "/fail", "/wait"):  # their (method, route) first seen
            try:
                driver = _await([mw(_http(path), _receive, send)])
                driver.send(None)
                driver.close()
            except (StopIteration, KeyError):
                pass
        await asyncio.sleep(0)
        before = counts()
        for _ in range(2000):
            request = mw(_http("/ok"), _receive, send)
            assert isinstance(request, c.RequestCall)
            await request
            del request
            try:
                await mw(_http("/fail"), _receive, send)
            except KeyError:
                pass
            driver = _await([mw(_http("/wait"), _receive, send)])
            driver.send(None)
            driver.close()
            del driver
        assert counts() == before
        assert not mw._in_flight
        mw._stop()

    asyncio.run(main())


def test_c_request_path_sends_the_last_body_without_the_request_in_the_context() -> None:
    """A server that starts a timer as the last body goes out (uvicorn's keep-alive timeout)
    copies the context: the copy does not hold the request's owner, which would keep it and
    the context variable's nodes alive for seconds per request. What runs after the body in
    the same request (background tasks) is still charged to it."""
    c = _c()
    from prometheus_client import CollectorRegistry

    from loopwatch import LoopWatchMiddleware

    timers: list[Any] = []
    seen: dict[str, Any] = {}

    async def server_send(message: Any) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            seen["owner in the send"] = current_owner.get()
            timers.append(asyncio.get_running_loop().call_later(60, lambda: None))
        await asyncio.sleep(0)  # and a send that suspends once (a full transport)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})
        seen["owner after the send"] = current_owner.get()
        busy = time.thread_time() + 0.02  # a background task's work, after the body
        while time.thread_time() < busy:
            pass

    mw = LoopWatchMiddleware(app, registry=CollectorRegistry(), log_blocks=False)

    async def main() -> None:
        await mw(_http("/warm-up"), _receive, server_send)
        await asyncio.sleep(0)
        before = mw._by_label[("GET", "<unmatched>")].totals.snapshot()
        request = mw(_http(), _receive, server_send)
        assert isinstance(request, c.RequestCall)
        await request
        after = mw._by_label[("GET", "<unmatched>")].totals.snapshot()
        seen["blocking"] = after[3] - before[3]
        assert current_owner.get() is None
        mw._stop()

    asyncio.run(main())
    assert seen["owner in the send"] is None
    assert seen["owner after the send"] is not None
    assert timers[-1]._context.get(current_owner) is None
    assert seen["blocking"] >= 0.02


def test_c_request_path_excludes_paths_and_finds_each_routes_totals() -> None:
    """Excluded paths (a few, compared by length first, or many, in a set) and their
    prefixes; requests that alternate between routes and methods each land in their own
    (method, route) totals, through the cache entry the C path remembers between requests,
    exactly as the coroutine records them."""
    _c()  # the C path, or a failure under CI
    from prometheus_client import CollectorRegistry

    from loopwatch import LoopWatchMiddleware

    class Route:
        def __init__(self, path: str) -> None:
            self.path = path

    routes = {"/a": Route("/a"), "/b": Route("/b/{x}")}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] in routes:
            scope["route"] = routes[scope["path"]]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Any) -> None:
        pass

    sequence = [("GET", "/a"), ("GET", "/a"), ("POST", "/a"), ("GET", "/b"), ("GET", "/a"),
                ("POST", "/b"), ("BREW", "/a"), ("GET", "/none"), ("GET", "/metricz"),
                ("GET", "/metrics"), ("GET", "/metrics/x"), ("GET", "/health"),
                ("GET", "/healthz"), ("GET", "/b"), ("POST", "/a")] * 3

    def recorded(impl: str, exclude: tuple[str, ...]) -> tuple[list[Any], list[str]]:
        registry = CollectorRegistry()
        types_seen: list[str] = []

        async def main() -> None:
            mw = LoopWatchMiddleware(app, registry=registry, log_blocks=False,
                                     exclude_paths=exclude)
            await mw(_http("/warm-up"), _receive, send)
            await asyncio.sleep(0)
            if impl == "python":
                mw._serve = None
            for method, path in sequence:
                request = mw(dict(_http(path), method=method), _receive, send)
                types_seen.append(type(request).__name__)
                await request
            mw.metrics.flush()
            mw._stop()

        asyncio.run(main())
        requests = sorted(
            (s.labels["method"], s.labels["route"], s.value)
            for metric in registry.collect() if metric.name == "loopwatch_requests"
            for s in metric.samples if s.name == "loopwatch_requests_total"
        )
        return requests, types_seen

    few = ("/metrics", "/health")
    many = few + tuple(f"/other{i}" for i in range(12))
    for exclude in (few, many):
        native, native_types = recorded("c", exclude)
        python, _ = recorded("python", exclude)
        assert native == python
        assert dict(((m, r), v) for m, r, v in native) == {
            ("GET", "/a"): 9.0, ("POST", "/a"): 6.0, ("GET", "/b/{x}"): 6.0,
            ("POST", "/b/{x}"): 3.0, ("_OTHER", "/a"): 3.0, ("GET", "<unmatched>"): 10.0,
        }  # the warm-up, /none, /metricz and /healthz
        excluded = [t for (_m, p), t in zip(sequence, native_types, strict=True)
                    if p in ("/metrics", "/metrics/x", "/health")]
        assert excluded and set(excluded) == {"coroutine"}  # the app's own, unwrapped
        assert native_types.count("RequestCall") == len(sequence) - len(excluded)


def test_c_handle_hook_reads_handle_slots_only_where_they_are_plain_slots() -> None:
    """The C hook reads a Handle's or TimerHandle's fields straight from their slots; a
    subclass that defines one of them its own way gets it read as an attribute, as the
    original Handle._run reads it."""
    c = _c()
    loop = asyncio.new_event_loop()
    calls: list[Any] = []
    try:
        monitor = StateMonitor(threshold=10.0)
        loop._loopwatch_monitor = monitor  # type: ignore[attr-defined]
        run = c.handle_run(asyncio.events.Handle, asyncio.events.TimerHandle)
        owner = Owner("GET", "/t")
        ctx = contextvars.copy_context()
        ctx.run(current_owner.set, owner)

        class Rerouted(asyncio.events.Handle):
            @property  # type: ignore[misc]
            def _callback(self) -> Any:
                return lambda *args: calls.append(("rerouted", args))

            @_callback.setter
            def _callback(self, value: Any) -> None:
                slot.__set__(self, value)  # the slot holds the callback it was given

        slot = vars(asyncio.events.Handle)["_callback"]

        timer = asyncio.TimerHandle(0.0, lambda *a: calls.append(("timer", a)), (1,), loop,
                                    context=ctx)
        run(timer)
        run(Rerouted(lambda *a: calls.append(("own", a)), (2,), loop, context=ctx))
        assert calls == [("timer", (1,)), ("rerouted", (2,))]
        assert owner.busy > 0 and monitor.busy == pytest.approx(owner.busy, abs=1e-9)

        class Odd:  # no slots where the hook looks for them
            pass

        with pytest.raises(TypeError):
            c.handle_run()
        c.handle_run(Odd)  # fields read as attributes from then on
        run(asyncio.Handle(lambda *a: calls.append(("plain", a)), (3,), loop, context=ctx))
        assert calls[-1] == ("plain", (3,))
    finally:
        del loop._loopwatch_monitor  # type: ignore[attr-defined]
        c.handle_run(asyncio.events.Handle, asyncio.events.TimerHandle)
        loop.close()


def test_c_monitor_state_keeps_the_closing_request_for_the_collector() -> None:
    """_closing, a C field pair on the monitor: set and read as a (start, owner) tuple, a bad
    value refused by name, and the owner visible to the garbage collector."""
    import gc

    _c()
    monitor = StateMonitor()
    assert monitor._closing == (0.0, None)
    owner = Owner("GET", "/c")
    monitor._closing = (1.5, owner)
    assert monitor._closing == (1.5, owner)
    assert any(r is owner for r in gc.get_referents(monitor))
    for bad in ((1.5,), "x", (None, owner)):
        with pytest.raises(TypeError, match="_closing must be a"):
            monitor._closing = bad
    assert monitor._closing == (1.5, owner)
    monitor._closing = (0.0, None)
    assert monitor._closing == (0.0, None)
