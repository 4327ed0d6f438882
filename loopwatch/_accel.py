"""The compiled hot path, where it was built: ``loopwatch._ctiming``, ``_crequest``, ``_cfactory``.

* ``_ctiming`` (hand-written C, ``_ctiming.c``) does exactly what :mod:`._hooks` does for
  each loop step, and holds the monitor's per-step fields (:class:`StepState`);
* ``_crequest`` is :mod:`._request` itself -- the same source -- compiled by Cython, with the
  types ``_crequest.pxd`` gives it: the per-request path (:data:`request`);
* ``_cfactory`` is :mod:`._factory` compiled by Cython: uvloop's task factory, which runs for
  every task (:data:`task_factories`).

Where they were not built (no compiler or Cython at install time, a Python other than
CPython), or with ``LOOPWATCH_PURE_PYTHON=1`` in the environment, loopwatch runs the same
code in pure Python, at a higher cost per step and per request.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _factory, _request
from ._attribution import current_owner
from ._build import PURE_PYTHON_VAR, ctiming

__all__ = [
    "HOT_PATH", "PURE_PYTHON_VAR", "StepState", "ctiming", "request", "task_factories",
]


def _compiled(name: str, source: Any) -> Any:
    """The module compiled by Cython from ``source`` (``loopwatch.<name>``), where it was
    built and the compiled path runs; else ``source`` itself."""
    if ctiming is None:
        return source
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ImportError:  # built without Cython: that module in Python
        return source


#: The per-request path: _request compiled (_crequest), or _request itself.
request: Any = _compiled("_crequest", _request)
#: uvloop's task factory: _factory compiled (_cfactory), or _factory itself.
task_factories: Any = _compiled("_cfactory", _factory)

if ctiming is not None:
    ctiming.configure(owner_var=current_owner, owner_type=request.RequestOwner)


class _PyStepState:
    """What the step hooks write on a monitor (``_ctiming.StepState`` is its C twin)."""

    __slots__ = ("active", "busy", "due", "idle", "idle_gap", "last_end", "last_gap",
                 "long_end", "look_after", "run_start", "step_start", "threshold")
    active: bool
    busy: float
    step_start: float
    threshold: float
    #: Of the loop's waiting (see _waiting): when its last step ended, its pauses so far,
    #: when it last started running after one and how long that one was, when its last step
    #: of look_after or more ended, the due time of the running step's timer (0: none
    #: known), and the two limits.
    last_end: float
    idle: float
    run_start: float
    last_gap: float
    long_end: float
    due: float
    idle_gap: float
    look_after: float


#: The base class of Monitor.
if TYPE_CHECKING:
    StepState = _PyStepState
else:
    StepState = _PyStepState if ctiming is None else ctiming.StepState

#: Which path runs: "c" or "python" (shown by events_app).
HOT_PATH = "python" if ctiming is None else "c"
