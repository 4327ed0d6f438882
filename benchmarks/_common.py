"""Shared by the benchmark scripts: the machine, statistics, result files, servers, HTTP.

Nothing here measures anything; each ``benchmarks/*.py`` script imports what it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.servers import serve_in_subprocess, uvicorn_args

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"  # the committed reference results (read only)
OUT = BENCH / "out"  # where benchmarks write
IMG = ROOT / "docs" / "img"

PACKAGES = (
    "fastapi", "starlette", "uvicorn", "uvloop", "httptools", "prometheus_client",
    "prometheus-fastapi-instrumentator", "starlette_exporter", "httpx", "matplotlib",
)


# -- the machine ------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "loopwatch"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty loopwatch/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import loopwatch

    versions["loopwatch"] = f"{loopwatch.__version__} ({git_revision()})"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "python_build": " ".join(platform.python_build()),
        "platform": platform.platform(),
        "packages": versions,
        "loadavg": loadavg(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# -- statistics -------------------------------------------------------------------------

def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles (inclusive method) and range of ``samples``."""
    xs = sorted(samples)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1,
        "min": xs[0], "max": xs[-1], "n": len(xs), "samples": list(samples),
    }


def paired_diff(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Summary of b[i] - a[i]: the difference within each round, which cancels the drift
    that a shared machine puts on both alike."""
    return summary([y - x for x, y in zip(a, b, strict=True)])


# -- result files -----------------------------------------------------------------------

def write_result(name: str, data: dict[str, Any], command: str) -> Path:
    """Write into benchmarks/out/ (not tracked): running a benchmark never changes the
    reference results committed in benchmarks/results/ (copy them there by hand). A result
    the report reads is then read back as its record (``_results``): ``ValueError`` if the
    report could not read it."""
    from ._results import check

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    payload = {"command": command, "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    check(name, path)
    return path


def command(name: str, args: Sequence[str]) -> str:
    """The command that runs benchmark ``name`` with ``args``, as docs and results print it."""
    return " ".join(["python", "-m", f"benchmarks.{name}", *args])


def command_line() -> str:
    """How this benchmark was run, for the report."""
    return command(Path(sys.argv[0]).stem, sys.argv[1:])


# -- servers and HTTP -------------------------------------------------------------------

async def http_get(port: int, path: str, timeout: float | None = 30.0,
                   headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """One GET on a fresh connection to 127.0.0.1:``port``: the status and the body.

    The body is read by its Content-Length, or its chunks, not to the end of the stream: a
    blocked loop sends a response at once but closes the connection only when it next gets a
    turn. ``timeout`` None: no limit of its own (a load generator's request)."""
    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
            length = fields.get("content-length")
            if length:
                body = await reader.readexactly(int(length))
            elif fields.get("transfer-encoding") == "chunked":
                body = await _read_chunks(reader)
            else:
                body = await reader.read()
        finally:
            writer.close()
        return int(head[0].split()[1]), body

    return await (go() if timeout is None else asyncio.wait_for(go(), timeout))


async def _read_chunks(reader: asyncio.StreamReader) -> bytes:
    """A chunked body (RFC 9112, 7.1), without trailers."""
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def http_get_sync(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    return asyncio.run(http_get(port, path, timeout))


def bench_uvicorn_args(app: str, port: int, loop: str, factory: bool = True) -> list[str]:
    """uvicorn, one worker, httptools, access log off, ``app`` as ``benchmarks.<module>:<name>``
    from the repository root."""
    return uvicorn_args(app, port, "--app-dir", str(ROOT), "--http", "httptools",
                        "--no-access-log", "--workers", "1", *(["--factory"] if factory else []),
                        loop=loop)


def server(args: Sequence[str], port: int, env: Mapping[str, str] | None = None,
           ready: str = "/", timeout: float = 30.0,
           ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """``python args`` from the repository root in its own process, yielded once it answers
    ``ready``; stopped on exit (``harness.servers.serve_in_subprocess``, its output in a
    file)."""
    environ: dict[str, str | None] = {"PYTHONPATH": str(ROOT), "PROMETHEUS_MULTIPROC_DIR": None,
                                      **(env or {})}
    return serve_in_subprocess(list(args), port=port, env=environ, timeout=timeout,
                               path=ready, cwd=ROOT, output="file")


def wrk(port: int, path: str, seconds: float, threads: int = 2, connections: int = 50,
        paths: Sequence[str] = ()) -> dict[str, Any]:
    """Run wrk; requests/s and latency percentiles (seconds), parsed from a Lua summary.
    With ``paths``, requests cycle through them instead of ``path``."""
    script = BENCH / "_wrk_report.lua"
    env = {**os.environ, "WRK_PATHS": ",".join(paths)} if paths else None
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s",
         "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout
    for line in out.splitlines():
        if line.startswith("LOOPWATCH_BENCH "):
            data: dict[str, Any] = json.loads(line.split(" ", 1)[1])
            data["latency_p50"] = data.pop("p50_us") / 1e6
            data["latency_p99"] = data.pop("p99_us") / 1e6
            data["latency_mean"] = data.pop("mean_us") / 1e6
            data["latency_p90"] = data.pop("p90_us") / 1e6
            data["latency_max"] = data.pop("max_us") / 1e6
            return data
    raise RuntimeError(f"wrk printed no summary:\n{out}")


def callgrind_events(directory: Path) -> list[dict[str, int]]:
    """Every event counted in each callgrind dump (``cg.<pid>.<n>``) in ``directory``, in the
    order they were dumped: ``Ir`` (instructions), and with ``--cache-sim=yes
    --branch-sim=yes`` the simulated cache misses and mispredicted branches too."""
    dumps = sorted(directory.glob("cg.*.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    counts = []
    for dump in dumps:
        events: list[str] = []
        for line in dump.read_text().splitlines():
            if line.startswith("events:"):
                events = line.split()[1:]
            elif line.startswith("summary:"):
                counts.append(dict(zip(events, map(int, line.split()[1:]), strict=True)))
                break
        else:
            raise RuntimeError(f"no summary in {dump}")
    return counts


def callgrind_counts(directory: Path) -> list[int]:
    """Instructions counted in each callgrind dump in ``directory``, in dump order."""
    return [events["Ir"] for events in callgrind_events(directory)]


def log(*parts: Any) -> None:
    print(*parts, flush=True)
