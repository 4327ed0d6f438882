"""Instructions per request end to end: uvicorn + httptools + the app, under callgrind.

The noise-free counterpart of wrk_overhead.py. Each variant is served by uvicorn (one
worker, httptools, access log off) running under ``valgrind --tool=callgrind``
(``benchmarks/_cg_server.py``); a client outside valgrind sends keep-alive requests over 10
connections. ``GET /_cg/zero`` and ``GET /_cg/dump`` switch counting on and off around
segments of n and 2n requests; the difference divided by n is the server's instructions per
request, everything included: parsing, the event loop, the app, the middleware, loopwatch's
watchdog thread. loopwatch's timers are stretched by ``--time-scale`` as in callgrind.py.
Servers run two at a time (counts do not depend on load).

    python -m benchmarks.callgrind_server [--requests 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.servers import free_port

from ._common import (
    ROOT,
    callgrind_counts,
    command_line,
    http_get,
    log,
    write_result,
)


async def load(port: int, n: int, connections: int = 10) -> None:
    """n keep-alive GETs of /items/1 over ``connections`` connections."""

    async def conn(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(k):
                writer.write(b"GET /items/1 HTTP/1.1\r\nHost: bench\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
        finally:
            writer.close()

    per, extra = divmod(n, connections)
    await asyncio.gather(*(conn(per + (1 if i < extra else 0)) for i in range(connections)))


def serve(variant: str, loop: str, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="lw-cgserver-"))
    port = free_port()
    errfile = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--zero-before=os_getppid", "--dump-before=os_getpgrp",
         f"--callgrind-out-file={out}/cg.%p", sys.executable, "-m", "benchmarks._cg_server",
         variant, loop, str(port), str(args.time_scale)],
        stdout=subprocess.DEVNULL, stderr=errfile, env={**os.environ, "PYTHONHASHSEED": "0"},
        cwd=ROOT)
    t = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                errfile.seek(0)
                raise RuntimeError(errfile.read().decode(errors="replace")[-3000:])
            try:
                asyncio.run(http_get(port, "/items/1", timeout=60))
                break
            except (OSError, asyncio.TimeoutError):
                if time.monotonic() - t > 300:
                    raise RuntimeError(f"{variant}/{loop} did not start under valgrind") from None
                time.sleep(0.5)
        asyncio.run(load(port, args.warmup))
        sizes = [args.requests, 2 * args.requests] * args.repeats
        for n in sizes:
            asyncio.run(http_get(port, "/_cg/zero", timeout=120))
            asyncio.run(load(port, n))
            asyncio.run(http_get(port, "/_cg/dump", timeout=120))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errfile.close()
    try:
        counts = callgrind_counts(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if len(counts) != len(sizes):
        raise RuntimeError(f"{variant}/{loop}: {len(counts)} dumps for {len(sizes)} segments")
    slopes = [(counts[i + 1] - counts[i]) / args.requests for i in range(0, len(counts), 2)]
    res = {"instructions": statistics.median(slopes), "min": min(slopes), "max": max(slopes),
           "valgrind_seconds": time.monotonic() - t}
    log(f"  {loop:8} {variant:20} {res['instructions']:12,.0f} instructions/request "
        f"({res['min']:,.0f}-{res['max']:,.0f}), {res['valgrind_seconds']:.0f} s")
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100, help="short segment; long is 2x")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--variants", default="bare,loopwatch,instrumentator")
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--time-scale", type=float, default=60.0)
    parser.add_argument("--parallel", type=int, default=2, help="servers under valgrind at once")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    log(f"callgrind, end to end through uvicorn: segments of {args.requests} and "
        f"{2 * args.requests} keep-alive requests, {args.repeats} pair(s)")
    jobs = [(v, lp) for lp in args.loops.split(",") for v in args.variants.split(",")]
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {job: pool.submit(serve, *job, args) for job in jobs}
        done = {job: f.result() for job, f in futures.items()}
    results: dict[str, Any] = {"config": vars(args), "loops": {}}
    for loop in args.loops.split(","):
        res = {v: done[(v, loop)] for v in args.variants.split(",")}
        base = res["bare"]["instructions"]
        for v in res.values():
            v["ratio"] = v["instructions"] / base
            v["added"] = v["instructions"] - base
        comps = [res[c]["added"] for c in ("instrumentator", "starlette-exporter") if c in res]
        if comps and "loopwatch" in res:
            res["loopwatch_vs_lightest"] = res["loopwatch"]["added"] / min(comps)
        results["loops"][loop] = res
        log(f"\n{loop}:")
        for v in args.variants.split(","):
            log(f"  {v:20} {res[v]['instructions']:12,.0f} {res[v]['ratio']:8.3f} "
                f"{res[v]['added']:+10,.0f}")
    path = write_result("callgrind_server", results, command_line())
    log(f"\nwritten to {path}")
    return results


if __name__ == "__main__":
    main()
