"""Tests that need something from the system: skipped where it is missing, failed under CI.

``.ci/run`` sets ``CI``: there everything is installed, so a missing piece is a failure, and
CI never skips the tests that guard it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = bool(os.environ.get("CI"))


def missing(what: str) -> NoReturn:
    """Skip the calling test for want of ``what`` (a message naming it); under CI, fail."""
    if IN_CI:
        pytest.fail(f"{what} (CI must provide it)")
    pytest.skip(what)
