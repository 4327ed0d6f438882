"""The hint table on the stacks the watchdog produces (module names of real libraries)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import requests

from loopwatch import Frame
from loopwatch._stacks import MAX_FRAMES
from loopwatch._hints import (
    CPU_HINT, FILE_HINT, HTTPX_SYNC_HINT, PSYCOPG2_HINT, PYMONGO_HINT, REQUESTS_HINT,
    SLEEP_HINT, SOCKET_HINT, SUBPROCESS_HINT, hint_for,
)
from tests.events import of_code
from tests.needs import missing

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


def test_a_transport_write_is_not_file_io() -> None:
    """A block inside asyncio's own non-blocking send (the OS took the CPU away from the
    loop's thread there: seen in CI) gets no hint for blocking file I/O."""
    frames = (lib("asyncio.selector_events", "_SelectorSocketTransport.write"),
              lib("uvicorn.protocols.http.httptools_impl", "RequestResponseCycle.send"))
    lines = ["n = self._sock.send(data)", "self.transport.write(output)"]
    assert hint_for(frames, lines, cpu_bound=False) is None
    assert hint_for((USER,), ["writer.write(data)"], cpu_bound=False) is None  # a stream's
    assert hint_for((USER,), ["log_file.write(line)"], cpu_bound=False) == FILE_HINT


def test_the_loops_and_the_servers_own_lines_get_no_line_hint() -> None:
    """A long step inside asyncio's or the server's own code (decrypting a large TLS record,
    the OS holding the thread in a send), with no code of the user's inside it, has no call
    of the user's to replace: an SSL object's read there is not blocking file I/O."""
    # the stacks as the watchdog takes them: innermost ssl.SSLObject's own Python frame
    reading = (lib("ssl", "SSLObject.read"),
               lib("asyncio.sslproto", "SSLProtocol._do_read__copied"),
               lib("asyncio.sslproto", "SSLProtocol._do_read"),
               lib("asyncio.events", "Handle._run"))
    lines = ["v = self._sslobj.read(len)", "chunk = self._sslobj.read(self.max_size)",
             "self._do_read__copied()"]
    assert hint_for(reading, lines, cpu_bound=False) is None
    assert hint_for(reading, lines, cpu_bound=True) == CPU_HINT
    writing = (lib("ssl", "SSLObject.write"), lib("asyncio.sslproto", "SSLProtocol._do_write"),
               lib("asyncio.sslproto", "SSLProtocol._write_appdata"))
    assert hint_for(writing, ["return self._sslobj.write(data)",
                              "count = self._sslobj.write(data)"], cpu_bound=False) is None
    # the user's own line still counts
    assert hint_for((USER,), ["data = fh.read()"], cpu_bound=False) == FILE_HINT


def test_async_httpx_client_is_not_called_sync() -> None:
    frames = (lib("httpx._client", "AsyncClient.send"), USER)
    assert hint_for(frames, ["x = compute()"], cpu_bound=False) is None


def test_cpu_bound_only_when_nothing_else_matches() -> None:
    assert hint_for((USER,), ["total += i * i"], cpu_bound=True) == CPU_HINT
    assert hint_for((USER,), ["time.sleep(1)"], cpu_bound=True) == SLEEP_HINT
    assert hint_for((USER,), ["total += i * i"], cpu_bound=False) is None


# -- on real stacks ------------------------------------------------------------------------


class _SlowHTTP:
    """A real HTTP server on loopback that answers every request after 200 ms."""

    def __init__(self) -> None:
        import http.server
        import threading
        import time

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(0.2)
                body = b"{}"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _requests_get(url: str) -> None:
    requests.get(url, timeout=5)  # CALL-LINE


def _httpx_get(url: str) -> None:
    httpx.get(url, timeout=5)  # CALL-LINE


def _urlopen(url: str) -> None:
    urllib.request.urlopen(url, timeout=5).read()  # CALL-LINE


@pytest.mark.parametrize(("call", "hint"), [
    (_requests_get, REQUESTS_HINT),
    (_httpx_get, HTTPX_SYNC_HINT),
    (_urlopen, "urllib"),
])
def test_the_hint_names_the_library_the_code_called(run: object, call: object, hint: str) -> None:
    """requests.get blocks deep inside http.client and socket; the hint is the one for
    requests (it was urllib's), and the location is the line that called it."""
    import asyncio

    import loopwatch

    server = _SlowHTTP()
    try:
        async def main() -> loopwatch.Watch:
            async with loopwatch.watch(log_blocks=False) as w:
                async def handler() -> None:
                    call(server.url)  # type: ignore[operator]

                await asyncio.create_task(handler())
            return w

        w = run(main())  # type: ignore[operator]
    finally:
        server.close()
    blocks = of_code(w.blocks)
    assert len(blocks) == 1
    event = blocks[0]
    assert event.stack_status == "sampled"
    assert event.location == _call_line(call), event.frames[:6]
    assert event.hint is not None and (event.hint == hint or hint in event.hint), event.hint


class _SlowTLS:
    """A real TLS server on loopback (a throwaway self-signed certificate) that answers one
    connection's first read after 200 ms."""

    def __init__(self, tmp_path: Path) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            missing("openssl (to make the test server's certificate)")
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        self.cert = str(cert)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

        def serve() -> None:
            conn, _ = self.listener.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                time.sleep(0.2)
                tls.sendall(b"hello")
                tls.recv(1)  # until the client closes

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()

    def connect(self) -> ssl.SSLSocket:
        context = ssl.create_default_context(cafile=self.cert)
        return context.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=5),
                                   server_hostname="localhost")

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


@pytest.mark.parametrize("depth", [1, MAX_FRAMES])
def test_a_blocking_read_of_a_tls_socket_is_a_socket_call(run: object, tmp_path: Path,
                                                          depth: int) -> None:
    """An app (or a library with no rule of its own: smtplib, a sync Redis client over TLS)
    blocked reading a TLS socket: ssl.py's own line, `self._sslobj.read(len)`, is innermost,
    and it is a socket's read, not blocking file I/O -- also when only that frame is kept."""
    import asyncio

    import loopwatch

    server = _SlowTLS(tmp_path)
    tls = server.connect()
    try:
        async def main() -> loopwatch.Watch:
            async with loopwatch.watch(log_blocks=False, stack_depth=depth) as w:
                async def handler() -> None:
                    assert tls.recv(1024) == b"hello"  # CALL-LINE

                await asyncio.create_task(handler())
            return w

        w = run(main())  # type: ignore[operator]
    finally:
        tls.close()
        server.close()
    blocks = of_code(w.blocks)
    assert len(blocks) == 1
    event = blocks[0]
    assert event.stack_status == "sampled"
    assert event.frames[0].module == "ssl", event.frames[:4]
    assert event.hint == SOCKET_HINT, (event.hint, event.frames[:4])
    if depth == MAX_FRAMES:
        assert event.location == _call_line(main), event.frames[:4]


def _call_line(fn: object) -> str:
    """file:line of the line marked ``# CALL-LINE`` in ``fn``'s source."""
    import inspect

    source, first = inspect.getsourcelines(fn)  # type: ignore[arg-type]
    return f"{__file__}:{first + next(i for i, t in enumerate(source) if '# CALL-LINE' in t)}"
