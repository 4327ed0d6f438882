"""The article's routes: every upstream call is awaited on the one shared client.

While a route awaits the upstream, the event loop serves other requests, so a 500 ms
upstream costs each user 500 ms, not 500 ms times the number of users ahead of them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
from fastapi import APIRouter, BackgroundTasks
from pydantic import RootModel

from .deps import AppSettings, Client, ProductId, SimControl, UserId
from .errors import UPSTREAM_RESPONSES, describe, parse, upstream_errors
from .models import Dashboard, Order, Post, Product, User, Weather

__all__ = ["router"]

logger = logging.getLogger("demo_app.analytics")

# Every route here calls the upstream: each may answer 404, 502 or 504 with one error body.
router = APIRouter(tags=["non-blocking"], responses=UPSTREAM_RESPONSES)


@router.get("/data")
async def get_data(client: Client, sim: SimControl) -> Post:
    """Post 1 from the upstream: one awaited call on the shared client."""
    with upstream_errors("post 1"):
        response = await client.get("/posts/1", headers=sim)
        response.raise_for_status()
        return parse(Post, response)


@router.get("/users/{user_id}")
async def get_user(user_id: UserId, client: Client, sim: SimControl) -> User:
    """One user; ``raise_for_status`` turns an upstream 4xx/5xx into an exception."""
    with upstream_errors(f"user {user_id}"):
        response = await client.get(f"/users/{user_id}", headers=sim)
        response.raise_for_status()
        return parse(User, response)


@router.get("/dashboard/{user_id}")
async def get_dashboard(user_id: UserId, client: Client, sim: SimControl) -> Dashboard:
    """Profile, last orders and notification count, fetched concurrently.

    ``asyncio.gather`` starts the three calls at once, so the route takes as long as the
    slowest of them instead of their sum (compare ``/antipatterns/sequential/{user_id}``).
    """
    with upstream_errors(f"user {user_id}"):
        profile, orders, notifications = await asyncio.gather(
            client.get(f"/users/{user_id}", headers=sim),
            client.get(f"/users/{user_id}/orders", params={"limit": 5}, headers=sim),
            client.get(f"/users/{user_id}/notifications/count", headers=sim),
        )
        for response in (profile, orders, notifications):
            response.raise_for_status()
        return dashboard(profile, orders, notifications)


def dashboard(
    profile: httpx.Response, orders: httpx.Response, notifications: httpx.Response
) -> Dashboard:
    """The dashboard from the three upstream answers, each checked for its shape."""
    return Dashboard(
        profile=parse(User, profile),
        orders=parse(_Orders, orders).root,
        notification_count=parse(_Count, notifications).root,
    )


class _Orders(RootModel[list[Order]]):
    pass


class _Count(RootModel[int]):
    pass


@router.get("/resilient/{user_id}")
async def get_user_resilient(user_id: UserId, client: Client, sim: SimControl) -> User:
    """The article's error-handling example: every upstream failure becomes an answer.

    Upstream timeout → 504, upstream 404 → 404, any other upstream status → 502, refused,
    reset or dropped connections and unresolvable hosts → 502, a body that is not JSON
    → 502. ``detail`` is ``{"code", "message", "retryable"}``. Every route that calls the
    upstream shares this mapping (:func:`demo_app.errors.upstream_errors`) and declares
    these answers; this one is where the article spells them out.
    """
    with upstream_errors(f"user {user_id}"):
        response = await client.get(f"/users/{user_id}", headers=sim)
        response.raise_for_status()
        return parse(User, response)


async def send_analytics_event(client: httpx.AsyncClient, url: str, event: dict[str, Any]) -> None:
    """Post ``event`` to the analytics sink; a failure is logged, never raised.

    This runs after the response has been sent: an exception here could not reach the
    user anyway, it would only turn into a traceback in the server log.
    """
    try:
        response = await client.post(url, json=event)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        logger.warning("analytics event %s was lost: %s", event, describe(exc))


@router.get("/products/{product_id}")
async def get_product(
    product_id: ProductId,
    client: Client,
    sim: SimControl,
    settings: AppSettings,
    background_tasks: BackgroundTasks,
) -> Product:
    """A product; the analytics event is posted after the response has been sent.

    The user does not wait for the analytics sink, and a slow or failing sink cannot
    change what they get.
    """
    with upstream_errors(f"product {product_id}"):
        response = await client.get(f"/products/{product_id}", headers=sim)
        response.raise_for_status()
        product = parse(Product, response)
    background_tasks.add_task(
        send_analytics_event,
        client,
        settings.analytics_url,
        {"event": "product_viewed", "product_id": product_id},
    )
    return product


@router.get("/weather")
async def get_weather(client: Client, sim: SimControl) -> Weather:
    """The article's weather example done right: awaited, so the loop keeps serving.

    ``/antipatterns/requests-get`` is the same call made with ``requests``.
    """
    with upstream_errors("the weather"):
        response = await client.get("/weather", headers=sim)
        response.raise_for_status()
        return parse(Weather, response)
