"""The benchmarks' committed reference results read as the typed records the report is built
from (benchmarks/_results.py): a change of format fails here, not in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import _results
from benchmarks._results import RESULTS_READ, Memory, Overhead, Result, read

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: Committed results that the report does not read (printed by their benchmark only).
NOT_READ = {"before_after", "otel_cost"}


@pytest.mark.parametrize("kind", RESULTS_READ, ids=lambda kind: kind.NAME)
def test_each_committed_result_reads_as_its_record(kind: type[Result]) -> None:
    assert isinstance(read(kind, RESULTS / f"{kind.NAME}.json"), kind)


def test_every_committed_result_is_read_by_the_report_or_known_not_to_be() -> None:
    committed = {path.stem for path in RESULTS.glob("*.json")}
    assert committed - NOT_READ == {kind.NAME for kind in RESULTS_READ}


def test_a_missing_field_is_named_with_the_file(tmp_path: Path) -> None:
    data = json.loads((RESULTS / "overhead.json").read_text())
    del data["loops"]["asyncio"]["cpu"]["loopwatch"]["added"]["median"]
    path = tmp_path / "overhead.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"overhead\.json: 1 validation error for Overhead\n"
                                         r"loops\.asyncio\.cpu\.loopwatch\.added\.median\n"
                                         r"  Field required"):
        read(Overhead, path)


def test_a_field_of_the_wrong_type_is_named(tmp_path: Path) -> None:
    data = json.loads((RESULTS / "memory.json").read_text())
    data["samples"][2]["rss"] = "52 MiB"
    path = tmp_path / "memory.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"memory\.json: .*\nsamples\.2\.rss\n  Input should be "
                                         r"a valid integer .*input_value='52 MiB'"):
        read(Memory, path)


def test_load_prefers_this_checkout_s_own_run(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads((RESULTS / "memory.json").read_text())
    data["exposition_bytes"] = 1
    (tmp_path / "memory.json").write_text(json.dumps(data))
    monkeypatch.setattr(_results, "OUT", tmp_path)
    loaded = _results.load(Memory)
    assert loaded is not None and loaded.exposition_bytes == 1
    monkeypatch.setattr(_results, "OUT", tmp_path / "none")
    loaded = _results.load(Memory)
    assert loaded is not None and loaded.exposition_bytes != 1
