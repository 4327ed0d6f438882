"""Helpers for the demo's tests: the simulator and the demo as real uvicorn servers.

Not a ``conftest.py``: the demo's test modules import what they use from here and keep
their fixtures to themselves.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from harness.servers import RunningServer, serve_in_thread

from demo_app import Settings, create_app
from demo_app.faults import Behaviour
from demo_app.upstream import UpstreamSimulator, create_upstream_app

T = TypeVar("T")

LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        "uvloop",
        id="uvloop",
        marks=pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows support"),
    ),
]


@dataclass
class Stack:
    """A running demo and the simulator it calls, with a client for each."""

    url: str
    upstream_url: str
    app: FastAPI
    sim: UpstreamSimulator
    #: Talks to the demo (base URL ``url``).
    client: httpx.Client
    #: Talks to the simulator (base URL ``upstream_url``).
    upstream: httpx.Client

    def sim_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = self.upstream.get("/_sim/stats").json()
        return stats

    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = self.upstream.get("/analytics/events").json()["events"]
        return events

    def reset(self) -> None:
        self.upstream.post("/_sim/reset").raise_for_status()


@contextlib.contextmanager
def serve(app: Any, loop: str) -> Iterator[RunningServer]:
    """``serve_in_thread`` with TCP_NODELAY on the connections it accepts.

    ``serve_in_thread`` binds a socket created with protocol 0, and asyncio only sets
    TCP_NODELAY on accepted sockets whose protocol is IPPROTO_TCP. Without it, every
    keep-alive response on the asyncio loop stalls ~40 ms (Nagle's algorithm waiting on the
    client's delayed ACK), which uvicorn binding its own port does not suffer. Accepted
    sockets inherit the option from the listening one.
    """
    with serve_in_thread(app, loop=loop) as server:
        for listener in server.server.servers:
            for sock in listener.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield server


@contextlib.contextmanager
def serve_simulator(
    loop: str = "asyncio",
    *,
    defaults: Behaviour | None = None,
    rules: Mapping[str, Behaviour] | None = None,
) -> Iterator[tuple[str, UpstreamSimulator]]:
    """A simulator on loopback; ``defaults`` are explicit so SIM_* variables cannot leak in."""
    sim = create_upstream_app(defaults or Behaviour(), rules=rules, seed=0)
    with serve(sim, loop) as server:
        yield server.url, sim


@contextlib.contextmanager
def serve_stack(
    loop: str = "asyncio",
    *,
    defaults: Behaviour | None = None,
    rules: Mapping[str, Behaviour] | None = None,
    **settings: Any,
) -> Iterator[Stack]:
    """The simulator and the demo (without loopwatch), ``settings`` overriding Settings."""
    with serve_simulator(loop, defaults=defaults, rules=rules) as (upstream_url, sim):
        app = create_app(Settings(upstream_url=upstream_url, **settings), instrument=False)
        with (
            serve(app, loop) as demo,
            httpx.Client(base_url=demo.url, timeout=10) as client,
            httpx.Client(base_url=upstream_url, timeout=10) as upstream,
        ):
            yield Stack(demo.url, upstream_url, app, sim, client, upstream)


def timed(call: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def wait_for(condition: Callable[[], T], timeout: float = 5.0) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)
    return result
