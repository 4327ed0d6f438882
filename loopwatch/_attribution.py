"""Who owns the loop time of a callback: a context variable read from each step's context.

The monitor charges every timed step to the :class:`Owner` found in that step's context
(tasks copy the context of the code that created them, so ``gather`` children are charged to
the request that spawned them). The middleware makes one owner per request; any other
framework can do the same with :func:`owner_scope`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

from ._build import ctiming
from ._waiting import running_wait

__all__ = ["AnyOwner", "Owner", "OwnerState", "current_owner", "owner_scope"]


class AnyOwner(Protocol):
    """What the monitor needs of an owner: an :class:`Owner`, or a request's owner."""

    busy: float

    def labels(self) -> tuple[str | None, str | None]: ...


class _PyOwnerState:
    """What a step charges on its owner: ``busy``, and ``delayed`` with the fields it is
    measured from (see :mod:`._waiting`; a step that starts once ``ended`` is set is charged
    no wait). ``_ctiming.OwnerState`` is its C twin, where the hooks write C doubles."""

    __slots__ = ("busy", "delayed", "ended", "last_end", "others_mark", "timer_end")
    busy: float
    delayed: float
    last_end: float
    others_mark: float
    ended: float
    timer_end: float


#: The base of every owner.
if TYPE_CHECKING:
    OwnerState = _PyOwnerState
else:
    OwnerState = _PyOwnerState if ctiming is None else ctiming.OwnerState


class Owner(OwnerState):
    """Accumulates the loop time of the steps that run in its context.

    ``busy`` is seconds of loop time held by the owner's own code (its task steps and the
    steps of tasks it spawned); ``delayed`` is seconds its steps were ready to run but other
    code held the loop (see :mod:`._waiting`). ``method`` and ``route`` label the block
    events it causes.
    """

    __slots__ = ("__weakref__", "method", "route")

    def __init__(self, method: str | None = None, route: str | None = None) -> None:
        self.busy = 0.0
        self.delayed = 0.0
        self.last_end = 0.0
        self.others_mark = 0.0
        self.ended = 0.0
        self.timer_end = 0.0
        self.method = method
        self.route = route

    def labels(self) -> tuple[str | None, str | None]:
        """(method, route) for block events; subclasses may resolve the route lazily."""
        return self.method, self.route

    def __repr__(self) -> str:
        return (f"<Owner {self.method} {self.route} busy={self.busy:.6f} "
                f"delayed={self.delayed:.6f}>")


current_owner: ContextVar[AnyOwner | None] = ContextVar("loopwatch_owner", default=None)


@contextlib.contextmanager
def owner_scope(owner: Owner) -> Iterator[Owner]:
    """Charge the loop time of the code in this block (and the tasks it spawns) to ``owner``.

    The block's last step is charged up to the block's end (and the wait before it), and,
    should that step turn out to be a block of the loop, its event names ``owner`` (the step
    ends after the scope has).
    """
    token = current_owner.set(owner)
    try:
        yield owner
    finally:
        try:
            _finish_in_step(owner)
        finally:
            current_owner.reset(token)


def _finish_in_step(owner: Owner) -> None:
    loop = asyncio.events._get_running_loop()
    if loop is None:
        return
    from ._monitor import get_monitor  # (the monitor imports this module)

    monitor = get_monitor(loop)
    if monitor is not None and monitor.active:
        if monitor.step_start:  # the wait before this step, charged at its end otherwise
            owner.delayed += running_wait(monitor, owner, monitor.step_start)
        owner.busy = monitor._note_finished(owner)
