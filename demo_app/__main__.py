"""Run the demo on one machine: ``.venv/bin/python -m demo_app`` (see ``--help``).

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import uvicorn

from .app import create_app
from .commands import python_command
from .config import ConfigError, Settings, Spec, flag, host, int_range
from .faults import Behaviour
from .upstream import UpstreamSimulator, create_upstream_app

__all__ = ["main"]

_WILDCARDS = {"", "0.0.0.0", "::"}

#: Every line the demo logs says when and how bad: a block warning is read next to others.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_config() -> dict[str, Any]:
    """uvicorn's logging, with a time stamp and a level on every line, for every logger.

    loopwatch's block warnings and the demo's upstream failures propagate to the root
    logger; other libraries' INFO lines (httpx logs every request it sends) stay out.
    """
    access = f'{LOG_FORMAT[:-len("%(message)s")]}%(client_addr)s "%(request_line)s" %(status_code)s'
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "default": {"format": LOG_FORMAT},
            "access": {"()": "uvicorn.logging.AccessFormatter", "fmt": access, "use_colors": False},
        },
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default",
                        "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "access",
                       "stream": "ext://sys.stdout"},
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
        "loggers": {
            "uvicorn": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }

# option -> (environment variable, spec, default). A flag wins over its variable.
_OPTIONS: dict[str, tuple[str, Spec[Any], Any]] = {
    "host": ("DEMO_HOST", host(), "127.0.0.1"),
    "port": ("DEMO_PORT", int_range(1, 65535), 8000),
    "upstream_port": ("DEMO_UPSTREAM_PORT", int_range(1, 65535), 8001),
    "loop": (
        "DEMO_LOOP",
        Spec(str, lambda v: v in ("asyncio", "uvloop"), "asyncio or uvloop"),
        "asyncio",
    ),
    "no_upstream": ("DEMO_NO_UPSTREAM", flag(), False),
}


def _typed(option: str) -> Callable[[str], Any]:
    """An argparse ``type`` that reports a bad value the way the environment does."""
    _, spec, _ = _OPTIONS[option]
    flag_name = "--" + option.replace("_", "-")

    def parse(raw: str) -> Any:
        try:
            return spec.from_text(flag_name, raw)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{python_command()} -m demo_app",
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
    add("--host", type=_typed("host"), help="bind address [DEMO_HOST] (default: 127.0.0.1)")
    add("--port", type=_typed("port"), help="the demo's port [DEMO_PORT] (default: 8000)")
    add(
        "--upstream-port",
        type=_typed("upstream_port"),
        help="the simulator's port [DEMO_UPSTREAM_PORT] (default: 8001)",
    )
    add(
        "--loop",
        type=_typed("loop"),
        help="event loop, asyncio or uvloop [DEMO_LOOP] (default: asyncio)",
    )
    add(
        "--no-upstream",
        action="store_const",
        const=True,
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
        help="log every request (off by default: logging is itself blocking I/O)",
    )
    return parser


def _resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """Fill the options not given as flags from the environment, or their defaults."""
    for option, (variable, spec, default) in _OPTIONS.items():
        if getattr(args, option) is None:
            setattr(args, option, spec.from_env(environ, variable, default))


def _url(host: str, port: int) -> str:
    """A URL to reach a server bound to ``host``: a wildcard is reached on loopback."""
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _settings(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    if args.no_upstream:
        if not environ.get("DEMO_UPSTREAM_URL"):
            raise ConfigError("--no-upstream needs DEMO_UPSTREAM_URL: the upstream to call instead")
        return Settings.from_env(environ)
    if environ.get("DEMO_UPSTREAM_URL"):
        raise ConfigError(
            f"DEMO_UPSTREAM_URL={environ['DEMO_UPSTREAM_URL']!r} is set but the built-in"
            " simulator would be called: pass --no-upstream to call DEMO_UPSTREAM_URL, or unset it"
        )
    if args.upstream_port == args.port:
        raise ConfigError(f"--upstream-port={args.upstream_port} is the demo's own port")
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
    lines = [f"loopwatch demo on {demo}", f"  API docs        {demo}/docs"]
    if not args.no_loopwatch:
        # The trailing slashes spare curl the redirect from the mount point.
        lines += [
            f"  live page       {demo}/loopwatch/",
            f"  metrics         {demo}/metrics/",
            f"  block events    {demo}/loopwatch/events/",
        ]
    simulator = "" if args.no_upstream else " (the simulator; its docs at /docs)"
    lines += [
        f"  upstream        {settings.upstream_url}{simulator}",
        "Block the loop, then see where:",
        f"  curl '{demo}/antipatterns/sleep?ms=300'",
        f"  curl {demo}/loopwatch/events/" if not args.no_loopwatch else "",
        "Keep it busy, until Ctrl-C:",
        f"  {python_command()} -m demo_app.load {demo} --duration 0",
    ]
    return "\n".join(line for line in lines if line)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        _resolve(args, env)
        settings = _settings(args, env)
        upstream = None if args.no_upstream else create_upstream_app(Behaviour.from_env(env))
    except ConfigError as exc:
        parser.error(str(exc))
    app = create_app(settings, instrument=not args.no_loopwatch)
    # The demo's Config is built first: it configures uvicorn's logging for both servers.
    config = uvicorn.Config(
        app, host=args.host, port=args.port, loop=args.loop, access_log=args.access_log,
        log_config=log_config(),
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
