"""The C step timing (``loopwatch/_ctiming.c``) does what ``_hooks.py`` does: each test runs
the pure-Python hook and its C twin on the same inputs. The whole suite also runs on both
paths in CI (``LOOPWATCH_PURE_PYTHON=1`` for the second run)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import os
import sys
import time
import traceback
import types
from typing import Any

import pytest

from loopwatch import _accel, _factory, _hooks, _request
from loopwatch._accel import StepState, ctiming
from loopwatch._attribution import Owner, current_owner
from loopwatch._waiting import IDLE_GAP, LOOK_AFTER, wake_due
from needs import missing


PURE = os.environ.get("LOOPWATCH_PURE_PYTHON") == "1"


def _c() -> Any:
    if ctiming is None:
        if PURE:
            pytest.skip("the pure-Python run: the C twin is tested in the compiled run")
        missing("loopwatch._ctiming was not built (no compiler at install time?)")
    return ctiming


@pytest.fixture(autouse=True)
def _c_twin_needed(request: pytest.FixtureRequest) -> None:
    """A test of the C twin (parameter "c", or a name saying so) needs the extension."""
    params = getattr(request.node, "callspec", None)
    if (params is not None and {"c", "c-original"} & set(map(str, params.params.values()))) \
            or "_c_" in request.node.name:
        _c()


def test_the_extension_is_built_and_in_use() -> None:
    """CI builds it (the figures in docs/performance.md are for the C path), except on the
    pure-Python run, which asks for the pure-Python path."""
    if PURE:
        assert ctiming is None and _hooks._timed_run is _hooks._py_timed_run
        assert _accel.request is _request and _accel.task_factories is _factory
        return
    c = _c()
    assert _hooks._timed is c.timed
    assert isinstance(_hooks._timed_run, c.HandleRun)
    # the Cython-compiled request path and task factory (built from the same sources)
    assert _accel.request.__name__ == "loopwatch._crequest"
    assert _accel.task_factories.__name__ == "loopwatch._cfactory"


class FakeMonitor(StepState):  # type: ignore[misc, valid-type]
    """What the hooks touch on a Monitor (its StepState fields, its two entry points),
    recorded."""

    def __init__(self, threshold: float = 10.0) -> None:
        self.step_start = 0.0
        self.busy = 0.0
        self.threshold = threshold
        # the who-waited fields as a Monitor starts them (_waiting)
        self.last_end = self.idle = self.run_start = self.last_gap = self.long_end = 0.0
        self.due = 0.0
        self.idle_gap = IDLE_GAP
        self.look_after = LOOK_AFTER
        self.active = True
        self.blocks: list[tuple[float, float, Any, Any]] = []
        self.errors: list[str] = []
        self.starts_seen: list[float] = []
        #: what _wake_due answers: a due time by id of the step's handle or coroutine, else
        #: what Monitor._wake_due would read (an asyncio timer's own due time)
        self.dues: dict[int, float] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    def _wake_due(self, t0: float, what: Any) -> float:
        return self.dues.get(id(what)) or wake_due(what, self.loop)

    def _on_block(self, t0: float, dt: float, owner: Any, callback: Any) -> None:
        self.blocks.append((t0, dt, owner, callback))

    def _internal_error(self, where: str) -> None:
        self.errors.append(where)


def makers() -> list[Any]:
    return [pytest.param(_hooks._py_timed, id="python"), pytest.param("c", id="c")]


def run_hooks() -> list[Any]:
    """The Python hook; the C hook running callbacks itself (as it does once verify_inline
    has checked it), and calling the original Handle._run (as it does where that failed)."""
    return [pytest.param(_hooks._py_timed_run, id="python"), pytest.param("c", id="c"),
            pytest.param("c-original", id="c-original")]


def timed(maker: Any, coro: Any, monitor: Any) -> Any:
    return (_c().timed if maker == "c" else maker)(coro, monitor)


def run_hook(hook: Any) -> Any:
    if not isinstance(hook, str):
        return hook
    run = _c().handle_run(_hooks._original_run, (asyncio.Handle, asyncio.TimerHandle))
    if hook == "c":
        assert _hooks.verify_inline(run)
    return run


@types.coroutine
def _yield(value: Any = None) -> Any:
    return (yield value)


# -- TimedCoroutine ----------------------------------------------------------------------------


@pytest.mark.parametrize("maker", makers())
def test_timed_coroutine_runs_and_charges_each_step(maker: Any) -> None:
    monitor = FakeMonitor(threshold=0.015)
    owner = Owner("GET", "/x")

    async def body() -> str:
        monitor.starts_seen.append(monitor.step_start)
        got = await _yield("first")
        time.sleep(0.02)  # a block in the second step
        await _yield("second")
        return f"done {got}"

    ctx = contextvars.copy_context()
    ctx.run(current_owner.set, owner)
    coroutine = timed(maker, body(), monitor)
    assert ctx.run(coroutine.send, None) == "first"
    assert monitor.starts_seen[0] > 0 and monitor.step_start == 0.0
    assert ctx.run(coroutine.send, 42) == "second"
    with pytest.raises(StopIteration) as stop:
        ctx.run(coroutine.send, None)
    assert stop.value.value == "done 42"
    assert 0.02 <= owner.busy == pytest.approx(monitor.busy, abs=1e-9)
    (t0, dt, blamed, what), = monitor.blocks
    assert blamed is owner and dt >= 0.02 and what is None and not monitor.errors


@pytest.mark.parametrize("maker", makers())
def test_timed_coroutine_delegates_throw_close_and_introspection(maker: Any) -> None:
    monitor = FakeMonitor()

    async def body() -> None:
        try:
            await _yield()
        except ValueError as exc:
            await _yield(f"caught {exc}")
        await _yield("again")

    coro = body()
    coroutine = timed(maker, coro, monitor)
    assert coroutine.wrapped() is coro and coroutine() is coro  # it stands in for get_coro
    assert coroutine.cr_frame is coro.cr_frame and coroutine.__qualname__ == coro.__qualname__
    assert repr(coroutine) == repr(coro)
    coroutine.send(None)
    assert coroutine.throw(ValueError("x")) == "caught x"
    coroutine.close()
    assert coro.cr_frame is None
    with pytest.raises(AttributeError):
        coroutine.no_such_attribute  # noqa: B018
    with pytest.raises(TypeError):
        coroutine(1)


@pytest.mark.parametrize("maker", makers())
@pytest.mark.parametrize("how", ["send", "throw"])
def test_timed_coroutine_passes_exceptions_and_results_through(maker: Any, how: str) -> None:
    monitor = FakeMonitor()

    async def body() -> int:
        try:
            await _yield()
        except KeyError:
            pass
        raise LookupError("from the app")

    coroutine = timed(maker, body(), monitor)
    coroutine.send(None)
    with pytest.raises(LookupError, match="from the app"):
        coroutine.send(None) if how == "send" else coroutine.throw(KeyError("k"))
    assert monitor.step_start == 0.0 and monitor.busy > 0 and not monitor.errors

    async def returns() -> int:
        return 7

    with pytest.raises(StopIteration) as stop:
        timed(maker, returns(), monitor).send(None)
    assert stop.value.value == 7


@pytest.mark.parametrize("maker", makers())
def test_an_accounting_failure_is_counted_and_never_changes_the_step(maker: Any) -> None:
    class Broken(FakeMonitor):
        def _on_block(self, *args: Any) -> None:
            raise RuntimeError("sink broke")

    monitor = Broken(threshold=0.0)

    async def body() -> str:
        return "fine"

    with pytest.raises(StopIteration) as stop:
        timed(maker, body(), monitor).send(None)
    assert stop.value.value == "fine"
    assert monitor.errors == ["step accounting"]


def test_c_timed_coroutine_runs_as_a_task() -> None:
    c = _c()
    monitor = FakeMonitor()

    async def child() -> str:
        await asyncio.sleep(0)
        return "child done"

    async def main() -> Any:
        return await asyncio.get_running_loop().create_task(c.timed(child(), monitor))

    assert asyncio.run(main()) == "child done"
    assert monitor.busy > 0


# -- Handle._run -------------------------------------------------------------------------------


@pytest.mark.parametrize("hook", run_hooks())
def test_handle_hook_times_the_callback_and_charges_its_context(hook: Any) -> None:
    run = run_hook(hook)
    loop = asyncio.new_event_loop()
    try:
        monitor = FakeMonitor(threshold=0.015)
        owner = Owner("GET", "/h")
        ctx = contextvars.copy_context()
        ctx.run(current_owner.set, owner)
        calls: list[Any] = []

        def callback(x: int) -> None:
            calls.append((x, monitor.step_start))
            time.sleep(0.02)

        loop._loopwatch_monitor = monitor  # type: ignore[attr-defined]
        run(asyncio.Handle(callback, (7,), loop, context=ctx))
        assert calls[0][0] == 7 and calls[0][1] > 0 and monitor.step_start == 0.0
        assert owner.busy >= 0.02 and owner.busy == pytest.approx(monitor.busy, abs=1e-9)
        assert monitor.blocks[0][2] is owner and monitor.blocks[0][3] is callback

        loop._loopwatch_monitor = None  # type: ignore[attr-defined]  # not watched
        busy = monitor.busy
        run(asyncio.Handle(lambda *a: calls.append(a), (1, 2, 3), loop))
        assert calls[-1] == (1, 2, 3) and monitor.busy == busy
    finally:
        loop.close()


@pytest.mark.parametrize("hook", run_hooks())
def test_handle_hook_charges_the_wait_on_others_until_the_owner_ended(hook: Any) -> None:
    """An owner's step after another's 20 ms step is charged that wait; once the owner's
    ``ended`` is set (a response sent), its later steps are charged none."""
    run = run_hook(hook)
    loop = asyncio.new_event_loop()
    try:
        monitor = FakeMonitor()
        monitor.idle_gap = 10.0  # no pauses: every gap between these steps is running
        owner = Owner("GET", "/w")
        ctx = contextvars.copy_context()
        ctx.run(current_owner.set, owner)
        loop._loopwatch_monitor = monitor  # type: ignore[attr-defined]

        def others_hold_the_loop() -> None:
            run(asyncio.Handle(time.sleep, (0.02,), loop))  # nobody's step

        run(asyncio.Handle(lambda: None, (), loop, context=ctx))
        others_hold_the_loop()
        run(asyncio.Handle(lambda: None, (), loop, context=ctx))
        waited = owner.delayed
        assert 0.02 <= waited < 0.03, waited

        owner.ended = _hooks._clock()
        others_hold_the_loop()
        run(asyncio.Handle(lambda: None, (), loop, context=ctx))
        assert owner.delayed == waited and not monitor.errors
    finally:
        loop.close()


STALL = 0.005  # the loop's thread held by another thread or the OS between two steps


@pytest.mark.parametrize("hook", run_hooks())
def test_late_timers_are_charged_from_their_due_time_after_a_stall(hook: Any) -> None:
    """Two owners' timers fall due during another's 30 ms step; the loop's thread then
    stalls 5 ms between steps, which looks like a pause. Each owner is charged from its
    timer's due time -- the second too, which runs right after the first, not only the
    step after the stall."""
    run = run_hook(hook)
    loop = asyncio.new_event_loop()
    try:
        monitor = FakeMonitor()
        monitor.loop = loop
        owners = [Owner("GET", f"/t{i}") for i in range(2)]
        contexts = [contextvars.copy_context() for _ in owners]
        for ctx, owner in zip(contexts, owners, strict=True):
            ctx.run(current_owner.set, owner)
        loop._loopwatch_monitor = monitor  # type: ignore[attr-defined]
        for ctx in contexts:
            run(asyncio.Handle(lambda: None, (), loop, context=ctx))
        due = loop.time() + 0.005
        timers = [asyncio.TimerHandle(due, lambda: None, (), loop, context=ctx)
                  for ctx in contexts]
        run(asyncio.Handle(time.sleep, (0.03,), loop))  # nobody's step: both fall due in it
        time.sleep(STALL)
        for timer in timers:
            run(timer)
        late = [owner.delayed for owner in owners]
        assert all(0.02 <= wait <= 0.04 for wait in late), late
        assert not monitor.errors
    finally:
        loop.close()


STALL_AFTER = 0.015  # a stall long enough to tell from the tolerance below


@pytest.mark.parametrize("hook", run_hooks())
@pytest.mark.parametrize("callback_context", [True, False], ids=["own-timer", "other-timer"])
def test_a_task_woken_by_its_late_timer_is_charged_a_stall_before_its_step(
        hook: Any, callback_context: bool) -> None:
    """asyncio ends a sleep in two steps: the timer's callback (in the task's context) makes
    the task's step ready, and that step runs an iteration later. A stall of the loop's
    thread between the two (another thread holding the GIL) looks like a pause, but the
    step was ready through it: the owner is charged from its timer's due time to its step,
    stall included. A timer's callback of another context wakes nothing of the owner's: a
    pause after it is not charged."""
    run = run_hook(hook)
    loop = asyncio.new_event_loop()
    try:
        monitor = FakeMonitor()
        monitor.loop = loop
        owner = Owner("GET", "/sleeper")
        ctx = contextvars.copy_context()
        ctx.run(current_owner.set, owner)
        loop._loopwatch_monitor = monitor  # type: ignore[attr-defined]
        run(asyncio.Handle(lambda: None, (), loop, context=ctx))  # falls asleep
        due = loop.time() + 0.005
        timer = asyncio.TimerHandle(due, lambda: None, (), loop,
                                    context=ctx if callback_context else None)
        run(asyncio.Handle(time.sleep, (0.03,), loop))  # nobody's: the timer falls due in it
        run(timer)
        time.sleep(STALL_AFTER)
        run(asyncio.Handle(lambda: None, (), loop, context=ctx))  # the task's step
        if callback_context:
            # ~25 ms from the due time to the timer's callback, then the stall
            assert 0.025 + STALL_AFTER - 0.003 <= owner.delayed <= 0.05, owner.delayed
        else:  # the step follows a pause: woken by I/O, as far as anyone can tell
            assert owner.delayed < 0.001, owner.delayed
        assert not monitor.errors
    finally:
        loop.close()


@pytest.mark.parametrize("maker", makers())
def test_tasks_held_up_by_a_long_step_are_charged_from_their_due_time_after_a_stall(
        maker: Any) -> None:
    """As above on the uvloop path: two owners' tasks asleep (their due times as the
    sleeping coroutine gives them) through another's 30 ms step, then a 5 ms stall."""
    monitor = FakeMonitor()
    owners = [Owner("GET", f"/s{i}") for i in range(2)]
    contexts = [contextvars.copy_context() for _ in owners]
    for ctx, owner in zip(contexts, owners, strict=True):
        ctx.run(current_owner.set, owner)

    async def asleep() -> None:
        await _yield()

    async def blocker() -> None:
        time.sleep(0.03)
        await _yield()

    coroutines = [timed(maker, asleep(), monitor) for _ in owners]
    for ctx, coroutine in zip(contexts, coroutines, strict=True):
        ctx.run(coroutine.send, None)
    due = _hooks._clock() + 0.005
    for coroutine in coroutines:
        monitor.dues[id(coroutine)] = due
    timed(maker, blocker(), monitor).send(None)  # nobody's step: both fall due in it
    time.sleep(STALL)
    for ctx, coroutine in zip(contexts, coroutines, strict=True):
        with pytest.raises(StopIteration):
            ctx.run(coroutine.send, None)
    late = [owner.delayed for owner in owners]
    assert all(0.02 <= wait <= 0.04 for wait in late), late
    assert not monitor.errors


