#!/usr/bin/env python
"""Does loopwatch change asyncio's behaviour? Run CPython's own asyncio test suite with and
without a loopwatch monitor on every event loop, on asyncio and on uvloop, and compare.

    .venv/bin/python scripts/asyncio_semantics.py                  # everything (~15-25 min)
    .venv/bin/python scripts/asyncio_semantics.py --loops asyncio \\
        --modules test_locks,test_queues --json /tmp/semantics.json

The suite is ``test.test_asyncio`` of the Python that runs this script (a project we did
not write). Each of its modules runs in a fresh subprocess under plain ``unittest``, once per
configuration:

* ``asyncio`` / ``uvloop``: with ``uvloop`` the default event-loop policy is uvloop's, so
  every loop the tests get from ``asyncio.new_event_loop()``/``asyncio.run()`` is a uvloop
  loop (tests that build ``SelectorEventLoop`` or the test suite's ``TestLoop`` themselves
  still get those);
* ``off`` / ``on``: with ``on``, ``run_forever`` of every event loop class (asyncio's
  ``BaseEventLoop`` and ``uvloop.Loop``) is wrapped so that a ``loopwatch.Monitor`` with the
  default configuration is started on the loop each time it starts running (unless one
  already runs there) and stopped when it stops -- the way the middleware runs it in a
  server, only thousands of times over. ``run_until_complete`` and ``asyncio.run`` go
  through ``run_forever``, so every test that runs a loop runs it watched.

One exception, on by default: the suite's own ``test_asyncio.utils.TestLoop`` is a loop with
a *fake clock* driven by a generator in the test, which asserts the exact sequence of timer
deadlines the loop asks for. A monitor's lag probe is a timer (``loop.call_at``), so on a
TestLoop it adds deadlines the generator does not expect and the test fails with
``StopIteration`` -- not because behaviour changed but because the test checks the loop's
private timer schedule, on a clock on which lag means nothing. Those loops run unwatched
(their runs are counted in the report); ``--include-test-loop`` watches them too, to see
exactly that.

Every test's outcome (pass, fail, error, skip, expected failure, unexpected success) is
recorded by test id. Outcomes that differ between ``off`` and ``on`` are re-run one test at
a time, ``--reruns`` times in each configuration: a test whose outcome varies within one
configuration is *flaky* (timing-sensitive tests on a busy machine), one that is stable in
each and differs between them is a *difference* -- a change of behaviour caused by
loopwatch. The exit status is 1 if there is any difference, else 0.

The runs are isolated from the network: each worker runs in a new network namespace with
only a loopback interface (``unshare -n``) where that is possible, and in any case with
name resolution and ``connect`` refused for anything but loopback.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTCOMES = ("passed", "failed", "error", "skipped", "xfail", "xpass")
CONFIGS = ("off", "on")


# --------------------------------------------------------------------------------------------
# The worker: runs test ids or modules under unittest in this process, records outcomes.
# --------------------------------------------------------------------------------------------

_LOOPBACK_NAMES = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0", "::", b"localhost",
                   b"127.0.0.1", b"::1", b"0.0.0.0", b"::"}


def _is_local(host: Any) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if isinstance(host, str):
        if host.startswith("127.") or host.startswith("/"):  # loopback or a unix socket path
            return True
        import ipaddress

        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False
    return True  # an int, a tuple we do not understand: let the socket module reject it


def _is_address(host: Any) -> bool:
    import ipaddress

    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    try:
        ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return True


def _guard_network() -> None:
    """Refuse name resolution and connections to anything but loopback (both configs)."""
    import socket

    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        # An address literal needs no name server; connect() below keeps it off the wire.
        if not _is_local(host) and not _is_address(host):
            raise socket.gaierror(socket.EAI_NONAME, f"{host!r}: network disabled for the run")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    for name in ("connect", "connect_ex"):
        real = getattr(socket.socket, name)

        def guarded(self: Any, address: Any, _real: Any = real) -> Any:
            if isinstance(address, tuple) and address and not _is_local(address[0]):
                raise OSError(101, f"{address!r}: network disabled for the run")
            return _real(self, address)

        setattr(socket.socket, name, guarded)


class _Stats:
    monitors = 0
    start_failures = 0
    modes: collections.Counter[str] = collections.Counter()
    busy = 0.0
    probes = 0
    blocks = 0
    internal_errors = 0
    fake_clock_runs = 0


def _instrument(include_test_loop: bool) -> None:
    """Start a loopwatch monitor on every event loop while it runs (see the module doc)."""
    import asyncio

    import loopwatch

    fake_clock: tuple[type, ...] = ()
    if not include_test_loop:
        try:
            from test.test_asyncio.utils import TestLoop

            fake_clock = (TestLoop,)
        except ImportError:
            pass

    config = loopwatch.Config()  # the defaults a production user gets
    classes: list[type] = [asyncio.BaseEventLoop]
    try:
        import uvloop

        classes.append(uvloop.Loop)
    except ImportError:
        pass

    def wrap(cls: type) -> None:
        original = cls.run_forever  # type: ignore[attr-defined]

        def run_forever(self: Any, *args: Any, **kwargs: Any) -> Any:
            monitor = None
            if fake_clock and isinstance(self, fake_clock):
                _Stats.fake_clock_runs += 1
                return original(self, *args, **kwargs)
            try:
                if (not self.is_closed() and not self.is_running()
                        and loopwatch.get_monitor(self) is None):
                    monitor = loopwatch.Monitor(self, config=config).start()
                    _Stats.monitors += 1
                    _Stats.modes[monitor.mode] += 1
            except Exception:  # noqa: BLE001 - counted; the test runs unwatched
                _Stats.start_failures += 1
                monitor = None
            try:
                return original(self, *args, **kwargs)
            finally:
                if monitor is not None:
                    monitor.stop()
                    _Stats.busy += monitor.busy
                    _Stats.probes += monitor.lag_count
                    _Stats.blocks += monitor.block_count
                    _Stats.internal_errors += monitor.internal_errors

        run_forever.__wrapped__ = original  # type: ignore[attr-defined]
        cls.run_forever = run_forever  # type: ignore[attr-defined]

    for cls in classes:
        wrap(cls)


def _use_uvloop() -> None:
    import asyncio

    import uvloop

    # Test modules reset the policy (set_event_loop_policy(None)) in their tearDown; the
    # default they fall back to is looked up as asyncio.DefaultEventLoopPolicy.
    asyncio.DefaultEventLoopPolicy = uvloop.EventLoopPolicy  # type: ignore[misc]
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _worker(args: argparse.Namespace) -> int:
    import faulthandler
    import logging
    import unittest

    faulthandler.enable()
    faulthandler.dump_traceback_later(args.test_timeout, exit=True)
    _guard_network()
    if args.loop == "uvloop":
        _use_uvloop()
    if args.config == "on":
        _instrument(args.include_test_loop)
    # loopwatch logs one WARNING per block on its logger; keep the run's output readable
    # (the records are still created and propagate to any handler a test installs).
    logging.getLogger("loopwatch").addHandler(logging.NullHandler())

    outcomes: dict[str, str] = {}
    details: dict[str, str] = {}

    def record(test: Any, outcome: str, err: Any = None) -> None:
        test_id = test.id() if hasattr(test, "id") else str(test)
        # A subtest failure fails its test; a pass never overrides a failure.
        previous = outcomes.get(test_id)
        if previous in ("failed", "error") and outcome == "passed":
            return
        outcomes[test_id] = outcome
        if err is not None and isinstance(err, tuple):
            details[test_id] = "".join(
                __import__("traceback").format_exception(*err)
            )[-2000:]
        elif isinstance(err, str):
            details[test_id] = err[-2000:]

    class Result(unittest.TextTestResult):
        def addSuccess(self, test: Any) -> None:  # noqa: N802
            super().addSuccess(test)
            record(test, "passed")

        def addFailure(self, test: Any, err: Any) -> None:  # noqa: N802
            super().addFailure(test, err)
            record(test, "failed", err)

        def addError(self, test: Any, err: Any) -> None:  # noqa: N802
            super().addError(test, err)
            record(test, "error", err)

        def addSkip(self, test: Any, reason: str) -> None:  # noqa: N802
            super().addSkip(test, reason)
            record(test, "skipped")

        def addExpectedFailure(self, test: Any, err: Any) -> None:  # noqa: N802
            super().addExpectedFailure(test, err)
            record(test, "xfail")

        def addUnexpectedSuccess(self, test: Any) -> None:  # noqa: N802
            super().addUnexpectedSuccess(test)
            record(test, "xpass")

        def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:  # noqa: N802
            super().addSubTest(test, subtest, err)
            if err is not None:
                kind = "failed" if issubclass(err[0], test.failureException) else "error"
                record(test, kind, err)

    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for name in args.names:
        try:
            suite.addTests(loader.loadTestsFromName(name))
        except unittest.SkipTest:  # a module that skips itself on import (Windows only)
            outcomes[name] = "skipped"
    started = time.monotonic()
    runner = unittest.TextTestRunner(stream=open(os.devnull, "w"), resultclass=Result,
                                     buffer=True, verbosity=0)
    runner.run(suite)
    payload = {
        "loop": args.loop,
        "config": args.config,
        "names": args.names,
        "seconds": time.monotonic() - started,
        "outcomes": outcomes,
        "details": details,
        "instrumentation": {
            "monitors_started": _Stats.monitors,
            "start_failures": _Stats.start_failures,
            "modes": dict(_Stats.modes),
            "busy_seconds": _Stats.busy,
            "probes": _Stats.probes,
            "blocks": _Stats.blocks,
            "internal_errors": _Stats.internal_errors,
            "fake_clock_runs_unwatched": _Stats.fake_clock_runs,
        },
    }
    Path(args.out).write_text(json.dumps(payload))
    # Exit at once: threads or loops a broken test left behind must not hang the worker.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------------------------
# The driver: schedules workers, compares, re-runs differences, prints the comparison.
# --------------------------------------------------------------------------------------------

def all_modules() -> list[str]:
    import test.test_asyncio as package

    folder = Path(package.__file__).parent
    return sorted(p.stem for p in folder.glob("test_*.py"))


def _netns_prefix(use_netns: bool) -> list[str]:
    if not use_netns or not sys.platform.startswith("linux"):
        return []
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        return []
    try:
        # The namespace is only useful if its loopback interface can be brought up.
        probe = subprocess.run([unshare, "-n", ip, "link", "set", "lo", "up"],
                               capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [unshare, "-n"] if probe.returncode == 0 else []


def _run_worker(prefix: list[str], loop: str, config: str, names: list[str],
                args: argparse.Namespace, timeout: float | None = None) -> dict[str, Any]:
    timeout = args.timeout if timeout is None else timeout
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = handle.name
    inner = [sys.executable, __file__, "worker", "--loop", loop, "--config", config,
             "--out", out, "--test-timeout", str(args.test_timeout)]
    if args.include_test_loop:
        inner.append("--include-test-loop")
    inner += names
    if prefix:
        # A new network namespace starts with its loopback interface down.
        script = "ip link set lo up && exec " + " ".join(_quote(a) for a in inner)
        cmd = [*prefix, "sh", "-c", script]
    else:
        cmd = inner
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    for key in list(env):
        if key.startswith("LOOPWATCH_"):
            env.pop(key)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, timeout=timeout, cwd=ROOT)
        crashed = proc.returncode != 0
        tail = (proc.stdout + proc.stderr).decode(errors="replace")[-3000:]
    except subprocess.TimeoutExpired as exc:
        crashed = True
        tail = f"timed out after {timeout} s\n" + ((exc.stdout or b"") + (exc.stderr or b"")
                                                    ).decode(errors="replace")[-3000:]
    try:
        payload: dict[str, Any] = json.loads(Path(out).read_text())
    except (OSError, ValueError):
        payload = {"outcomes": {}, "details": {}, "instrumentation": {}}
        crashed = True
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass
    payload["crashed"] = crashed
    payload["crash_output"] = tail if crashed else ""
    payload["wall"] = time.monotonic() - started
    return payload


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _counts(outcomes: dict[str, str]) -> dict[str, int]:
    counter = collections.Counter(outcomes.values())
    return {k: counter.get(k, 0) for k in OUTCOMES}


def compare(args: argparse.Namespace) -> dict[str, Any]:
    prefix = _netns_prefix(not args.no_netns)
    modules = args.modules or all_modules()
    names = [m if m.startswith("test.") else f"test.test_asyncio.{m}" for m in modules]
    jobs: list[tuple[str, str, str]] = []
    for loop in args.loops:
        for name in names:
            for config in CONFIGS:
                jobs.append((loop, config, name))
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for loop in args.loops:
        for config in CONFIGS:
            results[(loop, config)] = {"outcomes": {}, "instrumentation": collections.Counter(),
                                       "crashes": [], "seconds": 0.0, "details": {}}
    started = time.monotonic()
    log = sys.stderr if not args.quiet else open(os.devnull, "w")
    print(f"running {len(jobs)} jobs ({len(names)} modules x {len(args.loops)} loops x on/off)"
          f" with {args.jobs} at a time; network namespace: {'yes' if prefix else 'no'}",
          file=log, flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_run_worker, prefix, loop, config, [name], args):
                   (loop, config, name)
                   for loop, config, name in jobs}
        for future in concurrent.futures.as_completed(futures):
            loop, config, name = futures[future]
            payload = future.result()
            agg = results[(loop, config)]
            agg["outcomes"].update(payload["outcomes"])
            agg["details"].update(payload.get("details", {}))
            agg["seconds"] += payload["wall"]
            for key, value in payload.get("instrumentation", {}).items():
                if isinstance(value, dict):
                    for k, v in value.items():
                        agg["instrumentation"][f"mode:{k}"] += v
                else:
                    agg["instrumentation"][key] += value
            if payload["crashed"]:
                agg["crashes"].append({"module": name, "output": payload["crash_output"]})
            print(f"  {loop:7} {config:3} {name.rsplit('.', 1)[-1]:28} "
                  f"{sum(1 for _ in payload['outcomes'])} tests in {payload['wall']:.1f} s"
                  + (" CRASHED" if payload["crashed"] else ""), file=log, flush=True)

    report: dict[str, Any] = {"modules": names, "network_namespace": bool(prefix),
                              "python": sys.version.split()[0], "loops": {}}
    for loop in args.loops:
        off, on = results[(loop, "off")], results[(loop, "on")]
        ids = sorted(set(off["outcomes"]) | set(on["outcomes"]))
        differing = [i for i in ids if off["outcomes"].get(i) != on["outcomes"].get(i)]
        reruns: dict[str, dict[str, list[str]]] = {}
        if differing and args.reruns:
            reruns = _rerun(prefix, loop, differing, args)
        flaky, real = [], []
        for test_id in differing:
            seen = reruns.get(test_id)
            if seen is None:
                real.append(test_id)
                continue
            off_set = set(seen["off"]) | {off["outcomes"].get(test_id, "missing")}
            on_set = set(seen["on"]) | {on["outcomes"].get(test_id, "missing")}
            if len(off_set) > 1 or len(on_set) > 1:
                flaky.append(test_id)
            elif off_set != on_set:
                real.append(test_id)
            else:
                flaky.append(test_id)
        report["loops"][loop] = {
            "off": _counts(off["outcomes"]),
            "on": _counts(on["outcomes"]),
            "tests": len(ids),
            "identical_outcomes": len(ids) - len(differing),
            "differing_first_run": [
                {"test": i, "off": off["outcomes"].get(i, "missing"),
                 "on": on["outcomes"].get(i, "missing"),
                 "reruns": reruns.get(i)} for i in differing],
            "flaky": flaky,
            "differences": [
                {"test": i, "off": off["outcomes"].get(i, "missing"),
                 "on": on["outcomes"].get(i, "missing"), "reruns": reruns.get(i),
                 "on_detail": on["details"].get(i, ""), "off_detail": off["details"].get(i, "")}
                for i in real],
            "crashes": {"off": off["crashes"], "on": on["crashes"]},
            "instrumentation": dict(on["instrumentation"]),
            "worker_seconds": {"off": off["seconds"], "on": on["seconds"]},
        }
    report["wall_seconds"] = time.monotonic() - started
    report["identical"] = all(
        not r["differences"] and not r["crashes"]["off"] and not r["crashes"]["on"]
        for r in report["loops"].values())
    return report


def _rerun(prefix: list[str], loop: str, ids: list[str],
           args: argparse.Namespace) -> dict[str, dict[str, list[str]]]:
    """Run the differing tests again, ``args.reruns`` times per configuration: all those of
    one module in one worker, in a fresh process each time."""
    seen: dict[str, dict[str, list[str]]] = {i: {"off": [], "on": []} for i in ids}
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for test_id in ids:
        by_module[".".join(test_id.split(".")[:3])].append(test_id)
    todo = [(batch, config) for batch in by_module.values() for config in CONFIGS
            for _ in range(args.reruns)]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(_run_worker, prefix, loop, config, batch, args): (batch, config)
                   for batch, config in todo}
        for future in concurrent.futures.as_completed(futures):
            batch, config = futures[future]
            payload = future.result()
            for test_id in batch:
                outcome = payload["outcomes"].get(test_id)
                if outcome is None:
                    outcome = "crashed" if payload["crashed"] else "missing"
                seen[test_id][config].append(outcome)
    return seen


def print_report(report: dict[str, Any]) -> None:
    print(f"\nCPython {report['python']} test.test_asyncio, {len(report['modules'])} modules, "
          f"with and without a loopwatch monitor on every event loop "
          f"({report['wall_seconds']:.0f} s)")
    header = f"{'loop':8} {'config':7}" + "".join(f"{k:>9}" for k in OUTCOMES)
    print(header)
    for loop, r in report["loops"].items():
        for config in CONFIGS:
            counts = r[config]
            label = "without" if config == "off" else "with"
            print(f"{loop:8} {label:7}" + "".join(f"{counts[k]:>9}" for k in OUTCOMES))
    for loop, r in report["loops"].items():
        inst = r["instrumentation"]
        print(f"\n{loop}: {r['identical_outcomes']}/{r['tests']} tests had the same outcome "
              f"on the first run; {len(r['flaky'])} flaky; {len(r['differences'])} "
              "differences caused by loopwatch")
        print(f"  instrumentation: {inst.get('monitors_started', 0)} monitors started "
              f"({', '.join(f'{k[5:]}={v}' for k, v in inst.items() if k.startswith('mode:'))})"
              f", {inst.get('start_failures', 0)} failed to start, "
              f"{inst.get('probes', 0)} probes, {inst.get('busy_seconds', 0):.1f} s of loop time "
              f"timed, {inst.get('blocks', 0)} blocks, "
              f"{inst.get('internal_errors', 0)} internal errors; "
              f"{inst.get('fake_clock_runs_unwatched', 0)} runs of the fake-clock TestLoop "
              "left unwatched")
        for item in r["differing_first_run"]:
            kind = "DIFFERENCE" if item["test"] not in r["flaky"] else "flaky"
            print(f"  {kind}: {item['test']}: without={item['off']} with={item['on']}"
                  + (f" reruns={item['reruns']}" if item["reruns"] else ""))
        for config in CONFIGS:
            for crash in r["crashes"][config]:
                print(f"  CRASH ({config}): {crash['module']}\n{crash['output'][-1500:]}")
    print("\nRESULT:", "identical" if report["identical"] else "DIFFERENT")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="(internal) run tests in this process")
    w.add_argument("--loop", choices=("asyncio", "uvloop"), required=True)
    w.add_argument("--config", choices=CONFIGS, required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--test-timeout", type=float, default=900)
    w.add_argument("--include-test-loop", action="store_true")
    w.add_argument("names", nargs="+")

    parser.add_argument("--loops", default="asyncio,uvloop",
                        help="comma-separated: asyncio, uvloop (default: both)")
    parser.add_argument("--modules", default="",
                        help="comma-separated test_asyncio modules (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="workers at a time (default: 2)")
    parser.add_argument("--reruns", type=int, default=3,
                        help="re-runs of each differing test per configuration (default: 3)")
    parser.add_argument("--timeout", type=float, default=1200,
                        help="seconds for one module's worker (default: 1200)")
    parser.add_argument("--test-timeout", type=float, default=900,
                        help="a worker dumps its stack and exits after this long")
    parser.add_argument("--include-test-loop", action="store_true",
                        help="watch the test suite's fake-clock TestLoop too (see the doc)")
    parser.add_argument("--no-netns", action="store_true",
                        help="do not run workers in their own network namespace")
    parser.add_argument("--json", help="also write the full report here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.command == "worker":
        return _worker(args)
    args.loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    for loop in args.loops:
        if loop not in ("asyncio", "uvloop"):
            parser.error(f"invalid --loops entry {loop!r}; allowed: asyncio, uvloop")
    args.modules = [x.strip() for x in args.modules.split(",") if x.strip()]
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    report = compare(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print_report(report)
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
