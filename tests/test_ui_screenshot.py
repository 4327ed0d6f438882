"""A screenshot of the live page under load: the demo app (its anti-pattern routes, its
upstream simulator) on a real uvicorn, driven by the demo's load generator, the page open
in the system Chromium the whole time.

The test saves ``test-artifacts/ui-under-load.png``. The README's picture is this run,
longer::

    .venv/bin/python -m tests.test_ui_screenshot --seconds 90 --out docs/img/ui.png
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from pathlib import Path

# Before any monitor starts (see test_ui_browser).
import playwright.sync_api  # noqa: F401
from playwright.sync_api import expect
from prometheus_client import CollectorRegistry

from harness.browser import open_page
from harness.servers import serve_in_thread

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
MIX = [
    ("/data", 4.0), ("/users/7", 3.0), ("/dashboard/1", 3.0), ("/products/3", 1.0),
    ("/antipatterns/sleep?ms=150", 0.6), ("/antipatterns/requests-get?ms=260", 0.35),
    ("/antipatterns/cpu?ms=120", 0.4), ("/antipatterns/file-read?ms=180", 0.3),
    ("/antipatterns/sequential/2", 0.5), ("/antipatterns/sync-def?ms=100", 0.5),
]


def screenshot_under_load(out: Path, seconds: float, loop: str = "asyncio") -> dict[str, int]:
    """Serve the demo with the page mounted, load it for ``seconds``, save the page to
    ``out``; what the page showed: blocks, routes, flame nodes."""
    from demo_app.app import create_app
    from demo_app.config import Settings
    from demo_app.faults import Behaviour
    from demo_app.load import run_load
    from demo_app.upstream import create_upstream_app

    registry = CollectorRegistry()
    with serve_in_thread(create_upstream_app(Behaviour.from_env({})), loop=loop) as upstream:
        settings = Settings.from_env({}, upstream_url=upstream.url)
        app = create_app(settings, registry=registry)  # the page mounted at /loopwatch/
        with serve_in_thread(app, loop=loop) as server, \
                open_page(viewport=(1440, 1000)) as browser:
            page = browser.page
            page.goto(server.url + "/loopwatch/")
            expect(page.locator("#status")).to_have_attribute("data-state", "live")
            stop = threading.Event()

            def load() -> None:
                async def main() -> None:
                    done = asyncio.Event()
                    task = asyncio.create_task(run_load(
                        server.url, MIX, concurrency=8, duration=seconds, stop=done, seed=19,
                        headers=[("X-Sim-Delay-Ms", "40"), ("X-Sim-Jitter-Ms", "30")]))
                    while not task.done() and not stop.is_set():
                        await asyncio.sleep(0.1)
                    done.set()
                    await task

                asyncio.run(main())

            driver = threading.Thread(target=load, name="load")
            driver.start()
            try:
                driver.join(seconds + 60)
            finally:
                stop.set()
                driver.join(30)
            time.sleep(2.5)  # the last blocks, their second's point, the flame graph
            page.locator("table.blocks tbody tr.row").first.click()
            expect(page.locator("table.blocks tbody tr.detail ol.stack").first).to_be_visible()
            page.evaluate("window.scrollTo(0, 0)")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            shown = {
                "blocks": page.locator("table.blocks tbody tr.row").count(),
                "routes": page.locator("#routes tbody tr").count(),
                "flame": page.locator(".flame .node").count(),
            }
        assert browser.external == [], browser.external
        assert browser.page_errors == [], browser.page_errors
        assert browser.console_errors == [], browser.console_errors
    return shown


def test_a_screenshot_under_load() -> None:
    out = ARTIFACTS / "ui-under-load.png"
    shown = screenshot_under_load(out, seconds=8)
    assert shown["blocks"] >= 3 and shown["routes"] >= 6 and shown["flame"] >= 6, shown
    assert out.stat().st_size > 50_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--out", type=Path, default=ARTIFACTS / "ui-under-load.png")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args()
    shown = screenshot_under_load(args.out, args.seconds, args.loop)
    print(f"{args.out}: " + ", ".join(f"{v} {k}" for k, v in shown.items()))


if __name__ == "__main__":
    main()