def _failing_handle_report(run: Any, watched: bool) -> tuple[dict[str, Any], Any]:
    loop = asyncio.new_event_loop()
    try:
        if watched:
            loop._loopwatch_monitor = FakeMonitor()  # type: ignore[attr-defined]
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))

        def broken_callback(x: int) -> None:
            raise ZeroDivisionError(f"bad {x}")

        handle = asyncio.Handle(broken_callback, (5,), loop)
        run(handle)
        (context,) = errors
        return context, handle
    finally:
        loop.close()


@pytest.mark.parametrize("hook", run_hooks())
@pytest.mark.parametrize("watched", [True, False])
def test_handle_hook_reports_a_failing_callback_exactly_as_asyncio(hook: Any, watched: bool) -> None:
    ours, handle = _failing_handle_report(run_hook(hook), watched)
    original, original_handle = _failing_handle_report(_hooks._original_run, False)
    assert ours["handle"] is handle
    assert ours["message"] == original["message"].replace(
        hex(id(original_handle)), hex(id(handle)))
    assert ours.keys() == original.keys()
    exc = ours["exception"]
    assert isinstance(exc, ZeroDivisionError) and str(exc) == "bad 5"
    names = [f.name for f in traceback.extract_tb(exc.__traceback__)]
    assert names == [f.name for f in traceback.extract_tb(original["exception"].__traceback__)]


