"""Transparency: with the middleware, every response is byte-identical to the one without it.

Two uvicorn servers (asyncio and uvloop) serve the same corpus app (tests/apps/hardening_app),
one with loopwatch and one without; each request is sent over a raw socket and the raw HTTP
bytes that come back (status line, headers in order, framing, body) are compared, with only
the ``date`` header left out. tests/test_middleware.py compares a few parsed responses; this
file covers the rest of the corpus at the byte level, WebSockets in detail and what the app
sees when a client disconnects mid-stream.

Then property-based tests: schemathesis generates requests from the demo's OpenAPI schema
(no generated input may cause a 5xx), and hypothesis generates raw requests for loopwatch's
own ASGI apps (``metrics_app``, ``events_app``) and the middleware (none may raise or 500).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import loopwatch
from loopwatch._metrics import metrics_for
from tests.apps import hardening_app
from harness.servers import RunningServer, serve_in_thread


def find_middleware(app: Any) -> loopwatch.LoopWatchMiddleware:
    """The LoopWatchMiddleware instance inside a started Starlette/FastAPI app."""
    node = app.middleware_stack
    while node is not None:
        if isinstance(node, loopwatch.LoopWatchMiddleware):
            return node
        node = getattr(node, "app", None)
    raise AssertionError("no LoopWatchMiddleware in the app's middleware stack")


@dataclass
class Pair:
    on: RunningServer
    off: RunningServer
    on_app: Any
    off_app: Any
    registry: CollectorRegistry


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    registry = CollectorRegistry()
    on_app = hardening_app.build_corpus(registry)
    off_app = hardening_app.build_corpus(None, instrument=False)
    with serve_in_thread(on_app, loop=request.param) as on, \
            serve_in_thread(off_app, loop=request.param) as off:
        yield Pair(on, off, on_app, off_app, registry)


def raw_exchange(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send ``request`` as is and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def normalized(raw: bytes) -> bytes:
    """The raw response(s) without the ``date`` header lines (the only expected difference)."""
    return b"\r\n".join(line for line in raw.split(b"\r\n")
                        if not line.lower().startswith(b"date: "))


def req(method: str, target: str, *headers: str, body: bytes = b"",
        version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", "Host: 127.0.0.1", *headers]
    if body and not any(h.lower().startswith(("content-length", "transfer-encoding"))
                        for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    if not any(h.lower().startswith("connection") for h in headers):
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chunked(body: bytes, size: int = 1000) -> bytes:
    out = b""
    for i in range(0, len(body), size):
        piece = body[i:i + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\n\r\n"


ETAG_PROBE = req("GET", "/static/hello.txt")
BIG_BODY = bytes(range(256)) * 4096
CORPUS: dict[str, bytes] = {
    "json": req("GET", "/json"),
    "json-query": req("GET", "/json?secret=1&x=%20y"),
    "json-big": req("GET", "/json/big", "Accept-Encoding: gzip"),
    "head-json": req("HEAD", "/json"),
    "post-201": req("POST", "/items", "Content-Type: application/json",
                    body=b'{"name": "n", "price": 1.5, "tags": ["a"]}'),
    "post-422-syntax": req("POST", "/items", "Content-Type: application/json",
                           body=b'{"name": '),
    "post-422-fields": req("POST", "/items", "Content-Type: application/json", body=b"{}"),
    "query-422": req("GET", "/sleep?ms=abc"),
    "echo-1mb": req("POST", "/echo", "Content-Type: application/octet-stream", body=BIG_BODY),
    "echo-chunked": req("POST", "/echo", "Transfer-Encoding: chunked",
                        body=_chunked(b"chunked body " * 500)),
    "echo-expect-100": req("POST", "/echo", "Expect: 100-continue", body=b"x" * 5000),
    "lifespan-state": req("GET", "/state"),
    "cookies-multi-headers": req("GET", "/cookies"),
    "204": req("GET", "/empty"),
    "stream": req("GET", "/stream"),
    "stream-http10": req("GET", "/stream", version="HTTP/1.0"),
    "stream-fails-mid-body": req("GET", "/stream/fail"),
    "file": req("GET", "/file"),
    "head-file": req("HEAD", "/file"),
    "file-range": req("GET", "/file", "Range: bytes=100-199"),
    "file-range-bad": req("GET", "/file", "Range: bytes=9999999-"),
    "file-attachment": req("GET", "/file/text"),
    "static": req("GET", "/static/hello.txt"),
    "static-head": req("HEAD", "/static/hello.txt"),
    "static-404": req("GET", "/static/missing.txt"),
    "static-traversal": req("GET", "/static/../hardening_app.py"),
    "redirect-301": req("GET", "/redirect/301"),
    "redirect-302": req("GET", "/redirect/302"),
    "redirect-307": req("GET", "/redirect/307"),
    "redirect-308": req("GET", "/redirect/308"),
    "redirect-slash": req("GET", "/json/"),
    "404": req("GET", "/nowhere/at/all?secret=1"),
    "405-delete": req("DELETE", "/json"),
    "405-options": req("OPTIONS", "/json"),
    "405-unknown-method": req("PROPFIND", "/json"),
    "418": req("GET", "/status/418"),
    "503": req("GET", "/status/503"),
    "500": req("GET", "/boom"),
    "keep-alive-pipelined": req("GET", "/json", "Connection: keep-alive")
    + req("GET", "/stream", "Connection: keep-alive") + req("GET", "/nowhere"),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_raw_responses_are_byte_identical(pair: Pair, name: str) -> None:
    request = CORPUS[name]
    with_mw = raw_exchange(pair.on.port, request)
    without = raw_exchange(pair.off.port, request)
    assert with_mw, "no response at all"
    assert normalized(with_mw) == normalized(without)


def test_conditional_static_request_304_is_identical(pair: Pair) -> None:
    first = raw_exchange(pair.off.port, ETAG_PROBE)
    etag = next(line.split(b": ", 1)[1] for line in first.split(b"\r\n")
                if line.lower().startswith(b"etag: "))
    request = req("GET", "/static/hello.txt", f"If-None-Match: {etag.decode()}")
    with_mw = raw_exchange(pair.on.port, request)
    assert with_mw.startswith(b"HTTP/1.1 304")
    assert normalized(with_mw) == normalized(raw_exchange(pair.off.port, request))


def test_every_corpus_request_is_recorded_once(pair: Pair) -> None:
    """The corpus went through the instrumented server: loopwatch recorded each HTTP request
    once (pipelined ones included), whatever its outcome, and nothing stays in flight."""
    registry = pair.registry
    before = _requests_total(registry)
    for name in ("json", "500", "stream-fails-mid-body", "keep-alive-pipelined", "404"):
        raw_exchange(pair.on.port, CORPUS[name])
    deadline = time.monotonic() + 5
    while _requests_total(registry) < before + 7:
        assert time.monotonic() < deadline, (before, _requests_total(registry))
        time.sleep(0.02)
    time.sleep(0.1)
    assert _requests_total(registry) == before + 7
    assert not find_middleware(pair.on_app)._in_flight


def _requests_total(registry: CollectorRegistry) -> float:
    metrics_for(registry).flush()
    return sum(s.value for f in registry.collect() for s in f.samples
               if s.name == "loopwatch_requests_total")


# -- WebSockets ---------------------------------------------------------------------------------


def _ws_session(url: str) -> dict[str, Any]:
    import websockets.sync.client as ws_client
    from websockets.exceptions import ConnectionClosed

    out: dict[str, Any] = {}
    with ws_client.connect(url + "/ws", open_timeout=10) as ws:
        headers = ws.response.headers
        out["handshake"] = (ws.response.status_code, sorted(
            (k.lower(), v) for k, v in headers.raw_items()
            if k.lower() not in ("date", "sec-websocket-accept")))
        replies = []
        for message in ["hello", b"\x00\x01binary", "ünïcödé ✓", "x" * 70_000]:
            ws.send(message)
            replies.append(ws.recv(timeout=10))
        out["replies"] = replies
        ws.send("close")
        try:
            ws.recv(timeout=10)
        except ConnectionClosed as exc:
            out["close"] = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else None
    return out


def _ws_rejected(url: str) -> tuple[int, bytes]:
    import websockets.sync.client as ws_client
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        ws_client.connect(url + "/ws/reject", open_timeout=10)
    response = info.value.response
    return response.status_code, response.body or b""


def test_websocket_echo_close_and_reject_are_identical(pair: Pair) -> None:
    on = pair.on.url.replace("http", "ws")
    off = pair.off.url.replace("http", "ws")
    session = _ws_session(on)
    assert session["replies"][0] == "echo:hello"
    assert session["close"] == (4001, "asked to")
    assert session == _ws_session(off)
    rejected = _ws_rejected(on)
    assert rejected[0] == 403
    assert rejected == _ws_rejected(off)
    # WebSockets pass through: not counted as HTTP requests.
    metrics_for(pair.registry).flush()
    assert pair.registry.get_sample_value(
        "loopwatch_requests_total", {"method": "GET", "route": "/ws", "status": "101"}) is None


def test_client_disconnect_mid_stream_looks_the_same_to_the_app(pair: Pair) -> None:
    endings = []
    for server, app in ((pair.on, pair.on_app), (pair.off, pair.off_app)):
        seen = len(app.state.stream_endings)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(req("GET", "/disconnect"))
            received = 0
            while received < 64 * 1024:
                data = sock.recv(65536)
                assert data
                received += len(data)
        deadline = time.monotonic() + 10
        while len(app.state.stream_endings) == seen:
            assert time.monotonic() < deadline, "the stream never noticed the disconnect"
            time.sleep(0.01)
        endings.append(app.state.stream_endings[seen:])
    assert endings[0] == endings[1], endings
    assert endings[0][0] != "completed"
    deadline = time.monotonic() + 5
    while find_middleware(pair.on_app)._in_flight:
        assert time.monotonic() < deadline, "the aborted request stays in flight"
        time.sleep(0.01)


# -- property-based: the demo's API (schemathesis) ----------------------------------------------


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    from conftest_demo import serve, serve_simulator

    from demo_app import Settings, create_app

    with serve_simulator("asyncio") as (upstream_url, _):
        app = create_app(Settings(upstream_url=upstream_url, timeout=5, connect_timeout=2),
                         registry=CollectorRegistry())
        with serve(app, "asyncio") as demo:
            yield demo.url


def test_schemathesis_no_generated_input_causes_a_server_error(demo_url: str) -> None:
    """Every operation of the demo's OpenAPI schema (the anti-patterns excluded: they block
    for up to 5 s by design), with inputs generated from the schema and beyond it
    (schemathesis' negative mode): never a 5xx with a healthy upstream."""
    import schemathesis
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{demo_url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.startswith("/antipatterns"):
            continue
        operations += 1
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | \
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)

        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call(base_url=demo_url, timeout=15)
            if response.status_code >= 500:
                failures.append(f"{response.status_code} {case.as_curl_command()}")

        check()
    assert operations == 6  # /data, /users, /dashboard, /resilient, /products, /weather
    assert not failures, failures[:5]


# -- property-based: loopwatch's own ASGI apps and the middleware (hypothesis) -------------------


async def _call(app: Any, method: str, path: str, query: bytes,
                headers: list[tuple[bytes, bytes]]) -> int:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "path": path, "raw_path": path.encode("utf-8", "replace"),
             "query_string": query, "root_path": "", "headers": headers, "scheme": "http",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    assert sent and sent[0]["type"] == "http.response.start"
    return int(sent[0]["status"])


_METHOD = st.sampled_from(["GET", "HEAD", "POST", "DELETE", "get", "PROPFIND", ""]) | st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=12)
_HEADER_VALUE = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_HEADERS = st.lists(st.tuples(
    st.sampled_from([b"accept", b"accept-encoding", b"cookie", b"x-anything", b"host"]),
    _HEADER_VALUE), max_size=4)
