"""The README's examples, run exactly as printed: each code block that names its file in its
first line is written to that file and run; its printed output must match what the README
says it prints (numbers may differ, and paths are shortened there)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from harness.otlp import otlp_receiver
from harness.servers import free_port, serve_in_subprocess

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block, in order."""
    return re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), re.S | re.M)


def example(name: str) -> str:
    for language, text in blocks():
        if language == "python" and text.splitlines()[0].split(" ")[:2] == ["#", name]:
            return text
    raise AssertionError(f"README has no example {name}")


def output_after(example_text: str) -> str:
    """The plain block right after an example: what it prints."""
    found = blocks()
    for i, (_, text) in enumerate(found):
        if text == example_text:
            return next(t for lang, t in found[i + 1:] if lang == "")
    raise AssertionError("no output block")


def pattern(line: str) -> str:
    """A printed line as a regex: numbers may differ, paths may be longer."""
    out = re.escape(line)
    out = re.sub(r"\d+(?:\\\.\d+)?", r"\\d+(?:\\.\\d+)?", out)
    return out.replace(re.escape("/srv/"), ".*")


@pytest.mark.parametrize("name", ["app.py", "options.py", "shedding.py"])
def test_the_app_examples_serve_metrics_and_events(tmp_path: Path, loop_kind: str,
                                                   name: str) -> None:
    (tmp_path / name).write_text(example(name))
    port = free_port()
    module = name[:-3]
    with serve_in_subprocess(["-m", "uvicorn", f"{module}:app", "--port", str(port),
                              "--loop", loop_kind], port=port, path="/metrics",
                             env={"PYTHONPATH": str(tmp_path)}, cwd=tmp_path):
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert metrics.status_code == 200
        assert "loopwatch_event_loop_lag_seconds_bucket" in metrics.text
        if name == "shedding.py":  # served, not shed: the loop is idle
            assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"ok": True}
            assert "loopwatch_shedding 0.0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        if name == "app.py":
            events = httpx.get(f"http://127.0.0.1:{port}/loopwatch/events").json()
            assert events["monitoring"] is True and events["events"] == []


def test_the_watch_example_prints_what_the_readme_says(tmp_path: Path) -> None:
    text = example("watch.py")
    (tmp_path / "watch.py").write_text(text)
    proc = subprocess.run([sys.executable, "watch.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    expected = output_after(text).splitlines()
    got = proc.stdout.splitlines()
    assert len(got) == len(expected), (got, expected)
    for line, want in zip(got, expected, strict=True):
        assert re.fullmatch(pattern(want), line), (line, want)


def test_the_pytest_example_fails_with_the_quoted_message(pytester: pytest.Pytester) -> None:
    text = example("tests/test_handler.py")
    pytester.mkdir("tests")
    (pytester.path / "tests" / "test_handler.py").write_text(text)
    result = pytester.runpytest_subprocess("-p", "asyncio", "--asyncio-mode=strict",
                                           "tests/test_handler.py")
    result.assert_outcomes(passed=1, failed=1)  # test_inspect sees its block and passes
    quoted = next(t for lang, t in blocks() if lang == "" and t.startswith("loopwatch: "))
    lines = result.stdout.lines
    for want in quoted.splitlines():
        assert any(re.fullmatch(pattern(want), line) for line in lines), (want, lines[-30:])


def test_the_otel_example_exports_over_otlp_http(tmp_path: Path, loop_kind: str) -> None:
    from tests.test_otel import decode

    (tmp_path / "otel_app.py").write_text(example("otel_app.py"))
    port = free_port()
    with otlp_receiver() as (url, bodies):
        with serve_in_subprocess(["-m", "uvicorn", "otel_app:app", "--port", str(port),
                                  "--loop", loop_kind], port=port, path="/",
                                 env={"PYTHONPATH": str(tmp_path),
                                      "OTEL_EXPORTER_OTLP_ENDPOINT": url,
                                      "OTEL_METRIC_EXPORT_INTERVAL": "300"}, cwd=tmp_path):
            for _ in range(3):
                assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
            deadline = time.monotonic() + 20
            while True:
                metrics = decode(bodies)
                points = metrics.get("http.server.request.duration")
                # The readiness probe and the three requests.
                if points and sum(p.count for p in points.histogram.data_points) >= 4:
                    break
                assert time.monotonic() < deadline, sorted(metrics)
                time.sleep(0.1)
    assert {"loopwatch.event_loop.lag", "loopwatch.event_loop.busy"} <= metrics.keys()