@pytest.mark.parametrize("hook", run_hooks())
def test_handle_hook_lets_system_exit_through(hook: Any) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop._loopwatch_monitor = FakeMonitor()  # type: ignore[attr-defined]

        def leave() -> None:
            raise SystemExit(3)

        with pytest.raises(SystemExit):
            run_hook(hook)(asyncio.Handle(leave, (), loop))
    finally:
        loop.close()


def test_c_handle_hook_looks_like_the_function_it_replaces() -> None:
    """Libraries inspect Handle._run (Playwright reads its __code__ at import): while the
    hook is installed it answers as the original does, binds as a method, and says what it
    wraps."""
    import loopwatch

    c = _c()
    original = _hooks._original_run

    async def main() -> None:
        monitor = loopwatch.Monitor(log_blocks=False).start()
        try:
            run = asyncio.events.Handle._run
            assert isinstance(run, c.HandleRun) and run.__wrapped__ is original
            assert run.__code__ is original.__code__
            assert run.__name__ == "_run" and run.__qualname__ == "Handle._run"
            handle = asyncio.get_running_loop().call_soon(lambda: None)
            assert handle._run.__self__ is handle  # a bound method
            handle.cancel()
        finally:
            monitor.stop()
        assert asyncio.events.Handle._run is original

    asyncio.run(main())


