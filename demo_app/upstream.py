"""The upstream simulator: every service the demo calls, in one small ASGI app.

Users, their orders and notification counts, posts, products, the weather and an
analytics sink that keeps the events it receives (read them back at
``GET /analytics/events``). Ids 1..100 exist; others are a real 404.

Latency and failures are injected per request with ``X-Sim-*`` headers, per route with
``rules`` and for every route with ``SIM_*`` environment variables (see
:mod:`demo_app.faults`). ``GET /_sim/stats`` counts the requests and the distinct client
connections seen, ``POST /_sim/reset`` clears the counters and the events; these two are
neither counted nor subject to injected faults.

Serve it alone with ``.venv/bin/python -m demo_app.upstream --port 8001``.
"""

from __future__ import annotations

import os
import random
import time
import zlib
from collections import Counter, deque
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Path, Query
from starlette.types import Receive, Scope, Send

from .config import ConfigError
from .faults import Behaviour, error_body, inject, send_json

__all__ = ["UpstreamSimulator", "create_upstream_app"]

#: Ids 1..ENTITIES exist for users, posts and products.
ENTITIES = 100
#: The analytics sink keeps this many recent events, so a long load test stays bounded.
MAX_EVENTS = 10_000

_NAMES = (
    "Leanne Graham",
    "Ervin Howell",
    "Clementine Bauch",
    "Patricia Lebsack",
    "Chelsey Dietrich",
)
_CONDITIONS = ("sunny", "partly cloudy", "overcast", "light rain", "windy")

Id = Annotated[int, Path(description="1..100 exist; any other id is a 404.")]


def _require(kind: str, entity_id: int) -> None:
    if not 1 <= entity_id <= ENTITIES:
        raise HTTPException(404, f"{kind} {entity_id} not found")


class UpstreamSimulator:
    """The simulator as an ASGI app; its counters and events are readable attributes.

    ``defaults`` apply to every route (``SIM_*`` environment variables when omitted);
    ``rules`` maps a path prefix (e.g. ``"/analytics"``) to the behaviour for the routes
    under it, the longest prefix winning; ``X-Sim-*`` headers override either for one
    request. ``seed`` makes jitter and random errors repeatable.
    """

    def __init__(
        self,
        defaults: Behaviour | None = None,
        *,
        rules: Mapping[str, Behaviour] | None = None,
        seed: int | None = None,
    ) -> None:
        self.defaults = Behaviour.from_env(os.environ) if defaults is None else defaults
        self._rules = sorted((rules or {}).items(), key=lambda rule: len(rule[0]), reverse=True)
        self._rng = random.Random(seed)
        self.requests = 0
        self.by_path: Counter[str] = Counter()
        self.clients: set[tuple[str, int]] = set()
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._api = _build_api(self)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_path": dict(self.by_path),
            "connections": len(self.clients),
        }

    def reset(self) -> None:
        self.requests = 0
        self.by_path.clear()
        self.clients.clear()
        self.events.clear()

    def _behaviour_for(self, path: str) -> Behaviour:
        for prefix, behaviour in self._rules:
            if path.startswith(prefix):
                return behaviour
        return self.defaults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/_sim/"):
            await self._api(scope, receive, send)
            return
        self.requests += 1
        self.by_path[scope["path"]] += 1
        if scope.get("client"):
            self.clients.add(tuple(scope["client"]))
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        try:
            behaviour = self._behaviour_for(scope["path"]).with_headers(headers)
        except ConfigError as exc:
            await send_json(send, 400, error_body(400, str(exc)))
            return
        await inject(behaviour, self._rng, self._api, scope, receive, send)


def create_upstream_app(
    defaults: Behaviour | None = None,
    *,
    rules: Mapping[str, Behaviour] | None = None,
    seed: int | None = None,
) -> UpstreamSimulator:
    """A new simulator; with no arguments its defaults come from ``SIM_*`` variables."""
    return UpstreamSimulator(defaults, rules=rules, seed=seed)


def _build_api(sim: UpstreamSimulator) -> FastAPI:
    api = FastAPI(title="loopwatch demo upstream simulator")

    @api.get("/users/{user_id}")
    async def user(user_id: Id) -> dict[str, Any]:
        _require("user", user_id)
        name = _NAMES[(user_id - 1) % len(_NAMES)]
        username = name.split()[0].lower() + str(user_id)
        return {
            "id": user_id,
            "name": name,
            "username": username,
            "email": f"{username}@example.com",
        }

    @api.get("/users/{user_id}/orders")
    async def orders(
        user_id: Id, limit: Annotated[int, Query(ge=1, le=50)] = 5
    ) -> list[dict[str, Any]]:
        _require("user", user_id)
        return [
            {"id": user_id * 1000 + n, "user_id": user_id, "total": round(9.99 * (n + 1), 2)}
            for n in range(limit)
        ]

    @api.get("/users/{user_id}/notifications/count")
    async def notification_count(user_id: Id) -> int:
        _require("user", user_id)
        return user_id % 7

    @api.get("/posts/{post_id}")
    async def post(post_id: Id) -> dict[str, Any]:
        _require("post", post_id)
        return {
            "id": post_id,
            "userId": post_id % 10 + 1,
            "title": f"Post {post_id}",
            "body": "...",
        }

    @api.get("/products/{product_id}")
    async def product(product_id: Id) -> dict[str, Any]:
        _require("product", product_id)
        return {
            "id": product_id,
            "name": f"Product {product_id}",
            "price": round(4.5 * product_id, 2),
        }

    @api.get("/weather")
    async def weather(city: str = "Berlin") -> dict[str, Any]:
        seed = zlib.crc32(city.encode())
        return {
            "city": city,
            "temperature_c": round(seed % 350 / 10 - 5, 1),
            "conditions": _CONDITIONS[seed % len(_CONDITIONS)],
        }

    @api.post("/analytics/events", status_code=202)
    async def record_event(event: Annotated[dict[str, Any], Body()]) -> dict[str, int]:
        sim.events.append({"received_at": time.time(), "event": event})
        return {"recorded": len(sim.events)}

    @api.get("/analytics/events")
    async def list_events() -> dict[str, list[dict[str, Any]]]:
        return {"events": list(sim.events)}

    @api.get("/_sim/stats")
    async def stats() -> dict[str, Any]:
        return sim.stats()

    @api.post("/_sim/reset", status_code=204)
    async def reset() -> None:
        sim.reset()

    return api


def main(argv: list[str] | None = None) -> None:
    """``.venv/bin/python -m demo_app.upstream``: the simulator alone (docker-compose, the
    stack)."""
    import argparse

    import uvicorn

    from .commands import python_command

    parser = argparse.ArgumentParser(
        prog=f"{python_command()} -m demo_app.upstream",
        description="Run the upstream simulator alone. Default latency and failures come "
        "from SIM_DELAY_MS, SIM_JITTER_MS, SIM_STATUS, SIM_ERROR_RATE, SIM_HANG, SIM_DROP "
        "and SIM_GARBAGE; per request from the X-Sim-* headers.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port (default: 8001)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"invalid --port {args.port}; allowed: 0 to 65535")
    try:
        app = create_upstream_app()
    except ConfigError as exc:
        parser.error(str(exc))
    uvicorn.run(app, host=args.host, port=args.port, loop=args.loop, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
