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

__all__ = ["InvalidUpstreamResponse", "json_body", "to_http_exception", "upstream_errors"]

logger = logging.getLogger("demo_app.upstream")


class InvalidUpstreamResponse(Exception):
    """The upstream answered 2xx with a body that is not JSON."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.request.method} {response.request.url}: body is not valid JSON")
        self.response = response


def json_body(response: httpx.Response) -> Any:
    """``response.json()``, with a body that is not JSON reported as an upstream fault."""
    try:
        return response.json()
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise InvalidUpstreamResponse(response) from exc


def _detail(code: str, message: str, *, retryable: bool) -> dict[str, Any]:
    return {"code": code, "message": message, "retryable": retryable}


def to_http_exception(exc: httpx.HTTPError | InvalidUpstreamResponse, resource: str) -> HTTPException:
    """The answer for ``exc``, raised while fetching ``resource`` (e.g. ``"user 7"``)."""
    if isinstance(exc, httpx.TimeoutException):
        return HTTPException(504, _detail(
            "upstream_timeout",
            f"the upstream service took too long to answer for {resource} ({type(exc).__name__})",
            retryable=True,
        ))
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        if status == 404:
            return HTTPException(404, _detail("not_found", f"{resource} not found", retryable=False))
        return HTTPException(502, _detail(
            "upstream_error",
            f"the upstream service answered {status} for {resource}",
            retryable=status >= 500 or status == 429,
        ))
    if isinstance(exc, InvalidUpstreamResponse):
        return HTTPException(502, _detail(
            "upstream_invalid_response",
            f"the upstream service sent a body that is not JSON for {resource}",
            retryable=True,
        ))
    return HTTPException(502, _detail(
        "upstream_unreachable",
        f"could not reach the upstream service for {resource} ({type(exc).__name__})",
        retryable=True,
    ))


@contextlib.contextmanager
def upstream_errors(resource: str) -> Iterator[None]:
    """Turn upstream failures inside the block into the matching :class:`HTTPException`."""
    try:
        yield
    except (httpx.HTTPError, InvalidUpstreamResponse) as exc:
        logger.warning("upstream failure for %s: %s: %s", resource, type(exc).__name__, exc)
        raise to_http_exception(exc, resource) from exc
