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
from typing import Any, Literal, TypeVar

import httpx
import pydantic
import requests
from fastapi import HTTPException

__all__ = [
    "UPSTREAM_RESPONSES",
    "ErrorDetail",
    "InvalidUpstreamResponse",
    "UpstreamError",
    "UpstreamResponseTooLarge",
    "describe",
    "json_body",
    "parse",
    "to_http_exception",
    "upstream_errors",
]

M = TypeVar("M", bound=pydantic.BaseModel)


class ErrorDetail(pydantic.BaseModel):
    """What went wrong upstream, in a form a client can branch on."""

    code: Literal[
        "not_found",
        "upstream_timeout",
        "upstream_error",
        "upstream_unreachable",
        "upstream_invalid_response",
        "upstream_response_too_large",
    ] = pydantic.Field(description="Stable: branch on this, not on the message.")
    message: str = pydantic.Field(description="For people; it never names internal hosts.")
    retryable: bool = pydantic.Field(description="Whether the same request may succeed later.")


class UpstreamError(pydantic.BaseModel):
    """The body of every answer the demo gives for an upstream failure (404, 502, 504)."""

    detail: ErrorDetail


#: The answers of a route that calls the upstream, besides its 200 and FastAPI's 422.
UPSTREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {
        "model": UpstreamError,
        "description": "The upstream has no such resource (`not_found`).",
    },
    502: {
        "model": UpstreamError,
        "description": "The upstream failed (`upstream_error`), could not be reached or dropped"
        " the connection (`upstream_unreachable`), or sent a body that is not the expected"
        " JSON (`upstream_invalid_response`) or is too large (`upstream_response_too_large`).",
    },
    504: {
        "model": UpstreamError,
        "description": "The upstream did not answer within the demo's timeout"
        " (`upstream_timeout`).",
    },
}

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


def parse(model: type[M], response: httpx.Response) -> M:
    """The upstream's JSON body as ``model``; a body of another shape is an upstream fault
    (:func:`upstream_errors` answers 502 for its ``pydantic.ValidationError``)."""
    return model.model_validate(json_body(response))


def json_body(response: httpx.Response) -> Any:
    """``response.json()``, with a body that is not JSON reported as an upstream fault."""
    try:
        return response.json()
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise InvalidUpstreamResponse(response) from exc


UpstreamFailure = (
    httpx.HTTPError | InvalidUpstreamResponse | requests.RequestException | pydantic.ValidationError
)
#: What :func:`upstream_errors` maps: failures of either client, or a body of the wrong shape.
_MAPPED = (httpx.HTTPError, InvalidUpstreamResponse, requests.RequestException,
           pydantic.ValidationError)


def _status_of(exc: UpstreamFailure) -> int | None:
    """The upstream's error status, when ``exc`` is an error answer (not a lost one)."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code
    return None


def to_http_exception(exc: UpstreamFailure, resource: str) -> HTTPException:
    """The answer for ``exc``, raised while fetching ``resource`` (e.g. ``"user 7"``).

    ``requests`` failures (the anti-pattern that calls the upstream with it) map the same
    way as httpx's.
    """
    kind = type(exc).__name__
    upstream_status = _status_of(exc)
    if isinstance(exc, (httpx.TimeoutException, requests.Timeout)):
        status, code, retryable = 504, "upstream_timeout", True
        message = f"the upstream service took too long to answer for {resource} ({kind})"
    elif upstream_status == 404:
        status, code, retryable = 404, "not_found", False
        message = f"{resource} not found"
    elif upstream_status is not None:
        status, code = 502, "upstream_error"
        retryable = upstream_status >= 500 or upstream_status == 429
        message = f"the upstream service answered {upstream_status} for {resource}"
    elif isinstance(exc, UpstreamResponseTooLarge):
        status, code, retryable = 502, "upstream_response_too_large", False
        message = f"the upstream service sent a body too large to use for {resource}"
    elif isinstance(
        exc, (InvalidUpstreamResponse, requests.exceptions.InvalidJSONError,
              pydantic.ValidationError)
    ):
        status, code, retryable = 502, "upstream_invalid_response", True
        message = f"the upstream service sent a body that is not the expected JSON for {resource}"
    else:
        status, code, retryable = 502, "upstream_unreachable", True
        message = f"could not reach the upstream service for {resource} ({kind})"
    return HTTPException(status, {"code": code, "message": message, "retryable": retryable})


def describe(exc: UpstreamFailure) -> str:
    """One log line's worth of ``exc``, for the operator (it may name internal URLs)."""
    if isinstance(exc, httpx.HTTPStatusError):  # its str() adds a paragraph of MDN links
        return f"{exc.request.method} {exc.request.url} answered {exc.response.status_code}"
    return f"{type(exc).__name__}: {exc}"


@contextlib.contextmanager
def upstream_errors(resource: str) -> Iterator[None]:
    """Turn upstream failures inside the block into the matching :class:`HTTPException`.

    Only the upstream's data is validated inside these blocks, so a
    ``pydantic.ValidationError`` there is a body of the wrong shape: the upstream's fault.
    """
    try:
        yield
    except _MAPPED as exc:
        logger.warning("upstream failure for %s: %s", resource, describe(exc))
        raise to_http_exception(exc, resource) from exc
