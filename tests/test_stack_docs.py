"""Every command docs/sre.md and docs/runbook.md print runs as printed, after the set-up printed
with it.

Commands are the ``$ `` lines of the docs' ``console`` blocks. A set-up line
(``[LOOPWATCH_EXTRAS=x] bash scripts/setup.sh ...``) applies to the commands after it: the SRE
guide's first is ``LOOPWATCH_EXTRAS=demo bash scripts/setup.sh --system``, the demo extra and
the system packages; ``bash scripts/setup.sh`` alone installs the ``dev`` extra. The test does
not install anything; it runs each command with every Python package outside
``loopwatch[<extras>]``'s requirements made unimportable (a ``sitecustomize`` on
``PYTHONPATH``), so a command that needs, say, PyYAML after the demo's set-up fails here as it
would on a machine set up as documented. Each runs in a network namespace of its own (``unshare -n``), so the
documented fixed ports (8000, 9090, ...) never collide with anything else on the machine.
A command marked ``# runs until Ctrl-C`` must come up (print ``data and logs in``) and stop
cleanly on SIGINT; every other must exit 0. The ``pytest`` lines are the suite itself.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.needs import missing

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "docs" / "sre.md", ROOT / "docs" / "runbook.md"]
SETUP = "LOOPWATCH_EXTRAS=demo bash scripts/setup.sh --system"
SETUP_LINE = re.compile(r"(?:LOOPWATCH_EXTRAS=([\w,]+) )?bash scripts/setup\.sh\b.*")
UNTIL_CTRL_C = "# runs until Ctrl-C"


def documented_commands() -> list[tuple[str, str, str]]:
    """(doc, extras of the set-up before it, command) of every ``$ `` line in a ``console``
    block; set-up lines themselves come with the extras they install."""
    out = []
    for doc in DOCS:
        extras = ""
        for block in re.findall(r"^```console\n(.*?)^```", doc.read_text(), re.M | re.S):
            for line in block.splitlines():
                if line.startswith("$ "):
                    command = line[2:].strip()
                    setup = SETUP_LINE.fullmatch(command)
                    if setup:
                        extras = setup.group(1) or "dev"
                    out.append((doc.name, extras, command))
    return out


def installed_by(extras: str) -> set[str]:
    """loopwatch and everything ``pip install -e .[extras]`` installs, by normalized name."""
    names: set[str] = set()
    seen: set[tuple[str, str]] = set()
    todo = [("loopwatch", extra) for extra in extras.split(",")]
    while todo:
        name, extra = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if (key, extra) in seen:
            continue
        seen.add((key, extra))
        names.add(key)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional requirement for another platform
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, e) for e in req.extras or {""}]
    return names


def blocked_modules(extras: str) -> set[str]:
    """Top-level modules that only distributions outside the set-up of ``extras`` provide."""
    wanted = installed_by(extras)
    blocked = set()
    for module, dists in importlib.metadata.packages_distributions().items():
        if not any(re.sub(r"[-_.]+", "-", d).lower() in wanted for d in dists):
            blocked.add(module)
    return blocked - {"_distutils_hack", "pip", "setuptools", "pkg_resources"}


_ENVS: dict[str, dict[str, str]] = {}


def env_after(extras: str, tmp_root: Path) -> dict[str, str]:
    """The environment of a machine set up with ``extras``: everything else unimportable."""
    if extras in _ENVS:
        return _ENVS[extras]
    site = tmp_root / f"site-{extras.replace(',', '-')}"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        f"_BLOCKED = {sorted(blocked_modules(extras))!r}\n"
        "class _NotInstalled:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in _BLOCKED:\n"
        "            raise ModuleNotFoundError(\n"
        "                f'No module named {name!r} (not installed by the documented set-up)',\n"
        "                name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _NotInstalled())\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)
    _ENVS[extras] = env
    return env


@pytest.fixture(scope="module")
def demo_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return env_after("demo", tmp_path_factory.mktemp("envs"))


def in_netns(command: str) -> list[str]:
    if not shutil.which("unshare") or os.geteuid() != 0:
        missing("needs root and unshare(1) for a network namespace of its own")
    return ["unshare", "-n", "bash", "-c", f"ip link set lo up && exec {command}"]


def test_the_docs_print_commands_with_their_set_up() -> None:
    found = documented_commands()
    commands = [c for _, _, c in found]
    assert found[0][2] == SETUP, "docs/sre.md must print the set-up its commands need first"
    assert not [c for c in commands if re.match(r"python3? ", c)], (
        "bare `python` is not the venv's: print .venv/bin/python"
    )
    assert any("dashboards.stack.fleet" in c for c in commands)
    assert any("--alert-for" in c for c in commands)


def test_the_blocker_blocks_what_the_set_up_does_not_install(demo_env: dict[str, str]) -> None:
    """Control: under the blocker, PyYAML (dev extra only) is missing and the demo's deps are not."""
    run = [sys.executable, "-c", "import yaml"]
    result = subprocess.run(run, env=demo_env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "not installed by the documented set-up" in result.stderr
    run = [sys.executable, "-c", "import uvicorn, fastapi, httpx, prometheus_client, loopwatch"]
    result = subprocess.run(run, env=demo_env, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def _runnable() -> list[tuple[str, str, str]]:
    """Everything but the set-up lines (this test installs nothing) and the suite's own
    pytest lines (CI runs those)."""
    return [
        (doc, extras, c) for doc, extras, c in documented_commands()
        if not SETUP_LINE.fullmatch(c) and not c.startswith(".venv/bin/python -m pytest")
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("doc", "extras", "command"), _runnable(), ids=[c for _, _, c in _runnable()]
)
def test_documented_command_runs_as_printed(
    doc: str, extras: str, command: str, tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    env = env_after(extras, tmp_path_factory.getbasetemp() / "envs")
    tracked = {p: p.read_bytes() for p in (ROOT / "dashboards").rglob("*.json")}
    out = tmp_path / "out.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            in_netns(command), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if UNTIL_CTRL_C in command:
            deadline = time.monotonic() + 120
            while "data and logs in" not in out.read_text(errors="replace"):
                assert proc.poll() is None, f"{doc}: {command} exited:\n{out.read_text()}"
                assert time.monotonic() < deadline, f"{doc}: {command} never came up"
                time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, f"{doc}: {command} exited {code}:\n{out.read_text()[-4000:]}"
    # A command that writes a tracked file (the dashboard generator) writes what is committed.
    assert {p: p.read_bytes() for p in tracked} == tracked, f"{command} changed a tracked file"
