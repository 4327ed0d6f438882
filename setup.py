"""Builds loopwatch's optional compiled hot path.

* ``loopwatch._ctiming`` from ``loopwatch/_ctiming.c``: the loop-step timing (the twin of
  ``_hooks.py``);
* ``loopwatch._crequest`` from ``loopwatch/_request.py`` itself, by Cython, with the types in
  ``loopwatch/_crequest.pxd``: the per-request path, the same source compiled;
* ``loopwatch._cfactory`` from ``loopwatch/_factory.py``, by Cython, with the types in
  ``loopwatch/_cfactory.pxd``: uvloop's task factory.

Everything else is in pyproject.toml. Where they cannot be built (no compiler, no Cython, a
Python other than CPython), the install goes on without them and loopwatch runs the same code
in pure Python, at a higher cost per step and per request.
"""

import os
import platform

from setuptools import Extension, setup

ext_modules: list[Extension] = []
if platform.python_implementation() == "CPython" and not os.environ.get("LOOPWATCH_NO_COMPILE"):
    ext_modules.append(
        Extension("loopwatch._ctiming", ["loopwatch/_ctiming.c"], optional=True)
    )
    try:
        from Cython.Build import cythonize
    except ImportError:
        pass
    else:
        compiled = [
            Extension("loopwatch._crequest", ["loopwatch/_request.py"], optional=True),
            Extension("loopwatch._cfactory", ["loopwatch/_factory.py"], optional=True),
        ]
        ext_modules += cythonize(
            compiled, quiet=True,
            compiler_directives={"language_level": 3, "annotation_typing": False},
        )

setup(ext_modules=ext_modules)
