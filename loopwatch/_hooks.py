"""Timing every step of a loop: a ``Handle._run`` wrapper on asyncio, a task factory on uvloop.

Stock asyncio runs every callback, and so every task step, through the pure-Python
``asyncio.events.Handle._run``: one class-level wrapper there sees everything. uvloop's handles
are Cython classes that never call it, so on uvloop the monitor installs a task factory that
wraps each task's coroutine and times each ``send`` / ``throw`` -- every task step, which is
where all ASGI application code runs.

Both do the same thing around a step: note its start where the watchdog can see it (and
where :mod:`._waiting` needs it), run it, add its duration to the loop's busy time and to the
owner found in the step's context, charge the owner the wait before it (:mod:`._waiting`), and
hand anything that held the loop for the threshold or more to the monitor
(:meth:`Monitor._on_block`). A failure of that accounting is counted as loopwatch's internal
error; it never reaches the step.

This module is the one definition of that behaviour. Where the C extension was built
(:mod:`._accel`), ``_ctiming`` does exactly the same for a fraction of the instructions:
``handle_run`` for :func:`_timed_run`, ``TimedCoroutine``, ``StepState`` for the monitor's
per-step fields; the suite runs on both. The uvloop task factory is :mod:`._factory`.

A block's way from the blocking line to the metric: these hooks time the step, the monitor
(:mod:`._monitor`) builds its event with the watchdog's stack (:mod:`._watchdog`), and the
metrics (:mod:`._metrics`) count it.
"""

from __future__ import annotations

import asyncio
import collections.abc
import threading
import time
import types
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from ._accel import ctiming, task_factories
from ._attribution import current_owner
from ._waiting import begin_step as _begin
from ._waiting import charge_wait as _charge_wait

if TYPE_CHECKING:
    from ._monitor import Monitor

__all__ = [
    "TimedCoroutine", "handle_hook_installed", "install_handle_hook", "make_task_factory",
    "timed_await", "uninstall_handle_hook",
]

_clock = time.perf_counter
_Handle = asyncio.events.Handle
_TimerHandle = asyncio.events.TimerHandle
_original_run = _Handle._run

# Each watched loop carries its monitor in an attribute (an attribute load is cheaper than a
# lookup); the hook on Handle._run stays installed while any monitor uses it.
_ATTR = "_loopwatch_monitor"
_handle_users = 0
_owner_var = current_owner


def _account(mon: Any, t0: float, dt: float, owner: Any, callback: Any,
             timer: bool = False) -> None:
    """After a step of ``dt`` seconds that started at ``t0`` (``timer``: an asyncio timer's
    callback)."""
    try:
        mon.step_start = 0.0
        end = t0 + dt
        mon.last_end = end
        if dt >= mon.look_after:
            mon.long_end = end
        mon.busy += dt  # (a stopped monitor's busy time is no longer read)
        if owner is not None:
            try:
                _charge_wait(mon, owner, t0, end, timer)  # see _waiting
            except AttributeError:  # an owner with a busy time only (AnyOwner)
                pass
            owner.busy += dt
        if dt >= mon.threshold:
            mon._on_block(t0, dt, owner, callback)
            mon.last_end = _clock()  # reporting held the loop too: no pause
    except Exception:  # noqa: BLE001 - never break the step we time
        mon._internal_error("step accounting")


def _timed_run(self: asyncio.Handle, _run: Any = _original_run, _clock: Any = _clock) -> None:
    """``Handle._run``, timed: the original runs the callback (and reports its exception)."""
    # Defaults bind globals as fast locals: this runs for every callback of the loop.
    try:
        mon = self._loop._loopwatch_monitor  # type: ignore[attr-defined]
    except AttributeError:  # a Handle of some loop that is not a BaseEventLoop
        mon = None
    if mon is None:
        _run(self)
        return
    t0 = _clock()
    # asyncio's own timers: the due time of the one that runs (a task's step follows it)
    timer = type(self) is _TimerHandle
    _begin(mon, t0, self, timer)
    try:
        _run(self)
    finally:
        dt = _clock() - t0
        owner = self._context.get(_owner_var)  # type: ignore[attr-defined]
        _account(mon, t0, dt, owner, self._callback, timer)  # type: ignore[attr-defined]