_QUERY = st.binary(max_size=40) | st.builds(
    lambda v: b"limit=" + v, st.binary(max_size=8) | st.sampled_from(
        [b"\xb2", b"\xb9", b"1\xb3", b"1" * 5000, b"0", b"1001", b"-1", b"%31"]))


@settings(max_examples=300, deadline=None, database=None)
@given(method=_METHOD, query=_QUERY, headers=_HEADERS)
@example(method="GET", query=b"limit=\xb2", headers=[])  # '²'.isdigit() is True
@example(method="GET", query=b"limit=" + b"9" * 5000, headers=[])  # int() refuses 4301+ digits
def test_events_app_answers_any_request_without_a_server_error(
    method: str, query: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    status = asyncio.run(_call(loopwatch.events_app(), method, "/", query, headers))
    assert status in (200, 405, 422), status


_REGISTRY = CollectorRegistry()
_METRICS_APP = loopwatch.metrics_app(_REGISTRY)
metrics_for(_REGISTRY)  # the registry has loopwatch's metrics


@settings(max_examples=150, deadline=None, database=None)
@given(method=_METHOD, query=st.binary(max_size=40), headers=_HEADERS)
def test_metrics_app_answers_any_request_without_a_server_error(
    method: str, query: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    status = asyncio.run(_call(_METRICS_APP, method, "/", query, headers))
    assert status in (200, 405), status


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


_MW_REGISTRY = CollectorRegistry()
_MIDDLEWARE = loopwatch.LoopWatchMiddleware(_ok_app, registry=_MW_REGISTRY)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(method=_METHOD, path=st.text(max_size=60).map(lambda p: "/" + p),
       query=st.binary(max_size=40), headers=_HEADERS)
def test_middleware_passes_any_request_through(
    method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    async def main() -> int:
        status = await _call(_MIDDLEWARE, method, path, query, headers)
        _MIDDLEWARE._stop()  # each example runs on a new loop
        return status

    assert asyncio.run(main()) == 200
    metrics = metrics_for(_MW_REGISTRY)
    metrics.flush()
    for key in metrics._request_children:
        assert key[0] in {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                          "PATCH", "_OTHER"}
        assert key[1] == "<unmatched>"  # never the raw path
