"""A real browser for tests: the system's Chromium driven by Playwright.

Chromium comes from the Debian package (``scripts/setup.sh --system``), Playwright from PyPI
(the ``dev`` extra); Playwright's own browser download is never used. :func:`open_page`
records every request the page makes, so a test can assert that nothing left the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BrowserPage", "chromium_path", "open_page"]

#: Flags for a headless Chromium on a machine without a network or a display (as root in CI).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


def chromium_path() -> str:
    """The system Chromium (``CHROMIUM`` overrides); FileNotFoundError if there is none."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if not found:
        raise FileNotFoundError(
            "no chromium: run `bash scripts/setup.sh --system` (Debian package chromium)")
    return found


@dataclass
class BrowserPage:
    """A page and what it asked for: ``requests`` (every URL), ``external`` (those not on
    loopback, which were refused), ``console_errors`` and ``page_errors``."""

    page: Any
    requests: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def open_page(viewport: tuple[int, int] = (1400, 900)) -> Iterator[BrowserPage]:
    """A fresh headless Chromium page in a new profile. Requests to any host other than
    loopback are refused (and recorded in ``external``)."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="loopwatch-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True,
                viewport={"width": viewport[0], "height": viewport[1]},
            )
            try:
                page = context.pages[0] if context.pages else context.new_page()
                result = BrowserPage(page)

                def route(route: Any) -> None:
                    url = route.request.url
                    result.requests.append(url)
                    parsed = urllib.parse.urlsplit(url)
                    if parsed.scheme in ("http", "https", "ws", "wss") and \
                            parsed.hostname not in _LOCAL_HOSTS:
                        result.external.append(url)
                        route.abort()
                    else:
                        route.continue_()

                context.route("**/*", route)
                page.on("console", lambda m: m.type == "error" and result.console_errors.append(
                    m.text))
                page.on("pageerror", lambda e: result.page_errors.append(str(e)))
                yield result
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
