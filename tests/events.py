"""What a test's own code blocked, among the blocks a monitor saw.

Any test's process may have Python's garbage collector hold the loop during the test (a full
collection of the whole suite's heap took 378 ms once in CI), or stand still as a whole; the
monitor reports those as blocks of their own, labelled ``<gc>`` and ``<paused>`` (tested in
``test_gc_blocks.py`` and ``test_hardening_semantics.py``), never as the code's. A test about
the code's blocks counts only those.
"""

from __future__ import annotations

from collections.abc import Iterable

from loopwatch import BlockEvent
from loopwatch._gc import GC_ROUTE
from loopwatch._monitor import PAUSED_ROUTE

__all__ = ["NOT_CODE", "of_code"]

#: The routes of the blocks no code made.
NOT_CODE = (GC_ROUTE, PAUSED_ROUTE)


def of_code(blocks: Iterable[BlockEvent]) -> list[BlockEvent]:
    """``blocks`` without the garbage collector's and the paused process's."""
    return [b for b in blocks if b.route not in NOT_CODE]
