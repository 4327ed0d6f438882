"""What the demo answers with: the upstream's resources, checked as they arrive.

Each upstream body is validated into its model before the demo answers with it, so a body
of another shape is the upstream's fault (a 502), never a 500 of the demo's, and the
schema the demo publishes is the shape it really sends.
"""

from __future__ import annotations

from pydantic import BaseModel

__all__ = ["Block", "CpuWork", "Dashboard", "FileRead", "Order", "Post", "Product", "User",
           "Weather"]


class User(BaseModel):
    id: int
    name: str
    username: str
    email: str


class Order(BaseModel):
    id: int
    user_id: int
    total: float


class Dashboard(BaseModel):
    """A user's profile, last orders and unread notification count, fetched together."""

    profile: User
    orders: list[Order]
    notification_count: int


class Post(BaseModel):
    id: int
    userId: int  # noqa: N815 - the upstream's field name
    title: str
    body: str


class Product(BaseModel):
    id: int
    name: str
    price: float


class Weather(BaseModel):
    city: str
    temperature_c: float
    conditions: str


class Block(BaseModel):
    """How long an anti-pattern route blocked (or, as ``def``, held a thread)."""

    slept_ms: int


class CpuWork(BaseModel):
    rounds: int
    digest: str


class FileRead(BaseModel):
    bytes: int
