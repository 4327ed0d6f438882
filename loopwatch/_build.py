"""Which hot path runs: the compiled one where it was built, else pure Python.

The one place that decides, imported before anything that depends on it. Where the
extensions were not built (no compiler or Cython at install time, a Python other than
CPython), or with ``LOOPWATCH_PURE_PYTHON=1`` in the environment, ``ctiming`` is None and
everything runs in pure Python (the same code: see ``_accel``).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["PURE_PYTHON_VAR", "compiled", "ctiming"]

#: Set to 1 to run the pure-Python path although the extensions are there.
PURE_PYTHON_VAR = "LOOPWATCH_PURE_PYTHON"

ctiming: Any = None
if os.environ.get(PURE_PYTHON_VAR, "").strip().lower() in ("", "0", "false", "no"):
    try:
        from . import _ctiming as ctiming
    except ImportError:  # not built here: the pure-Python path
        ctiming = None

#: Whether the compiled hot path runs.
compiled = ctiming is not None
