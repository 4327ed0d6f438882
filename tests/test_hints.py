"""The hint table on the stacks the watchdog produces (module names of real libraries)."""

from __future__ import annotations

import pytest

from loopwatch import Frame
from loopwatch._hints import (
    CPU_HINT, FILE_HINT, HTTPX_SYNC_HINT, PSYCOPG2_HINT, PYMONGO_HINT, REQUESTS_HINT,
    SLEEP_HINT, SOCKET_HINT, SUBPROCESS_HINT, hint_for,
)

USER = Frame("/app/routes.py", 10, "handler", "app.routes")


def lib(module: str, function: str = "f") -> Frame:
    return Frame(f"/site-packages/{module.replace('.', '/')}.py", 1, function, module)


@pytest.mark.parametrize(
    ("frames", "line", "hint"),
    [
        ((USER,), "time.sleep(0.2)", SLEEP_HINT),
        ((USER,), "sleep(1)", SLEEP_HINT),
        ((lib("socket"), lib("urllib3.connectionpool"), lib("requests.api"), USER), "", REQUESTS_HINT),
        ((lib("ssl"), lib("httpx._transports.default"), lib("httpx._client", "Client.send"), USER),
         "", HTTPX_SYNC_HINT),
        ((lib("httpx._client", "Client.get"), lib("httpx._api", "get"), USER), "", HTTPX_SYNC_HINT),
        ((lib("subprocess", "Popen._wait"), lib("subprocess", "run"), USER), "", SUBPROCESS_HINT),
        ((lib("pymongo.network"), lib("pymongo.collection"), USER), "", PYMONGO_HINT),
        ((lib("psycopg2.extras", "RealDictCursor.execute"), USER), "", PSYCOPG2_HINT),
        ((USER,), "data = open(path).read()", FILE_HINT),
        ((USER,), "conn.recv(4096)", SOCKET_HINT),
        ((lib("socket", "create_connection"), USER), "", SOCKET_HINT),
    ],
)
def test_known_blocking_calls(frames: tuple[Frame, ...], line: str, hint: str) -> None:
    lines = [line] if line else []
    assert hint_for(frames, lines, cpu_bound=False) == hint


def test_async_httpx_client_is_not_called_sync() -> None:
    frames = (lib("httpx._client", "AsyncClient.send"), USER)
    assert hint_for(frames, ["x = compute()"], cpu_bound=False) is None


def test_cpu_bound_only_when_nothing_else_matches() -> None:
    assert hint_for((USER,), ["total += i * i"], cpu_bound=True) == CPU_HINT
    assert hint_for((USER,), ["time.sleep(1)"], cpu_bound=True) == SLEEP_HINT
    assert hint_for((USER,), ["total += i * i"], cpu_bound=False) is None
