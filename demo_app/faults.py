"""Latency and failures the upstream simulator injects, per request or by default.

A :class:`Behaviour` says what to do with one request. Defaults come from ``SIM_*``
environment variables (or the simulator's constructor); ``X-Sim-*`` request headers
override them for a single request. :func:`inject` then acts it out in front of the
simulator's real routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import socket
import struct
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .config import Spec, flag, fraction, int_range

__all__ = ["Behaviour", "error_body", "inject", "send_json"]

_MS = int_range(0, 600_000, "milliseconds")
_STATUS = Spec(
    int, lambda v: v == 0 or 400 <= v <= 599, "an HTTP error status 400..599, or 0 for none"
)


def _parse_drop(raw: str) -> str:
    lowered = raw.lower()
    if lowered in ("close", "reset", ""):
        return lowered
    return "close" if flag().parse(lowered) else ""


_DROP = Spec(_parse_drop, lambda v: v in ("", "close", "reset"), "close, reset, or 1/0")


def _control(default: Any, header: str, env: str, spec: Spec[Any]) -> Any:
    return dataclasses.field(default=default, metadata={"header": header, "env": env, "spec": spec})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Behaviour:
    """What the simulator does with a request before (or instead of) answering it."""

    #: Wait this long before answering.
    delay_ms: int = _control(0, "X-Sim-Delay-Ms", "SIM_DELAY_MS", _MS)
    #: A uniformly random extra delay of 0..jitter_ms on top of delay_ms.
    jitter_ms: int = _control(0, "X-Sim-Jitter-Ms", "SIM_JITTER_MS", _MS)
    #: Answer with this status and a JSON error body instead of the route's answer.
    status: int = _control(0, "X-Sim-Status", "SIM_STATUS", _STATUS)
    #: The probability that a request fails with a 500.
    error_rate: float = _control(0.0, "X-Sim-Error-Rate", "SIM_ERROR_RATE", fraction())
    #: Never answer; wait until the client gives up and closes the connection.
    hang: bool = _control(False, "X-Sim-Hang", "SIM_HANG", flag())
    #: Close the connection without sending a byte of a response: "close" sends a FIN
    #: (the peer sees an orderly close), "reset" an RST (the peer sees a reset).
    drop: str = _control("", "X-Sim-Drop", "SIM_DROP", _DROP)
    #: Answer 200 with a truncated JSON body.
    garbage: bool = _control(False, "X-Sim-Garbage", "SIM_GARBAGE", flag())

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            f.metadata["spec"].validate(f.name, getattr(self, f.name))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Behaviour:
        """Defaults for every route from ``SIM_*`` variables.

        A bad value raises :class:`~demo_app.config.ConfigError` naming the variable.
        """
        return cls(**_parse(environ, "env"))

    def with_headers(self, headers: Mapping[str, str]) -> Behaviour:
        """This behaviour overridden by the ``X-Sim-*`` headers present (names in lower case)."""
        overrides = _parse(headers, "header")
        return dataclasses.replace(self, **overrides) if overrides else self


def _parse(source: Mapping[str, str], key: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Behaviour):
        name = f.metadata[key]
        raw = source.get(name.lower() if key == "header" else name)
        if raw:
            values[f.name] = f.metadata["spec"].from_text(name, raw)
    return values


GARBAGE = b'{"id": 1, "name": "Leanne Gr'


async def send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _drop_connection(receive: Receive, *, reset: bool) -> None:
    """Close the client's TCP connection without a response.

    ASGI has no message for this (a server answers 500 when an app fails before
    responding), so reach the transport through uvicorn's ``receive``, a bound method of
    its per-request cycle object. On a plain close httpx raises ``RemoteProtocolError``
    ("Server disconnected without sending a response"); on a reset, ``ReadError``.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None:
        raise RuntimeError("X-Sim-Drop needs the simulator to run under uvicorn")
    if reset:
        # Lingering for 0 s makes close() discard the connection with an RST.
        linger = struct.pack("ii", 1, 0)
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    transport.close()
    await _until_disconnect(receive)


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"detail": message, "status": status}).encode()


async def inject(
    behaviour: Behaviour,
    rng: random.Random,
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Serve one request through ``app`` as ``behaviour`` says."""
    delay_ms = behaviour.delay_ms + rng.uniform(0, behaviour.jitter_ms)
    if delay_ms:
        await asyncio.sleep(delay_ms / 1000)
    if behaviour.hang:
        await _until_disconnect(receive)
    elif behaviour.drop:
        await _drop_connection(receive, reset=behaviour.drop == "reset")
    elif behaviour.status:
        await send_json(send, behaviour.status, error_body(behaviour.status, "simulated failure"))
    elif rng.random() < behaviour.error_rate:
        await send_json(send, 500, error_body(500, "simulated random failure"))
    elif behaviour.garbage:
        await send_json(send, 200, GARBAGE)
    else:
        await app(scope, receive, send)