# -- the task factory (uvloop) -----------------------------------------------------------------


def _factories(build: str) -> Any:
    """The task factory's module: its source (``python``) or that source compiled."""
    if build == "python":
        return _factory
    if _accel.task_factories is _factory:
        if PURE:
            pytest.skip("the pure-Python run: the compiled build is tested in the compiled run")
        missing("loopwatch._cfactory was not built (no Cython at install time?)")
    return _accel.task_factories


@pytest.mark.parametrize("build", ["python", "compiled"])
def test_the_task_factory_times_plain_coroutines_and_passes_the_rest_on(build: str) -> None:
    factories = _factories(build)
    monitor = FakeMonitor()
    passed: list[tuple[Any, dict[str, Any]]] = []

    def previous(loop: Any, coro: Any, **kwargs: Any) -> Any:
        passed.append((coro, kwargs))
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def child() -> int:
        await asyncio.sleep(0)
        return 5

    async def main() -> None:
        loop = asyncio.get_running_loop()
        factory = factories.make_task_factory(
            monitor, None, _hooks._timed, _hooks.TIMED_TYPES, _hooks.Task)
        coro = child()
        task = factory(loop, coro)
        assert type(task._coro) in _hooks.TIMED_TYPES  # type: ignore[attr-defined]
        assert task.get_coro() is coro  # the task's own coroutine, not the wrapper
        assert await task == 5
        if sys.version_info >= (3, 11):  # create_task(context=...) is 3.11's
            ctx = contextvars.copy_context()
            task = factory(loop, child(), context=ctx)
            assert task.get_context() is ctx
            assert await task == 5
        if sys.version_info >= (3, 12):  # uvloop 0.22+ passes eager_start= with every task
            assert await factory(loop, child(), context=None, eager_start=None) == 5
            eager = factory(loop, child(), eager_start=True)
            # started in the constructor: suspended at its first await
            assert inspect.getcoroutinestate(eager.get_coro()) == inspect.CORO_SUSPENDED
            assert await eager == 5
        # Anything but a coroutine reaches Task() and fails there, as without loopwatch.
        with pytest.raises(TypeError):
            factory(loop, iter(()))
        # A factory before ours gets the wrapper, and the rest of what it was given.
        chained = factories.make_task_factory(
            monitor, previous, _hooks._timed, _hooks.TIMED_TYPES, _hooks.Task)
        task = chained(loop, child(), name="chained")
        assert task.get_name() == "chained" and await task == 5
        assert [(type(c) in _hooks.TIMED_TYPES, k) for c, k in passed] == [
            (True, {"name": "chained"})]
        # A stopped monitor: the coroutine as it came, untimed.
        monitor.active = False
        other = child()
        assert await chained(loop, other) == 5
        assert passed[-1] == (other, {})
        task = factory(loop, child())
        assert type(task._coro) is types.CoroutineType  # type: ignore[attr-defined]
        assert await task == 5

    asyncio.run(main())
    assert monitor.busy > 0