_py_timed_run = _timed_run


def verify_inline(hook: Any) -> bool:
    """Whether the C hook, running callbacks itself, answers exactly as ``Handle._run``
    does on this Python: a callback runs in its handle's context with its arguments, and an
    exception is reported to the loop's exception handler with the same message, context
    and traceback. Checked once, by running both on probe handles; where anything differs
    the C hook goes on calling the original for every callback."""
    import contextvars
    import traceback

    marker: contextvars.ContextVar[str] = contextvars.ContextVar("loopwatch_probe")
    monitor = ctiming.StepState() if ctiming is not None else None
    if monitor is None:
        return False
    monitor.threshold = 1e9

    def outcome(run: Any) -> list[Any]:
        loop = asyncio.new_event_loop()
        seen: list[Any] = []
        try:
            loop._loopwatch_monitor = monitor  # type: ignore[attr-defined]
            loop.set_exception_handler(lambda _loop, context: seen.append(
                (context["message"].replace(hex(id(context["handle"])), "HANDLE"),
                 sorted(context), type(context["exception"]).__name__,
                 str(context["exception"]),
                 [f.name for f in traceback.extract_tb(context["exception"].__traceback__)],
                 context["handle"]._context.get(marker))))
            ctx = contextvars.copy_context()
            ctx.run(marker.set, "in the handle's context")

            def ok(*args: Any) -> None:
                seen.append((args, marker.get(None)))

            def fails(x: int) -> None:
                raise ZeroDivisionError(f"bad {x}")

            def leaves() -> None:
                raise SystemExit(3)

            run(asyncio.Handle(ok, (1, "two"), loop, context=ctx))
            run(asyncio.Handle(fails, (5,), loop, context=ctx))
            try:
                run(asyncio.Handle(leaves, (), loop, context=ctx))
            except SystemExit as exc:
                seen.append(("SystemExit", exc.code))
        finally:
            loop.close()
        return seen

    try:
        expected = outcome(_original_run)
        hook._inline = True
        inline = outcome(hook)
    except Exception:  # noqa: BLE001 - anything odd: not inline
        inline = None
    same = inline == expected
    hook._inline = same
    return same


if ctiming is not None:
    _timed_run = ctiming.handle_run(  # noqa: F811
        _original_run, (_Handle, asyncio.events.TimerHandle))
    #: Whether the C hook runs callbacks itself (see verify_inline).
    INLINE = verify_inline(_timed_run)

# Loops in several threads (and the watchdog of a closed loop) install and uninstall.
_hook_lock = threading.Lock()


def install_handle_hook(loop: asyncio.AbstractEventLoop, monitor: Monitor) -> None:
    global _handle_users
    with _hook_lock:
        if not hasattr(asyncio.BaseEventLoop, _ATTR):
            setattr(asyncio.BaseEventLoop, _ATTR, None)  # every other loop: not watched
        setattr(loop, _ATTR, monitor)
        _handle_users += 1
        if _Handle._run is not _timed_run:
            _Handle._run = _timed_run  # type: ignore[method-assign]


def uninstall_handle_hook(loop: asyncio.AbstractEventLoop | None) -> None:
    """Undo one install_handle_hook (``loop`` is None when it is gone already). With the last
    one, ``Handle._run`` is asyncio's own again."""
    global _handle_users
    with _hook_lock:
        if loop is not None and _ATTR in vars(loop):
            delattr(loop, _ATTR)
        _handle_users = max(0, _handle_users - 1)
        if not _handle_users and _Handle._run is _timed_run:
            _Handle._run = _original_run  # type: ignore[method-assign]


def handle_hook_installed() -> bool:
    """Whether Handle._run is loopwatch's (some monitor uses it)."""
    return _Handle._run is _timed_run


def handle_hook_works() -> bool:
    """Whether the running Python's Handle._run can be wrapped (pure Python on 3.10–3.13)."""
    return isinstance(_original_run, types.FunctionType)


