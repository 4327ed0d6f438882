"""Every upstream failure, produced for real by the simulator, and the demo's answer to it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest_demo import LOOPS, Stack, serve_stack, shared_stack, stack, timed  # noqa: F401
from servers import free_port

from demo_app import Settings, create_app

from .servers_compat import serve  # noqa: F401
