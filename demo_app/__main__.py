"""Run the demo on one machine: ``python -m demo_app`` (see ``--help``).

The demo and, unless ``--no-upstream``, the upstream simulator run in this process. The
simulator gets its own thread and event loop: the demo's anti-pattern routes block the
demo's loop, and an upstream on that same loop could not answer the very call that is
blocking it.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Mapping, Sequence

import uvicorn

from .app import create_app
from .config import ConfigError, Settings, Spec, flag, int_range
from .faults import Behaviour
from .upstream import UpstreamSimulator, create_upstream_app

__all__ = ["main"]

_PORT = int_range(1, 65535)
_LOOP = Spec(str, lambda v: v in ("asyncio", "uvloop"), "asyncio or uvloop")
_WILDCARDS = {"", "0.0.0.0", "::"}


def _url(host: str, port: int) -> str:
    """A URL to reach a server bound to ``host``: a wildcard is reached on loopback."""
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m demo_app",
        description=(
            "Run the loopwatch demo: the article's FastAPI backend with its anti-patterns,"
            " watched by loopwatch, and an upstream simulator it calls."
        ),
        epilog=(
            "The demo's HTTP client is configured by DEMO_UPSTREAM_URL, DEMO_ANALYTICS_URL,"
            " DEMO_TIMEOUT_SECONDS, DEMO_CONNECT_TIMEOUT_SECONDS, DEMO_MAX_CONNECTIONS and"
            " DEMO_MAX_KEEPALIVE_CONNECTIONS; the simulator's default latency and failures by"
            " SIM_DELAY_MS, SIM_JITTER_MS, SIM_STATUS, SIM_ERROR_RATE, SIM_HANG, SIM_DROP and"
            " SIM_GARBAGE."
        ),
    )
    add = parser.add_argument
    add(
        "--host",
        default=environ.get("DEMO_HOST", "127.0.0.1"),
        help="bind address [DEMO_HOST] (default: %(default)s)",
    )
    add(
        "--port",
        type=int,
        default=_PORT.from_env(environ, "DEMO_PORT", 8000),
        help="the demo's port [DEMO_PORT] (default: %(default)s)",
    )
    add(
        "--upstream-port",
        type=int,
        default=_PORT.from_env(environ, "DEMO_UPSTREAM_PORT", 8001),
        help="the simulator's port [DEMO_UPSTREAM_PORT] (default: %(default)s)",
    )
    add(
        "--loop",
        choices=("asyncio", "uvloop"),
        default=_LOOP.from_env(environ, "DEMO_LOOP", "asyncio"),
        help="event loop implementation [DEMO_LOOP] (default: %(default)s)",
    )
    add(
        "--no-upstream",
        action="store_true",
        default=flag().from_env(environ, "DEMO_NO_UPSTREAM", False),
        help="do not start the simulator; call DEMO_UPSTREAM_URL instead [DEMO_NO_UPSTREAM]",
    )
    add(
        "--no-loopwatch",
        action="store_true",
        help="run without loopwatch, e.g. to measure what it costs",
    )
    add(
        "--access-log",
        action="store_true",
        help="log every request (off: logging is itself blocking I/O)",
    )
    return parser


def _settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    if args.no_upstream:
        if not environ.get("DEMO_UPSTREAM_URL"):
            raise ConfigError("--no-upstream needs DEMO_UPSTREAM_URL: the upstream to call instead")
        return Settings.from_env(environ)
    if environ.get("DEMO_UPSTREAM_URL"):
        raise ConfigError(
            f"DEMO_UPSTREAM_URL={environ['DEMO_UPSTREAM_URL']!r} is set but the built-in simulator"
            " would be called: pass --no-upstream to call DEMO_UPSTREAM_URL, or unset it"
        )
    if args.upstream_port == args.port:
        raise ConfigError(
            f"--upstream-port={args.upstream_port} is the demo's own port: pick another"
        )
    return Settings.from_env(environ, upstream_url=_url(args.host, args.upstream_port))


def _start_simulator(
    app: UpstreamSimulator, host: str, port: int, loop: str
) -> tuple[uvicorn.Server, threading.Thread]:
    # log_config=None: the demo's server has configured uvicorn's loggers already.
    config = uvicorn.Config(app, host=host, port=port, loop=loop, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="upstream-simulator", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit(f"the upstream simulator could not start on {host}:{port} (see above)")
        time.sleep(0.01)
    return server, thread


def _banner(args: argparse.Namespace, settings: Settings) -> str:
    demo = _url(args.host, args.port)
    lines = [f"loopwatch demo on {demo}", f"  API docs            {demo}/docs"]
    if not args.no_loopwatch:
        lines += [
            f"  metrics             {demo}/metrics",
            f"  block events        {demo}/loopwatch/events",
        ]
    upstream = (
        settings.upstream_url
        if args.no_upstream
        else f"{settings.upstream_url} (simulator, docs at /docs)"
    )
    lines += [
        f"  upstream            {upstream}",
        "Block the loop and see where:",
        f"  curl '{demo}/antipatterns/sleep?ms=300'",
        f"  curl {demo}/loopwatch/events"
        if not args.no_loopwatch
        else f"  curl {demo}/dashboard/1",
        f"Load: python -m demo_app.load {demo} --duration 0",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    try:
        parser = _parser(env)
    except ConfigError as exc:
        raise SystemExit(f"python -m demo_app: error: {exc}") from None
    args = parser.parse_args(argv)
    try:
        settings = _settings(args, env)
        upstream = None if args.no_upstream else create_upstream_app(Behaviour.from_env(env))
    except ConfigError as exc:
        parser.error(str(exc))
    app = create_app(settings, instrument=not args.no_loopwatch)
    # The demo's Config is built first: it configures uvicorn's logging for both servers.
    config = uvicorn.Config(
        app, host=args.host, port=args.port, loop=args.loop, access_log=args.access_log
    )
    simulator = (
        None
        if upstream is None
        else _start_simulator(upstream, args.host, args.upstream_port, args.loop)
    )
    print(_banner(args, settings), flush=True)
    try:
        uvicorn.Server(config).run()
    finally:
        if simulator is not None:
            server, thread = simulator
            server.should_exit = True
            thread.join(timeout=5)


if __name__ == "__main__":
    main()
