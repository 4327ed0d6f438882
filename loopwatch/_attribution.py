"""Who owns the loop time of a callback: a context variable read from each step's context.

The monitor charges every timed step to the :class:`Owner` found in that step's context
(tasks copy the context of the code that created them, so ``gather`` children are charged to
the request that spawned them). The middleware makes one owner per request; any other
framework can do the same with :func:`owner_scope`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["Owner", "current_owner", "owner_scope"]


class Owner:
    """Accumulates the loop time of the steps that run in its context.

    ``busy`` is seconds of loop time held by the owner's own code (its task steps and the
    steps of tasks it spawned). ``method`` and ``route`` label the block events it causes.
    """

    __slots__ = ("__weakref__", "busy", "method", "route")

    def __init__(self, method: str | None = None, route: str | None = None) -> None:
        self.busy = 0.0
        self.method = method
        self.route = route

    def labels(self) -> tuple[str | None, str | None]:
        """(method, route) for block events; subclasses may resolve the route lazily."""
        return self.method, self.route

    def __repr__(self) -> str:
        return f"<Owner {self.method} {self.route} busy={self.busy:.6f}>"


current_owner: ContextVar[Owner | None] = ContextVar("loopwatch_owner", default=None)


@contextlib.contextmanager
def owner_scope(owner: Owner) -> Iterator[Owner]:
    """Charge the loop time of the code in this block (and the tasks it spawns) to ``owner``."""
    token = current_owner.set(owner)
    try:
        yield owner
    finally:
        current_owner.reset(token)
