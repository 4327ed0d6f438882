"""Translate upstream failures into answers a client of the demo can act on.

The article's rule: an upstream timeout is *our* 504, an upstream 404 is our 404, any
other upstream failure is a 502. Each answer carries a JSON ``detail`` with a stable
``code``, a ``message`` and whether retrying may help, so a client can branch on it
without parsing prose. Internal URLs and exception text go to the log, not to the
client: they help an operator and leak topology to everybody else.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import httpx
from fastapi import HTTPException

__all__ = [
    "InvalidUpstreamResponse",
    "UpstreamResponseTooLarge",
    "describe",
    "json_body",
    "to_http_exception",
    "upstream_errors",
]

logger = logging.getLogger("demo_app.upstream")


class InvalidUpstreamResponse(Exception):
    """The upstream answered 2xx with a body that is not JSON."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(
            f"{response.request.method} {response.request.url}: body is not valid JSON"
        )
        self.response = response


class UpstreamResponseTooLarge(httpx.TransportError):
    """The upstream's body was larger than the demo accepts (see demo_app.app)."""


def json_body(response: httpx.Response) -> Any:
    """``response.json()``, with a body that is not JSON reported as an upstream fault."""
    try:
        return response.json()
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise InvalidUpstreamResponse(response) from exc


def to_http_exception(
    exc: httpx.HTTPError | InvalidUpstreamResponse, resource: str
) -> HTTPException:
    """The answer for ``exc``, raised while fetching ``resource`` (e.g. ``"user 7"``)."""
    kind = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        status, code, retryable = 504, "upstream_timeout", True
        message = f"the upstream service took too long to answer for {resource} ({kind})"
    elif isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 404:
        status, code, retryable = 404, "not_found", False
        message = f"{resource} not found"
    elif isinstance(exc, httpx.HTTPStatusError):
        upstream_status = exc.response.status_code
        status, code = 502, "upstream_error"
        retryable = upstream_status >= 500 or upstream_status == 429
        message = f"the upstream service answered {upstream_status} for {resource}"
    elif isinstance(exc, UpstreamResponseTooLarge):
        status, code, retryable = 502, "upstream_response_too_large", False
        message = f"the upstream service sent a body too large to use for {resource}"
    elif isinstance(exc, InvalidUpstreamResponse):
        status, code, retryable = 502, "upstream_invalid_response", True
        message = f"the upstream service sent a body that is not JSON for {resource}"
    else:
        status, code, retryable = 502, "upstream_unreachable", True
        message = f"could not reach the upstream service for {resource} ({kind})"
    return HTTPException(status, {"code": code, "message": message, "retryable": retryable})


def describe(exc: httpx.HTTPError | InvalidUpstreamResponse) -> str:
    """One log line's worth of ``exc``, for the operator (it may name internal URLs)."""
    if isinstance(exc, httpx.HTTPStatusError):  # its str() adds a paragraph of MDN links
        return f"{exc.request.method} {exc.request.url} answered {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def upstream_errors(resource: str) -> Iterator[None]:
    """Turn upstream failures inside the block into the matching :class:`HTTPException`."""
    try:
        yield
    except (httpx.HTTPError, InvalidUpstreamResponse) as exc:
        logger.warning("upstream failure for %s: %s", resource, describe(exc))
        raise to_http_exception(exc, resource) from exc