def test_uvloops_own_create_task_makes_timed_tasks() -> None:
    """Whatever uvloop's create_task passes to the factory (context=, and from 0.22
    eager_start=), a plain coroutine's task runs it timed and shows it as its own."""
    import uvloop

    import loopwatch

    async def child() -> int:
        await asyncio.sleep(0)
        return 5

    async def main() -> None:
        monitor = loopwatch.Monitor(log_blocks=False).start()
        # the factory of the build that runs (compiled where built)
        factory = asyncio.get_running_loop().get_task_factory()
        assert factory.__module__ == _accel.task_factories.__name__  # type: ignore[union-attr]
        try:
            for make in (asyncio.get_running_loop().create_task, asyncio.create_task):
                coro = child()
                task = make(coro)
                assert type(task._coro) in _hooks.TIMED_TYPES  # type: ignore[attr-defined]
                assert task.get_coro() is coro
                assert await task == 5
        finally:
            monitor.stop()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_no_asyncio_type_is_changed() -> None:
    """Monitors on uvloop shadow get_coro on their own tasks only: asyncio.Task's methods are
    the ones it came with, and Handle._run is asyncio's own once no monitor uses it."""
    import uvloop

    import loopwatch

    get_coro = asyncio.Task.__dict__["get_coro"]

    async def main() -> None:
        monitor = loopwatch.Monitor(log_blocks=False).start()

        async def child() -> None:
            await asyncio.sleep(0)

        coro = child()
        task = asyncio.get_running_loop().create_task(coro)
        assert task.get_coro() is coro
        await task
        monitor.stop()

    uvloop.run(main())
    asyncio.run(main())
    assert asyncio.Task.__dict__["get_coro"] is get_coro
    assert asyncio.events.Handle._run is _hooks._original_run


