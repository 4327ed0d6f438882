"""Timing every step of a loop: a ``Handle._run`` wrapper on asyncio, a task factory on uvloop.

Stock asyncio runs every callback, and so every task step, through the pure-Python
``asyncio.events.Handle._run``: one class-level wrapper there sees everything for well under
a microsecond. uvloop's handles are Cython classes that never call it, so on uvloop the
monitor installs a task factory that wraps each task's coroutine and times each ``send`` /
``throw`` — every task step, which is where all ASGI application code runs.

Both paths do the same thing around a step: note its start where the watchdog can see it,
run it, add its duration to the loop's busy time and to the owner found in the step's
context, and hand anything longer than the threshold to the monitor as a block. Where the C
extension was built (``_accel``), its twins of ``_timed_run`` and ``TimedCoroutine`` do it.
"""

from __future__ import annotations

import asyncio
import collections.abc
import threading
import time
import types
from typing import TYPE_CHECKING, Any

from ._accel import speedups
from ._attribution import current_owner

if TYPE_CHECKING:
    from ._monitor import Monitor

__all__ = ["TimedCoroutine", "install_handle_hook", "make_task_factory", "uninstall_handle_hook"]

_clock = time.perf_counter
_Handle = asyncio.events.Handle
_original_run = _Handle._run

# loop -> monitor, for every loop whose steps are timed through Handle._run. The hook finds
# a loop's monitor in the loop's own attribute (an attribute load is cheaper than a lookup).
_handle_monitors: dict[asyncio.AbstractEventLoop, Monitor] = {}
_ATTR = "_loopwatch_monitor"
_owner_var = current_owner


def _timed_run(
    self: asyncio.Handle,
    _run: Any = _original_run,
    _clock: Any = _clock,
    _var: Any = _owner_var,
) -> None:
    # Defaults bind globals as fast locals: this runs for every callback of the loop.
    try:
        mon = self._loop._loopwatch_monitor  # type: ignore[attr-defined]
    except AttributeError:  # a Handle of some loop that is not a BaseEventLoop
        mon = None
    if mon is None:
        _run(self)
        return
    t0 = _clock()
    mon.step_start = t0
    try:
        _run(self)
    finally:
        dt = _clock() - t0
        mon.step_start = 0.0
        mon.busy += dt
        owner = self._context.get(_var)  # type: ignore[attr-defined]
        if owner is not None:
            owner.busy += dt
        if dt >= mon.threshold:
            mon.on_block(t0, dt, owner, self._callback)  # type: ignore[attr-defined]


_py_timed_run = _timed_run
if speedups is not None:
    # A method descriptor of Handle that runs the handle's callback in its context itself
    # and hands an exception from it to the original Handle._run, which reports it.
    _timed_run = speedups.handle_run(_Handle, asyncio.events.TimerHandle)  # noqa: F811

# Loops in several threads (and the watchdog of a closed loop) install and uninstall.
_hook_lock = threading.Lock()


def install_handle_hook(loop: asyncio.AbstractEventLoop, monitor: Monitor) -> None:
    with _hook_lock:
        if not hasattr(asyncio.BaseEventLoop, _ATTR):
            setattr(asyncio.BaseEventLoop, _ATTR, None)  # every other loop: not watched
        setattr(loop, _ATTR, monitor)
        _handle_monitors[loop] = monitor
        if _Handle._run is not _timed_run:
            _Handle._run = _timed_run  # type: ignore[method-assign]


def uninstall_handle_hook(loop: asyncio.AbstractEventLoop) -> None:
    with _hook_lock:
        if _handle_monitors.pop(loop, None) is not None and _ATTR in vars(loop):
            delattr(loop, _ATTR)
        if not _handle_monitors and _Handle._run is _timed_run:
            _Handle._run = _original_run  # type: ignore[method-assign]


def handle_hook_works() -> bool:
    """Whether the running Python's Handle._run can be wrapped (pure Python on 3.10–3.13)."""
    return isinstance(_original_run, types.FunctionType)


