"""The repository's rule files, copied for a local Prometheus or vmalert, and their holds capped.

Production holds (``for: 5m``, ``for: 10m``) do not fit in a test or a demo:
:func:`write_rule_files` can cap every alert's ``for:`` at a shorter duration. It edits the
``for:`` lines of the text and nothing else, so it needs no YAML library (the demo's set-up
installs none) and leaves expressions, thresholds, windows, labels, annotations and comments
exactly as they are.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .durations import parse_duration

__all__ = ["RULES_DIR", "cap_alert_holds", "write_rule_files"]

RULES_DIR = Path(__file__).resolve().parent.parent / "prometheus" / "rules"

_RULE_START = re.compile(r"^\s*-\s+(alert|record):")
_FOR_LINE = re.compile(r"^(\s*)for:\s*(\S+)\s*$")


def cap_alert_holds(text: str, cap: str) -> str:
    """``text`` (a rule file) with each alert's ``for:`` longer than ``cap`` set to ``cap``.

    Raises ValueError when a ``for:`` is not on a line of its own in block style (the only
    style this edit understands), rather than leaving a hold unchanged.
    """
    limit = parse_duration(cap)
    kind = None
    out = []
    for line in text.splitlines(keepends=True):
        start = _RULE_START.match(line)
        if start:
            kind = start.group(1)
        m = _FOR_LINE.match(line)
        if m:
            if kind != "alert":
                raise ValueError(f"a for: outside an alerting rule: {line.strip()!r}")
            if parse_duration(m.group(2)) > limit:
                line = f"{m.group(1)}for: {cap}\n"
        elif re.search(r"(^|[\s{,])for:", line) and not line.lstrip().startswith("#"):
            raise ValueError(f"cannot cap a for: written as {line.strip()!r}")
        out.append(line)
    return "".join(out)


def write_rule_files(
    dst: Path, *, alert_for: str | None = None, src: Path = RULES_DIR
) -> list[Path]:
    """Copy the rule files (``*.yml``) to ``dst``; with ``alert_for``, cap every alert's hold."""
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(src.glob("*.yml")):
        out = dst / path.name
        if alert_for is None:
            shutil.copyfile(path, out)
        else:
            out.write_text(
                f"# Generated from {path.name} with every alert's for: capped at {alert_for}.\n"
                + cap_alert_holds(path.read_text(), alert_for)
            )
        written.append(out)
    if not written:
        raise FileNotFoundError(f"no rule files (*.yml) in {src}")
    return written