def test_c_step_timing_leaks_no_references() -> None:
    c = _c()
    monitor = FakeMonitor(threshold=0.0)  # every step a "block": the slow path too
    owner = Owner("GET", "/leak")
    ctx = contextvars.copy_context()
    ctx.run(current_owner.set, owner)

    async def body() -> int:
        await _yield()
        return 1

    def broken() -> None:
        raise KeyError("x")

    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, _context: None)
    loop._loopwatch_monitor = monitor  # type: ignore[attr-defined]
    run = c.handle_run(_hooks._original_run, (asyncio.Handle, asyncio.TimerHandle))
    assert _hooks.verify_inline(run)
    try:
        def cycle() -> None:
            for _ in range(200):
                coroutine = c.timed(body(), monitor)
                ctx.run(coroutine.send, None)
                with pytest.raises(StopIteration):
                    ctx.run(coroutine.send, None)
                run(asyncio.Handle(broken, (), loop, context=ctx))
            monitor.blocks.clear()

        cycle()
        gc.collect()  # (a reported exception's traceback is a cycle until then)
        before = (sys.getrefcount(monitor), sys.getrefcount(owner), sys.getrefcount(ctx),
                  sys.getrefcount(broken))
        for _ in range(10):
            cycle()
        gc.collect()
        after = (sys.getrefcount(monitor), sys.getrefcount(owner), sys.getrefcount(ctx),
                 sys.getrefcount(broken))
        assert after == before
    finally:
        loop.close()
