"""The ways an application adds loopwatch, for the type checker: CI runs ``mypy --strict``
over this file with loopwatch, so a signature of loopwatch's that would fail a user's own
type check fails CI. Imported by nothing; the suite runs these forms for real."""

from __future__ import annotations

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp

import loopwatch

app = FastAPI()
# README "Quick start"
app.add_middleware(loopwatch.LoopWatchMiddleware)
# with options, as README "Configuration"
app.add_middleware(loopwatch.LoopWatchMiddleware, registry=CollectorRegistry(),
                   exclude_paths=["/health"], block_threshold=0.05)
# a misspelled option is a type error too (and a ValueError at run time)
app.add_middleware(loopwatch.LoopWatchMiddleware, block_treshold=0.05)  # type: ignore[call-arg]
loopwatch.watch(probe_interval="10ms")  # type: ignore[arg-type]
# the live page
app.mount("/loopwatch", loopwatch.ui_app())
# the endpoints as mounts (Starlette types add_route for request handlers only)
app.mount("/metrics", loopwatch.metrics_app())
app.mount("/loopwatch/events", loopwatch.events_app())
# or as a Route, for exactly /metrics
app.routes.append(Route("/metrics", loopwatch.metrics_app()))
# Starlette's middleware list
starlette_app = Starlette(middleware=[Middleware(loopwatch.LoopWatchMiddleware)])
# wrapping an ASGI app by hand
wrapped: ASGIApp = loopwatch.LoopWatchMiddleware(app, exclude_paths=())


async def handler() -> None:
    async with loopwatch.watch(block_threshold=0.05) as watched:
        pass
    assert watched.blocks == []
