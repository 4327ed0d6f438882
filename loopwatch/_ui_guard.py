"""Who may see the live page: an optional token and an optional ``allow(scope)`` callback.

The token is accepted as ``Authorization: Bearer <token>`` (scripts, curl) or once in the
page's URL (``/loopwatch/?token=...``), which answers with a cookie scoped to the page's
path and a redirect to the URL without the token; the page and its data requests then
carry the cookie. The cookie holds an HMAC of the token, never the token itself.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

__all__ = ["COOKIE", "Allow", "Guard", "Verdict"]

logger = logging.getLogger("loopwatch")

COOKIE = "loopwatch_ui"
Allow = Callable[[MutableMapping[str, Any]], bool | Awaitable[bool]]
#: "ok"; "token": the token is missing or wrong (401); "denied": allow() said no (403).
Verdict = Literal["ok", "token", "denied"]


class Guard:
    """Checks each request to the page; built once by ``ui_app``."""

    __slots__ = ("_allow", "_cookie", "_token")

    def __init__(self, token: str | None, allow: Allow | None) -> None:
        self._token = token.encode() if token is not None else None
        self._cookie = (
            hmac.new(self._token, b"loopwatch-ui-cookie", hashlib.sha256).hexdigest().encode()
            if self._token is not None else None
        )
        self._allow = allow

    @property
    def has_token(self) -> bool:
        return self._token is not None

    def token_matches(self, offered: str) -> bool:
        return self._token is not None and hmac.compare_digest(offered.encode(), self._token)

    def cookie_header(self, path: str, secure: bool) -> bytes:
        """The ``Set-Cookie`` value that lets this browser in (``path``: the page's root)."""
        assert self._cookie is not None
        flags = "; Secure" if secure else ""
        return (COOKIE.encode() + b"=" + self._cookie
                + f"; Path={path}; HttpOnly; SameSite=Strict{flags}".encode())

    async def check(self, scope: MutableMapping[str, Any], headers: dict[bytes, bytes],
                    ) -> Verdict:
        if self._token is not None and not self._presented(headers):
            return "token"
        allow = self._allow
        if allow is not None:
            try:
                verdict = allow(scope)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
            except Exception:  # noqa: BLE001 - a failing guard refuses, it never lets in
                logger.exception("loopwatch: the live page's allow() callback raised; refused")
                return "denied"
            if not verdict:
                return "denied"
        return "ok"

    def _presented(self, headers: dict[bytes, bytes]) -> bool:
        assert self._token is not None and self._cookie is not None
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer " and hmac.compare_digest(
                authorization[7:].strip(), self._token):
            return True
        for part in headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name == COOKIE.encode() and hmac.compare_digest(value, self._cookie):
                return True
        return False
