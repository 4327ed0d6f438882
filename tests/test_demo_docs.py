"""The demo's API docs in a real browser, on a machine with no internet.

``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) must render every operation of the schema from
assets the demo serves itself: the page may ask nothing of any host but the demo's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx

# Imported before any loopwatch monitor starts in this process: Playwright reads
# ``asyncio.events.Handle._run.__code__`` when imported, and loopwatch's C hook replaces
# ``Handle._run`` with a method that has no ``__code__`` while a monitor runs.
import playwright.sync_api  # noqa: F401
import pytest
from conftest_demo import serve, serve_simulator
from harness.browser import open_page
from prometheus_client import CollectorRegistry

from demo_app import Settings, create_app

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    with serve_simulator() as (upstream_url, _):
        app = create_app(Settings(upstream_url=upstream_url), registry=CollectorRegistry())
        with serve(app, "asyncio") as server:
            yield server.url


def operations(url: str) -> set[tuple[str, str]]:
    schema = httpx.get(f"{url}/openapi.json").json()
    return {(method.upper(), path) for path, item in schema["paths"].items() for method in item}


def test_swagger_ui_renders_every_operation_offline(demo_url: str) -> None:
    expected = operations(demo_url)
    with open_page() as browser:
        browser.page.goto(f"{demo_url}/docs")
        browser.page.wait_for_selector(".opblock", timeout=20_000)
        shown = {
            (block.locator(".opblock-summary-method").inner_text().strip(),
             block.locator(".opblock-summary-path").get_attribute("data-path"))
            for block in browser.page.locator(".opblock").all()
        }
        ARTIFACTS.mkdir(exist_ok=True)
        browser.page.screenshot(path=str(ARTIFACTS / "demo-docs.png"), full_page=True)
        assert browser.external == [], browser.external
        assert browser.page_errors == [], browser.page_errors
    assert shown == expected
    assert any(url.startswith(demo_url) and url.endswith(".js") for url in browser.requests)


def test_redoc_renders_every_operation_offline(demo_url: str) -> None:
    expected = operations(demo_url)
    with open_page() as browser:
        browser.page.goto(f"{demo_url}/redoc")
        browser.page.wait_for_selector("[data-section-id^='operation/']", timeout=20_000)
        sections = browser.page.locator("[data-section-id^='operation/']").count()
        text = browser.page.locator("body").inner_text()
        ARTIFACTS.mkdir(exist_ok=True)
        browser.page.screenshot(path=str(ARTIFACTS / "demo-redoc.png"))
        assert browser.external == [], browser.external
        assert browser.page_errors == [], browser.page_errors
    assert sections == len(expected)
    for _, path in expected:
        assert path in text, path
