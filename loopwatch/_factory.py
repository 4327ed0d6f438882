"""uvloop's way in: a task factory whose tasks time each of their steps.

uvloop's handles never call ``Handle._run``, so on uvloop the monitor installs this factory
(:meth:`Monitor.start`): each task it makes runs its coroutine through a timing wrapper
(:class:`._hooks.TimedCoroutine`, or its C twin), whose ``send`` / ``throw`` time each step.

Where the extensions are built this same file is compiled by Cython as
``loopwatch._cfactory``, typed by ``_cfactory.pxd`` (:mod:`._accel` picks which runs): it runs
once for every task, so for every request.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

__all__ = ["make_task_factory"]

_CoroutineType = types.CoroutineType
_AsyncioTask = asyncio.Task
_iscoroutine = asyncio.iscoroutine

#: Whether a Task takes ``get_coro`` as an instance attribute (see the factory).
_shadowing = [True]


def make_task_factory(monitor: Any, previous: Any, timed: Any, timed_types: tuple[type, ...],
                      task_type: type) -> Any:
    """A task factory that times each task's steps, then defers to ``previous`` (if any).

    ``timed(coro, monitor)`` makes the timing wrapper, whose type is one of ``timed_types``.
    Each task runs that wrapper, and its ``get_coro()`` still returns the task's own
    coroutine: the wrapper, which returns it when called, shadows ``get_coro`` on the task.
    (Where a Task takes no instance attribute, ``task_type`` -- a subclass of Task whose
    ``get_coro`` unwraps -- is used instead, which leaves the C Task's fast paths.) No type of
    asyncio's is changed.
    """
    shadowing = _shadowing

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, context: Any = None,
                eager_start: Any = None, **kwargs: Any) -> Any:
        # context= and eager_start=, which uvloop passes with every task (None unless asked),
        # by name: where both are None or False, as for nearly every task, Task() is called
        # with no other keyword than loop= (no keywords to merge). Neither differs from its
        # default there.
        if context is not None:
            kwargs["context"] = context
        if eager_start is not None and eager_start is not False:
            kwargs["eager_start"] = eager_start
        # Only real coroutines: anything else must reach Task() and fail there, as without us.
        if monitor.active and (type(coro) is _CoroutineType or (
                _iscoroutine(coro) and type(coro) not in timed_types)):
            wrapper = timed(coro, monitor)
            if previous is None and shadowing[0]:
                task = (_AsyncioTask(wrapper, loop=loop, **kwargs) if kwargs
                        else _AsyncioTask(wrapper, loop=loop))
                try:
                    task.get_coro = wrapper  # type: ignore[method-assign]
                except AttributeError:
                    shadowing[0] = False  # this one task shows the wrapper
                return task
            coro = wrapper
        if previous is not None:
            return previous(loop, coro, **kwargs)
        if type(coro) in timed_types:
            return task_type(coro, loop=loop, **kwargs)
        return _AsyncioTask(coro, loop=loop, **kwargs)

    return factory
