"""Request parameters and dependencies shared by the demo's routers."""

from __future__ import annotations

from typing import Annotated

import httpx
from fastapi import Depends, Path, Query, Request

from .config import Settings
from .upstream import ENTITIES

__all__ = [
    "MAX_BLOCK_MS",
    "MAX_ID",
    "AppSettings",
    "BlockMs",
    "Client",
    "ProductId",
    "SimControl",
    "UserId",
]

# Ids are those the upstream simulator serves: any other is refused with 422 before an
# upstream call, so the schema says which ids exist. (An upstream 404 is still possible,
# e.g. with ``X-Sim-Status: 404``, and documented.)
MAX_ID = ENTITIES
# Anti-pattern routes block for at most this long, so a stray request cannot wedge the demo.
MAX_BLOCK_MS = 5000

UserId = Annotated[
    int, Path(ge=1, le=MAX_ID, description=f"A user id, 1..{MAX_ID}: the users that exist.")
]
ProductId = Annotated[
    int,
    Path(ge=1, le=MAX_ID, description=f"A product id, 1..{MAX_ID}: the products that exist."),
]
BlockMs = Annotated[
    int, Query(ge=0, le=MAX_BLOCK_MS, description="How long to block, in milliseconds (0..5000).")
]


# The dependencies below are ``async def`` although they never await: FastAPI runs a plain
# ``def`` dependency in its thread pool, so an exhausted pool (see
# /antipatterns/sync-def) would stall every route that uses one.
async def _client(request: Request) -> httpx.AsyncClient:
    client: httpx.AsyncClient = request.app.state.http_client
    return client


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _sim_control(request: Request) -> dict[str, str]:
    """The request's ``X-Sim-*`` headers, which the demo forwards to every upstream call.

    They let a caller make the simulated upstream slow or failing for one demo request
    (``X-Sim-Delay-Ms: 200``, ``X-Sim-Status: 500``, ``X-Sim-Hang: 1`` ...). A real
    service forwards trace headers the same way.
    """
    return {name: value for name, value in request.headers.items() if name.startswith("x-sim-")}


Client = Annotated[httpx.AsyncClient, Depends(_client)]
AppSettings = Annotated[Settings, Depends(_settings)]
SimControl = Annotated[dict[str, str], Depends(_sim_control)]
