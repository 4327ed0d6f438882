"""Commands as a user can type them: the demo's own interpreter, not a bare ``python``.

On a fresh machine ``python`` is the system's (or missing) and has none of the demo's
packages; ``bash scripts/demo.sh`` installs them in ``.venv``. A command that names the
interpreter running the demo works as printed.
"""

from __future__ import annotations

import os
import shlex
import sys

__all__ = ["python_command"]


def python_command() -> str:
    """This interpreter as a shell word: relative to the working directory when it is
    inside it (``.venv/bin/python``), absolute otherwise."""
    executable = sys.executable
    if not executable:  # embedded interpreters may not know their own path
        return "python3"
    try:
        relative = os.path.relpath(executable)
    except ValueError:  # another drive on Windows
        relative = executable
    if relative.startswith(os.pardir):
        path = executable
    elif os.sep in relative:
        path = relative
    else:
        path = os.curdir + os.sep + relative
    return shlex.quote(path)
