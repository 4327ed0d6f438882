"""Who may see the live page: its token and allow() guard, its arguments, and that it costs
nothing where it is not built."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import loopwatch
from harness.servers import serve_in_thread
from tests.test_ui_support import build

TOKEN = "s3cret-token-0123456789"
PATHS = ["/loopwatch/", "/loopwatch/static/app.js", "/loopwatch/api/state",
         "/loopwatch/api/flame", "/loopwatch/api/collapsed.txt"]


@contextlib.contextmanager
def client_for(**ui: Any) -> Iterator[httpx.Client]:
    with serve_in_thread(build(CollectorRegistry(), ui)) as server, \
            httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def guarded() -> Iterator[httpx.Client]:
    with client_for(token=TOKEN) as client:
        yield client


@pytest.mark.parametrize("path", PATHS)
def test_the_token_is_required_everywhere(guarded: httpx.Client, path: str) -> None:
    refused = guarded.get(path)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert guarded.get(path, headers={"Authorization": "Bearer wrong-token-0123456789"}
                       ).status_code == 401
    assert guarded.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_the_token_in_the_url_becomes_a_cookie(guarded: httpx.Client) -> None:
    assert guarded.get("/loopwatch/", params={"token": "wrong"}).status_code == 401
    opened = guarded.get("/loopwatch/", params={"token": TOKEN})
    assert opened.status_code == 303 and opened.headers["location"] == "/loopwatch/"
    cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/loopwatch/" in cookie
    assert TOKEN not in cookie
    name, _, value = cookie.split(";")[0].partition("=")
    with httpx.Client(base_url=str(guarded.base_url), cookies={name: value}) as browser:
        for path in PATHS:
            assert browser.get(path).status_code == 200, path
    with httpx.Client(base_url=str(guarded.base_url), cookies={name: value[:-1] + "0"}) as forged:
        assert forged.get("/loopwatch/api/state").status_code == 401


def test_allow_decides_for_every_request() -> None:
    def allow(scope: dict[str, Any]) -> bool:
        return (b"x-role", b"admin") in scope["headers"]

    with client_for(allow=allow) as client:
        for path in PATHS:
            assert client.get(path).status_code == 403, path
            assert client.get(path, headers={"X-Role": "admin"}).status_code == 200, path


def test_an_async_allow_and_a_token_both_apply() -> None:
    async def allow(scope: dict[str, Any]) -> bool:
        return scope["client"][0] == "127.0.0.1"

    with client_for(token=TOKEN, allow=allow) as client:
        assert client.get("/loopwatch/api/state").status_code == 401
        ok = client.get("/loopwatch/api/state", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["monitoring"] is True


def test_an_allow_that_raises_refuses(caplog: pytest.LogCaptureFixture) -> None:
    def allow(scope: dict[str, Any]) -> bool:
        raise RuntimeError("the auth service is down")

    with caplog.at_level(logging.ERROR, logger="loopwatch"), client_for(allow=allow) as client:
        assert client.get("/loopwatch/").status_code == 403
    assert "allow() callback raised" in caplog.text


@pytest.mark.parametrize(("option", "value", "allowed"), [
    ("max_events", 0, "an integer from 1 to 1000"),
    ("max_events", 1001, "an integer from 1 to 1000"),
    ("max_events", 10.0, "an integer from 1 to 1000"),
    ("max_events", True, "an integer from 1 to 1000"),
    ("history_seconds", 59, "an integer from 60 to 3600"),
    ("history_seconds", 3601, "an integer from 60 to 3600"),
    ("poll_interval", 0.1, "a number of seconds from 0.5 to 60"),
    ("poll_interval", float("nan"), "a number of seconds from 0.5 to 60"),
    ("poll_interval", "1", "a number of seconds from 0.5 to 60"),
    ("registry", "default", "None or a prometheus_client CollectorRegistry"),
    ("allow", True, "None or a callable taking the ASGI scope"),
    ("token", 12345678901234567, "None or a string of at least 16 printable ASCII"),
])
def test_a_bad_argument_names_itself_its_value_and_what_is_allowed(
        option: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError) as raised:
        loopwatch.ui_app(**{option: value})
    message = str(raised.value)
    assert message.startswith(f"loopwatch: invalid ui_app option {option}={value!r}; allowed: ")
    assert allowed in message


@pytest.mark.parametrize("token", ["short", "with a space in it 1234", "tab\there-0123456789",
                                   "ünïcödé-0123456789"])
def test_a_bad_token_is_refused_without_being_echoed(token: str) -> None:
    with pytest.raises(ValueError) as raised:
        loopwatch.ui_app(token=token)
    assert "token='<hidden>'" in str(raised.value) and token not in str(raised.value)


def test_nothing_runs_until_a_page_is_built() -> None:
    """A process that never calls ui_app() gives its monitors no history sink."""
    script = """
import asyncio, loopwatch
from loopwatch import _monitor

async def main():
    monitor = loopwatch.Monitor().start()
    await asyncio.sleep(0.05)
    before = list(monitor._sinks)
    monitor.stop()
    loopwatch.ui_app(); loopwatch.ui_app(history_seconds=120)
    monitor = loopwatch.Monitor().start()
    await asyncio.sleep(0.05)
    after = [type(s).__name__ for s in monitor._sinks]
    monitor.stop()
    print(len(before), len(_monitor._start_hooks), after)

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["0", "1", "['History']"], out