class TimedCoroutine(collections.abc.Coroutine):  # type: ignore[type-arg]
    """Wraps a task's coroutine and times each step (used where Handle._run is not used).

    Everything a caller can observe is delegated to the wrapped coroutine: results,
    exceptions, cancellation, ``cr_frame`` (so ``Task.get_stack()`` works) and its name.
    """

    __slots__ = ("__weakref__", "_coro", "_monitor")

    def __init__(self, coro: Any, monitor: Monitor) -> None:
        self._coro = coro
        self._monitor = monitor

    def send(self, value: Any, _clock: Any = _clock, _var: Any = _owner_var) -> Any:
        mon = self._monitor
        t0 = _clock()
        mon.step_start = t0
        try:
            return self._coro.send(value)
        finally:
            dt = _clock() - t0
            mon.step_start = 0.0
            mon.busy += dt  # (a stopped monitor's busy time is no longer read)
            owner = _var.get()
            if owner is not None:
                owner.busy += dt
            if dt >= mon.threshold:
                mon.on_block(t0, dt, owner, asyncio.current_task())

    def throw(self, *args: Any) -> Any:
        mon = self._monitor
        t0 = _clock()
        mon.step_start = t0
        try:
            return self._coro.throw(*args)
        finally:
            dt = _clock() - t0
            mon.step_start = 0.0
            mon.busy += dt
            owner = _owner_var.get()
            if owner is not None:
                owner.busy += dt
            if dt >= mon.threshold:
                mon.on_block(t0, dt, owner, asyncio.current_task())

    def wrapped(self) -> Any:
        """The task's own coroutine."""
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
    return timed


_new = object.__new__
#: The wrapper types (pure Python, and the C twin where it was built), and the one in use.
TIMED_TYPES: tuple[type, ...] = (TimedCoroutine,)
_timed: Any = _py_timed
if speedups is not None:
    collections.abc.Coroutine.register(speedups.TimedCoroutine)
    TIMED_TYPES = (speedups.TimedCoroutine, TimedCoroutine)
    _timed = speedups.timed


class Task(asyncio.Task):  # type: ignore[type-arg]
    """A Task whose ``get_coro()`` returns the task's own coroutine, not the timing wrapper
    (used only where a Task takes no ``get_coro`` instance attribute: see the factory)."""

    def get_coro(self) -> Any:
        coro: Any = super().get_coro()
        return coro.wrapped() if type(coro) in TIMED_TYPES else coro


_CoroutineType = types.CoroutineType
_AsyncioTask = asyncio.Task


#: Whether a Task takes ``get_coro`` as an instance attribute (see the factory).
_shadowing = [True]


def _unwrap_get_coro() -> bool:
    """Whether ``asyncio.Task.get_coro()`` itself returns a timed task's own coroutine.

    With the C extension, the Task type's ``get_coro`` is replaced once per process by one
    that unwraps the C TimedCoroutine and answers exactly as before for every other task
    (``unwrap_get_coro`` in _speedups.c). Then no task needs a ``get_coro`` of its own,
    which cost each task an instance dict, and the interpreter its fast method loads on it.
    """
    if speedups is None or _timed is not speedups.timed:
        return False
    try:
        return bool(speedups.unwrap_get_coro(_AsyncioTask))
    except Exception:  # noqa: BLE001 - then each task shadows get_coro, as it always could
        return False


def make_task_factory(monitor: Monitor, previous: Any) -> Any:
    """A task factory that times each task's steps, then defers to ``previous`` (if any)."""
    shadowing = _shadowing
    timed_types = TIMED_TYPES
    make_timed = _timed
    unwraps = _unwrap_get_coro()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        # Only real coroutines: anything else must reach Task() and fail there, as without us.
        if monitor.active and (type(coro) is _CoroutineType or (
                asyncio.iscoroutine(coro) and type(coro) not in timed_types)):
            timed = make_timed(coro, monitor)
            if previous is None and shadowing[0]:
                # A plain Task: a subclass of the C Task leaves its fast paths (~4,000
                # instructions more per task). Where the type's get_coro() does not unwrap,
                # it is shadowed on the instance to return the task's own coroutine. Should
                # a Task take no instance attribute, the subclass it is from then on (this
                # one task shows the wrapper).
                task = _AsyncioTask(timed, loop=loop, **kwargs)
                if not unwraps:
                    try:
                        task.get_coro = timed.wrapped  # type: ignore[method-assign]
                    except AttributeError:
                        shadowing[0] = False
                return task
            coro = timed
        if previous is not None:
            return previous(loop, coro, **kwargs)  # type: ignore[no-any-return]
        if type(coro) in timed_types:
            return Task(coro, loop=loop, **kwargs)
        return _AsyncioTask(coro, loop=loop, **kwargs)

    if speedups is not None and previous is None and make_timed is speedups.timed:
        # The C factory does the common case (a plain coroutine, a monitor running) itself
        # and hands everything else to this one.
        return speedups.TaskFactory(monitor, factory, _AsyncioTask)
    return factory
