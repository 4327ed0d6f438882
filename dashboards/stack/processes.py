"""The processes of a local stack: found, started with a log file each, checked, stopped.

Every process runs in a session (process group) of its own, so that stopping it also stops
what it started (``uvicorn --workers`` forks its workers), and writes stdout and stderr to
``<log_dir>/<name>.log``, which an error quotes when the process dies. Ports come from
:func:`harness.servers.free_port`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from .promapi import wait_for

__all__ = ["ROOT", "Processes", "find_binary", "wait_http"]

ROOT = Path(__file__).resolve().parent.parent.parent

#: binary -> (environment variable that overrides it, Debian package that installs it)
BINARIES = {
    "prometheus": ("PROMETHEUS_BIN", "prometheus"),
    "victoria-metrics": ("VICTORIA_METRICS_BIN", "victoria-metrics"),
    "vmalert": ("VMALERT_BIN", "victoria-metrics"),
    "prometheus-alertmanager": ("ALERTMANAGER_BIN", "prometheus-alertmanager"),
}


def find_binary(name: str) -> str:
    """The path of ``name`` (one of :data:`BINARIES`): its variable, else PATH, else /usr/bin."""
    variable, package = BINARIES[name]
    found = os.environ.get(variable) or shutil.which(name)
    if not found and Path(f"/usr/bin/{name}").exists():
        found = f"/usr/bin/{name}"
    if not found:
        raise FileNotFoundError(
            f"no {name} binary: install the Debian package `{package}` "
            f"(bash scripts/setup.sh --system does) or set {variable}"
        )
    return found


class Processes:
    """The processes one stack started; :meth:`stop_all` stops them, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def spawn(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as ``name`` (a name not running already), in ROOT, with ``env`` added."""
        if name in self.running and self.running[name].poll() is None:
            raise RuntimeError(f"{name} is running already")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env.update(env or {})
        log = open(self.log_path(name), "ab")  # noqa: SIM115 - the child keeps its own fd
        try:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.running[name] = proc
        return proc

    def check_alive(self, name: str) -> None:
        """RuntimeError with the tail of its log if ``name`` has exited."""
        proc = self.running.get(name)
        if proc is not None and proc.poll() is not None:
            log = self.log_path(name).read_text(errors="replace")[-4000:]
            raise RuntimeError(f"{name} exited with status {proc.returncode}; its log:\n{log}")

    def check_all_alive(self) -> None:
        for name in self.running:
            self.check_alive(name)

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """SIGTERM ``name``'s process group; SIGKILL it if it lingers past ``timeout``."""
        proc = self.running.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Workers of a supervisor that died first are still in the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in reversed(list(self.running)):
            self.stop(name)

    def wait_ready(self, name: str, url: str, timeout: float) -> None:
        """Wait until ``url`` answers HTTP (any status), failing at once if ``name`` exits."""

        def ready() -> bool:
            self.check_alive(name)
            return wait_http(url)

        wait_for(ready, timeout=timeout, interval=0.1, what=f"{name} on {url}")


def wait_http(url: str) -> bool:
    """True when ``url`` answers HTTP with any status (one try, 1 s)."""
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        pass  # it answers HTTP: up
    return True
