"""File paths as the live page shows them: short, and still unambiguous to a reader."""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable

__all__ = ["short_path"]


def _prefixes(paths: Iterable[str]) -> tuple[str, ...]:
    found = {os.path.normpath(p) + os.sep for p in paths if p and os.path.isabs(p)}
    found.discard(os.sep)
    return tuple(sorted(found, key=len, reverse=True))


_paths = sysconfig.get_paths()
#: Where installed packages and the standard library live (a virtualenv may sit inside the
#: working directory: these win over it).
_LIBRARY_ROOTS = _prefixes([_paths["purelib"], _paths["platlib"], _paths["stdlib"], *(
    p for p in sys.path if "site-packages" in p or "dist-packages" in p)])
_IMPORT_ROOTS = _prefixes(sys.path)


def short_path(path: str, cwd: str) -> str:
    """``path`` relative to where it was imported from: ``starlette/routing.py``,
    ``asyncio/events.py``, or relative to the working directory for your own code
    (``app/routes.py``)."""
    for prefix in _LIBRARY_ROOTS:
        if path.startswith(prefix):
            return path[len(prefix):]
    if cwd and cwd != os.sep and path.startswith(cwd + os.sep):
        return path[len(cwd) + 1:]
    for prefix in _IMPORT_ROOTS:
        if path.startswith(prefix):
            return path[len(prefix):]
    return path
