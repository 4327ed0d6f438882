"""The optional C hot path: ``loopwatch._speedups``, where it was built.

The C extension does exactly what the pure-Python code beside it does (the step hooks in
``_hooks``, the request owner in ``_middleware``, the running totals in ``_metrics``), for a
fraction of the instructions per request and per loop step. Where it was not built (no
compiler at install time, a Python other than CPython), or with ``LOOPWATCH_PURE_PYTHON=1``
in the environment, loopwatch runs the pure-Python path.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from ._attribution import current_owner
from ._routes import method_label, route_label

__all__ = ["PURE_PYTHON_VAR", "StepState", "speedups"]

#: Set to 1 to run the pure-Python path although the extension is there.
PURE_PYTHON_VAR = "LOOPWATCH_PURE_PYTHON"

speedups: Any = None
if os.environ.get(PURE_PYTHON_VAR, "").strip().lower() in ("", "0", "false", "no"):
    try:
        from . import _speedups as speedups
    except ImportError:  # not built here: the pure-Python path
        speedups = None


def _labels(owner: Any) -> tuple[str, str]:
    """(method, route) of a C request owner, for block events and in-progress gauges."""
    return method_label(owner.scope["method"]), route_label(owner.scope, owner.root_path)


_original_run = asyncio.events.Handle._run
#: Whether Handle._run is the one-line body the C hook runs itself (3.10-3.13 all are:
#: ``self._context.run(self._callback, *self._args)`` in a try that reports exceptions);
#: otherwise the C hook calls the original for every callback.
INLINE_RUN = (
    getattr(getattr(_original_run, "__code__", None), "co_names", ())[:4]
    == ("_context", "run", "_callback", "_args")
)

if speedups is not None:
    speedups.configure(
        owner_var=current_owner,
        original_run=_original_run,
        current_task=asyncio.current_task,
        labeler=_labels,
        inline_run=INLINE_RUN,
    )


class _PyStepState:
    """What the step hooks write on a monitor (``_speedups.StepState`` is its C twin)."""

    __slots__ = ("_closing", "active", "busy", "step_start", "threshold")
    _closing: tuple[float, Any]  #: (start of the step, owner) of the request that just ended
    active: bool
    busy: float
    step_start: float
    threshold: float


#: The base class of Monitor.
if TYPE_CHECKING:
    StepState = _PyStepState
else:
    StepState = _PyStepState if speedups is None else speedups.StepState
