"""Real servers on loopback for tests, benchmarks and the stack: uvicorn in a background thread,
or any server in a subprocess, and free ports for them."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


_issued: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A free port on ``host``, never one this process was given before (the kernel may hand
    a just-closed port out again, and two servers started together would collide)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _issued:
            _issued.add(port)
            return port


def uvicorn_args(app: str, port: int, *options: str, loop: str | None = None,
                 log_level: str = "warning") -> list[str]:
    """The arguments of ``python -m uvicorn`` (for :func:`serve_in_subprocess`) that serve
    ``app`` (``"module:attribute"``) on 127.0.0.1:``port``, logging ``log_level`` and up, on
    ``loop`` (uvicorn's choice when None); ``options`` are more of uvicorn's flags."""
    args = ["-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", log_level]
    return args + (["--loop", loop] if loop is not None else []) + list(options)


@dataclass
class RunningServer:
    url: str
    port: int
    server: Any  # uvicorn.Server
    thread: threading.Thread
    loop: Any = field(default=None)


@contextlib.contextmanager
def serve_in_thread(
    app: Any, *, loop: str = "asyncio", lifespan: str = "on", **config: Any
) -> Iterator[RunningServer]:
    """Serve ``app`` with a real uvicorn server on 127.0.0.1 in a background thread.

    ``loop`` is uvicorn's loop setting ("asyncio" or "uvloop"). Yields once the server
    accepts connections; on exit asks the server to stop and joins its thread.
    """
    import uvicorn

    # proto=IPPROTO_TCP, as uvicorn's own sockets: asyncio sets TCP_NODELAY only on
    # sockets whose proto says TCP, and without it keep-alive responses stall ~40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # Keep-alive longer than httpx's pool keeps idle connections (5 s, as uvicorn's default):
    # with equal timeouts a client can reuse a connection just as the server closes it, and
    # the request fails with a ReadError that has nothing to do with the app.
    config.setdefault("timeout_keep_alive", 30)
    cfg = uvicorn.Config(
        app, loop=loop, lifespan=lifespan, log_level="warning", access_log=False, **config
    )
    server = uvicorn.Server(cfg)
    holder: dict[str, Any] = {}

    def run() -> None:
        import asyncio

        if loop == "uvloop":
            import uvloop

            new_loop = uvloop.new_event_loop()
        else:
            new_loop = asyncio.new_event_loop()
        asyncio.set_event_loop(new_loop)
        holder["loop"] = new_loop
        try:
            new_loop.run_until_complete(server.serve(sockets=[sock]))
        finally:
            new_loop.close()

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn server thread died during startup")
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn server did not start within 10 s")
        time.sleep(0.005)
    running = RunningServer(
        url=f"http://127.0.0.1:{port}", port=port, server=server, thread=thread,
        loop=holder.get("loop"),
    )
    try:
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.contextmanager
def serve_in_subprocess(
    args: list[str], *, port: int, env: dict[str, str | None] | None = None,
    timeout: float = 20.0,
    path: str = "/",
    cwd: str | os.PathLike[str] | None = None,
    output: str = "pipe",
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``python args...`` in a subprocess (in ``cwd``) and wait until ``port`` answers
    HTTP on ``path``; stop it on exit.

    ``env`` adds variables to the environment; a value of None removes one. The server's
    output (stdout and stderr) goes to ``proc.stdout`` (``output="pipe"``, for a test that
    reads it), or to a temporary file (``"file"``, for a long run whose output nobody reads
    while it runs: a full pipe would block the server); either is shown if it exits early.
    """
    import httpx

    full_env = dict(os.environ)
    for key, val in (env or {}).items():
        if val is None:
            full_env.pop(key, None)
        else:
            full_env[key] = val
    if output not in ("pipe", "file"):
        raise ValueError(f"output={output!r}; allowed: 'pipe', 'file'")
    log = tempfile.TemporaryFile() if output == "file" else None
    proc = subprocess.Popen(
        [sys.executable, *args], env=full_env, stderr=subprocess.STDOUT, cwd=cwd,
        stdout=subprocess.PIPE if log is None else log,
    )

    def printed() -> str:
        if log is not None:
            log.seek(0)
            return log.read().decode(errors="replace")[-3000:]
        return proc.stdout.read().decode(errors="replace") if proc.stdout else ""

    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early with {proc.returncode}:\n{printed()}")
            try:
                httpx.get(f"http://127.0.0.1:{port}{path}", timeout=0.5)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"server on port {port} did not answer within {timeout} s") from None
                time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not None:
            log.close()
