"""Where loopwatch's per-request cost goes, in instructions counted by callgrind.

Each piece of loopwatch's hot path is run on its own, n and 2n times, between callgrind's
zero and dump markers (see callgrind.py); the difference divided by n is its count per call:

* the whole ``LoopWatchMiddleware`` request path around a minimal ASGI app (no FastAPI),
  against the bare app and against the cheapest possible pass-through middleware, and the
  same request path from its plain Python source (``loopwatch._request``) on the same C step
  timing, which says what compiling it with Cython buys;
* ``LoopWatchMetrics.flush()``, which folds the batched observations into Prometheus, per
  request folded;
* the step hooks: ``Handle._run`` with loopwatch's wrapper (asyncio) and
  ``TimedCoroutine.send`` (uvloop), against the originals, called directly;
* the parts of the request path one by one (``model`` rows re-create a piece of the
  middleware's code; the others call loopwatch's own functions).

It measures the hot path loopwatch runs: the compiled one where it was built; with
``LOOPWATCH_PURE_PYTHON=1`` the pure-Python one.

    python -m benchmarks.breakdown [--n 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any


ZERO, DUMP = "os_getppid", "os_getpgrp"


def child(n: int) -> None:
    from ._inprocess import _scope
    from .bench_apps import PassThrough
    from prometheus_client import CollectorRegistry

    import loopwatch
    from loopwatch import _hooks, _monitor
    from loopwatch._attribution import current_owner
    from loopwatch import _request
    from loopwatch._accel import HOT_PATH, request
    from loopwatch._middleware import LoopWatchMiddleware
    from loopwatch._routes import method_label

    names: list[str] = []

    def segment(name: str, fn: Callable[[int], Any],
                prepare: Callable[[int], Any] | None = None) -> None:
        """Count fn(k) for k = n and 2n; prepare(k), if given, runs first, uncounted."""
        if prepare is not None:
            prepare(n)
        fn(n)  # warm-up (and specialisation)
        for k in (n, 2 * n):
            if prepare is not None:
                prepare(k)
            gc.collect()
            gc.freeze()  # a collection of what is already there is not the segment's cost
            os.getppid()
            fn(k)
            os.getpgrp()
            gc.unfreeze()
            names.append(name)

    class Route:
        path = "/items/{item_id}"

    route = Route()
    start = {"type": "http.response.start", "status": 200,
             "headers": [(b"content-type", b"application/json")]}
    body = {"type": "http.response.body", "body": b'{"item_id":1}'}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = route
        scope["endpoint"] = app  # as Starlette's router sets them
        await send(start)
        await send(body)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    template = _scope("/items/1")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # The middleware starts its monitor on the first request. Its probe, flush, tick and
    # watchdog run on timers and would land in some segments and not in others: they are
    # set so far apart that none fires while this runs, and the watchdog is off. The monitor
    # keeps timing the loop's steps, as the middleware's C request path runs only inside
    # them; the step hooks are measured on their own below, on a monitor of their own.
    _monitor._TICK_SECONDS = 3600.0  # type: ignore[attr-defined]
    middleware = LoopWatchMiddleware(app, registry=CollectorRegistry(), log_blocks=False,
                                     block_threshold=60.0, probe_interval=59.0,
                                     sample_stacks=False)
    passthrough = PassThrough(app)

    async def requests(asgi: Any, k: int) -> None:
        for _ in range(k):
            await asgi(dict(template), receive, send)

    loop.run_until_complete(requests(middleware, 1))
    assert middleware.monitor is not None and middleware.monitor.active
    # A plain ASGI app has no routes for the middleware to read its label from, so nothing
    # caches it: put its (method, endpoint) in the cache, as the first request to a routed
    # endpoint does, so that each request takes the path a routed app's requests take.
    series = middleware.metrics.new_series("GET", "/items/{item_id}")
    middleware._fast[("GET", id(app))] = (app, series.totals, "GET", "/items/{item_id}")
    middleware.metrics.flush()

    paths: list[tuple[str, Any]] = [
        ("app alone", app), ("pass-through middleware", passthrough),
        ("LoopWatchMiddleware request path", middleware)]
    if request is not _request:
        # The plain Python source of the same path, on the same middleware and step timing;
        # its owners are the compiled module's, which the C step timing charges.
        py_path = types.MethodType(_request.RequestPath._serve, middleware)
        _request.new_owner = request.new_owner  # type: ignore[assignment]
        _request.finish = request.finish  # type: ignore[assignment]
        paths.append(("LoopWatchMiddleware request path, its Python source", py_path))
    for name, asgi in paths:
        segment(name, lambda k, a=asgi: loop.run_until_complete(requests(a, k)))
        middleware.metrics.flush()

    async def unflushed(k: int) -> None:
        # Real requests, so the batch holds whatever the middleware records today.
        for _ in range(k):
            await middleware(dict(template), receive, send)

    # A flush folds what each (method, route) gained since the last one: its cost depends on
    # how many routes had requests, not on how many requests. Per request here: k requests
    # to one route, then one flush.
    segment("flush, after k requests to one route", lambda k: middleware.metrics.flush(),
            prepare=lambda k: loop.run_until_complete(unflushed(k)))

    middleware.monitor.stop()

    # -- step hooks, called directly, on a monitor that is active but runs no timers --
    monitor = loopwatch.Monitor(log_blocks=False)
    monitor.active = True
    _hooks.install_handle_hook(loop, monitor)
    handle = asyncio.Handle(lambda: None, (), loop, context=contextvars.copy_context())
    original = _hooks._original_run

    def handle_runs(k: int) -> None:
        run = handle._run
        for _ in range(k):
            run()

    segment("Handle._run, hooked (asyncio step)", handle_runs)
    _hooks.uninstall_handle_hook(loop)
    assert asyncio.events.Handle._run is original
    segment("Handle._run, original", handle_runs)

    @types.coroutine
    def yielder(k: int) -> Any:
        for _ in range(k):
            yield None

    async def stepper(k: int) -> None:
        await yielder(k)

    def sends(k: int, wrap: bool) -> None:
        coro = stepper(k)
        target = _hooks._timed(coro, monitor) if wrap else coro
        step = target.send
        try:
            while True:
                step(None)
        except StopIteration:
            pass

    segment("coroutine.send, in TimedCoroutine (uvloop step)", lambda k: sends(k, True))
    segment("coroutine.send, original", lambda k: sends(k, False))

    # -- a task on uvloop: created by loopwatch's task factory (the coroutine in a
    # TimedCoroutine, get_coro shadowed) and run to its end, against uvloop's own --
    import uvloop

    uv = uvloop.new_event_loop()

    async def nothing() -> None:
        pass

    async def tasks(k: int) -> None:
        create = uv.create_task
        for _ in range(k):
            await create(nothing())

    uv_monitor = loopwatch.Monitor(uv, log_blocks=False, sample_stacks=False,
                                   block_threshold=60.0, probe_interval=59.0)
    uv.run_until_complete(asyncio.sleep(0))
    uv_monitor.start()
    segment("uvloop task, through loopwatch's factory", lambda k: uv.run_until_complete(tasks(k)))
    uv_monitor.stop()
    segment("uvloop task, uvloop's own", lambda k: uv.run_until_complete(tasks(k)))
    uv.close()
    asyncio.set_event_loop(loop)

    # -- the request path, piece by piece --
    scope = dict(template, route=route, endpoint=app)
    routes = middleware._routes

    def new_owner(send_: Any = send) -> Any:  # as the middleware makes one
        return request.new_owner(scope, routes, send_)

    def loop_only(k: int) -> None:
        for _ in range(k):
            pass

    def owner(k: int) -> None:
        for _ in range(k):
            new_owner()

    def ctxvar(k: int) -> None:
        o = new_owner()
        set_, reset = current_owner.set, current_owner.reset
        for _ in range(k):
            reset(set_(o))

    def in_flight(k: int) -> None:  # the middleware's set of requests in flight
        s: Any = set()
        o = new_owner()
        for _ in range(k):
            s.add(o)
            s.discard(o)

    def labels(k: int) -> None:  # what the middleware's cache saves after the first request
        for _ in range(k):
            method_label(scope["method"])
            routes.label(scope)

    fast = middleware._fast
    totals = series.totals

    def series_lookup(k: int) -> None:  # the middleware's cached lookup
        for _ in range(k):
            e = scope.get("endpoint")
            if not scope.get("root_path"):
                entry = fast.get((scope["method"], id(e)))
                assert entry is not None and entry[0] is e

    finisher = new_owner()

    def finish(k: int) -> None:  # the middleware's end of a request (cached totals)
        t0 = time.perf_counter()
        fin = request.finish
        for _ in range(k):
            assert fin(finisher, monitor, t0, fast, scope) is None

    def series_add(k: int) -> None:
        add = totals.add
        for _ in range(k):
            add(200, 0.00012, 0.00005, 0.0)

    def clocks(k: int) -> None:
        c = time.perf_counter
        for _ in range(k):
            c()
            c()
            c()

    async def plain_sends(k: int) -> None:
        for _ in range(k):
            await send(start)
            await send(body)

    async def wrapped_sends(k: int) -> None:  # the owner as the request's send, per request
        for _ in range(k):
            o = new_owner()
            await o(start)
            await o(body)

    async def owner_and_plain_sends(k: int) -> None:  # the owner alone, to subtract
        for _ in range(k):
            new_owner()
            await send(start)
            await send(body)

    for name, fn in (
        ("(empty loop)", loop_only),
        ("request owner", owner),
        ("ContextVar set + reset", ctxvar),
        ("in-flight add + discard (as Python calls)", in_flight),
        ("method_label + route_label (uncached)", labels),
        ("series cache lookup", series_lookup),
        ("Totals.add", series_add),
        ("finish (loop time, cache lookup, add)", finish),
        ("3 x perf_counter()", clocks),
    ):
        segment(name, fn)
    for name, afn in (
        ("2 sends, unwrapped", plain_sends),
        ("owner + 2 sends, unwrapped", owner_and_plain_sends),
        ("owner + 2 sends through the owner", wrapped_sends),
    ):
        segment(name, lambda k, f=afn: loop.run_until_complete(f(k)))
    loop.close()
    print("HOTPATH " + ("compiled" if HOT_PATH == "c" else "pure Python"), flush=True)
    print("SEGMENTS " + json.dumps(names), flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000, help="calls per (short) segment")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.n)
        return {}
    from ._common import ROOT, callgrind_counts, command_line, log, write_result

    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    out = Path(tempfile.mkdtemp(prefix="lw-breakdown-"))
    try:
        cmd = ["valgrind", "--tool=callgrind", f"--zero-before={ZERO}", f"--dump-before={DUMP}",
               f"--callgrind-out-file={out}/cg.%p", sys.executable, "-m", "benchmarks.breakdown",
               "--child", "--n", str(args.n)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONHASHSEED": "0"})
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        hot_path = proc.stdout.split("HOTPATH ", 1)[1].split("\n", 1)[0]
        names = json.loads(proc.stdout.split("SEGMENTS ", 1)[1])
        counts = callgrind_counts(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rows: dict[str, float] = {}
    for i in range(0, len(names), 2):
        rows[names[i]] = (counts[i + 1] - counts[i]) / args.n
    empty = rows.pop("(empty loop)")
    for name in list(rows):
        if name in ("request owner", "ContextVar set + reset",
                    "in-flight add + discard (as Python calls)",
                    "method_label + route_label (uncached)",
                    "series cache lookup", "Totals.add", "3 x perf_counter()",
                    "finish (loop time, cache lookup, add)"):
            rows[name] -= empty
    log(f"instructions per call (callgrind), loopwatch's hot path in {hot_path}:")
    for name, v in rows.items():
        log(f"  {name:50} {v:10,.0f}")
    path = write_result("breakdown", {"config": vars(args), "hot_path": hot_path,
                                      "instructions": rows,
                                      "empty_loop": empty}, command_line())
    log(f"written to {path}")
    return {"instructions": rows, "hot_path": hot_path}


if __name__ == "__main__":
    main()
