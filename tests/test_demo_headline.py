"""``python -m benchmarks.headline`` as documented: running it never rewrites a tracked file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_headline_benchmark_writes_where_git_ignores_it() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.headline", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    match = re.search(r"--json JSON\s+default:\s+(\S+)", done.stdout)
    assert match, done.stdout
    default = Path(match[1]).relative_to(ROOT)
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", str(default)],
                             cwd=ROOT, timeout=30)
    assert ignored.returncode == 0, f"{default} is not ignored by git: a run would change it"