class TimedCoroutine(collections.abc.Coroutine):  # type: ignore[type-arg]
    """Wraps a task's coroutine and times each step (used where Handle._run is not used).

    Everything a caller can observe is delegated to the wrapped coroutine: results,
    exceptions, cancellation, ``cr_frame`` (so ``Task.get_stack()`` works) and its name.
    Calling it returns the coroutine: it stands in for its task's ``get_coro``.
    """

    __slots__ = ("__weakref__", "_coro", "_last_end", "_monitor")

    def __init__(self, coro: Any, monitor: Monitor) -> None:
        self._coro = coro
        self._monitor = monitor
        self._last_end = 0.0

    def send(self, value: Any, _clock: Any = _clock, _var: Any = _owner_var) -> Any:
        mon = self._monitor
        t0 = _clock()
        # uvloop's timers run unseen: a task's sleep, if a long step ran while it waited
        _begin(mon, t0, self, 0.0 < self._last_end < mon.long_end)
        try:
            return self._coro.send(value)
        finally:
            _account(mon, t0, _clock() - t0, _var.get(), None)
            self._last_end = mon.last_end

    def throw(self, *args: Any) -> Any:
        mon = self._monitor
        t0 = _clock()
        _begin(mon, t0, self, 0.0 < self._last_end < mon.long_end)
        try:
            return self._coro.throw(*args)
        finally:
            _account(mon, t0, _clock() - t0, _owner_var.get(), None)
            self._last_end = mon.last_end

    def wrapped(self) -> Any:
        """The task's own coroutine."""
        return self._coro

    def __call__(self) -> Any:
        return self._coro

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Any:
        return self._coro.__await__()

    def __getattr__(self, name: str) -> Any:
        # cr_frame (Task.get_stack), cr_running, cr_await, cr_code, __name__, __qualname__
        return getattr(self._coro, name)

    def __repr__(self) -> str:
        return repr(self._coro)


def _py_timed(coro: Any, monitor: Monitor) -> TimedCoroutine:
    # TimedCoroutine(coro, monitor) without a Python __init__: this runs for every task.
    timed = _new(TimedCoroutine)
    timed._coro = coro
    timed._monitor = monitor
    timed._last_end = 0.0
    return timed


_new = object.__new__
#: The wrapper types (pure Python, and the C twin where it was built), and the one in use.
TIMED_TYPES: tuple[type, ...] = (TimedCoroutine,)
_timed: Any = _py_timed
if ctiming is not None:
    collections.abc.Coroutine.register(ctiming.TimedCoroutine)
    TIMED_TYPES = (ctiming.TimedCoroutine, TimedCoroutine)
    _timed = ctiming.timed


@types.coroutine
def timed_await(coro: Any, monitor: Monitor) -> Generator[Any, Any, Any]:
    """``await timed_await(coro, monitor)`` awaits ``coro`` timing each of its steps, as a
    task made by the factory would: for code in a task older than the monitor (uvloop)."""
    timed = _timed(coro, monitor)
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            yielded = timed.send(value) if error is None else timed.throw(error)
        except StopIteration as stop:
            return stop.value
        try:
            value, error = (yield yielded), None
        except BaseException as exc:  # noqa: BLE001 - handed to the coroutine, as a task does
            value, error = None, exc


class Task(asyncio.Task):  # type: ignore[type-arg]
    """A Task whose ``get_coro()`` returns the task's own coroutine, not the timing wrapper
    (for a Task type that takes no ``get_coro`` instance attribute: see the factory)."""

    def get_coro(self) -> Any:
        coro: Any = super().get_coro()
        return coro.wrapped() if type(coro) in TIMED_TYPES else coro


def make_task_factory(monitor: Monitor, previous: Any) -> Any:
    """A task factory that times each task's steps, then defers to ``previous`` (if any): see
    :mod:`._factory` (compiled as ``_cfactory`` where built)."""
    return task_factories.make_task_factory(monitor, previous, _timed, TIMED_TYPES, Task)
