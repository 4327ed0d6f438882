"""Builds loopwatch's optional C hot path (loopwatch/_speedups.c).

Everything else is in pyproject.toml. Where the extension cannot be built (no compiler, or
a Python other than CPython), the install goes on without it and loopwatch runs its
pure-Python path, which does the same at a higher cost per request.
"""

import platform

from setuptools import Extension, setup

ext_modules = []
if platform.python_implementation() == "CPython":
    ext_modules.append(
        Extension("loopwatch._speedups", ["loopwatch/_speedups.c"], optional=True)
    )

setup(ext_modules=ext_modules)
