"""Lag-aware admission (``LoopWatchMiddleware(admission=loopwatch.Admission(...))``): its
limits, its hysteresis, and a real server under wrk with a CPU hog on its loop."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import loopwatch
from harness.servers import free_port, serve_in_subprocess, uvicorn_args
from loopwatch import _admission
from tests.apps.shedding import WINDOW
from tests.needs import missing

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("options", "message"), [
    ({}, "Admission needs max_lag (seconds) or max_utilization"),
    ({"max_lag": 0}, "invalid Admission max_lag=0; allowed: a number of seconds > 0 and <= 60"),
    ({"max_lag": "50ms"}, "invalid Admission max_lag='50ms'"),
    ({"max_utilization": 1.5}, "invalid Admission max_utilization=1.5; allowed: a fraction > 0"),
    ({"max_lag": 0.1, "window": 0.01}, "invalid Admission window=0.01; allowed: a number of "
                                       "seconds from 0.1 to 60"),
    ({"max_lag": 0.1, "resume": 0}, "invalid Admission resume=0"),
    ({"max_lag": 0.1, "retry_after": 1.5}, "invalid Admission retry_after=1.5; allowed: whole "
                                           "seconds from 1 to 3600"),
    ({"max_lag": 0.1, "exclude_paths": "/health"}, "invalid Admission exclude_paths='/health'"),
])
def test_bad_limits_name_the_option_and_what_is_allowed(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        loopwatch.Admission(**options)


def test_admission_must_be_an_admission() -> None:
    from starlette.applications import Starlette

    with pytest.raises(ValueError, match="invalid admission=0.1; allowed: None or "
                                         r"loopwatch.Admission\(max_lag=..."):
        loopwatch.LoopWatchMiddleware(Starlette(), admission=0.1)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def probes(shedder: _admission.Shedder, clock: Clock, seconds: float, lag: float,
           busy: float, every: float = 0.01) -> None:
    """Probes every ``every`` seconds for ``seconds``, each ``lag`` late, the loop busy the
    fraction ``busy`` of the time."""
    for _ in range(round(seconds / every)):
        clock.now += every
        shedder.on_probe(lag, busy * every)


def test_sheds_at_the_first_late_probe_and_resumes_after_a_calm_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(_admission, "_clock", clock)
    changes: list[tuple[float, bool, str]] = []
    shedder = _admission.Shedder(loopwatch.Admission(max_lag=0.1, window=1.0),
                                 lambda on, why: changes.append((clock.now, on, why)))
    probes(shedder, clock, 2.0, lag=0.002, busy=0.5)
    assert changes == []
    clock.now += 0.3
    shedder.on_probe(0.3, 0.3)  # a probe 300 ms late: shed now
    assert changes[-1][1:] == (True, "event loop lag 300 ms > max_lag 100 ms")
    started = changes[-1][0]
    # Hovering just under the limit (above resume * limit) keeps shedding: no flapping.
    probes(shedder, clock, 3.0, lag=0.08, busy=0.5)
    assert len(changes) == 1
    probes(shedder, clock, 2.5, lag=0.02, busy=0.5)
    assert [on for _, on, _ in changes] == [True, False]
    assert "largest lag 20 ms" in changes[-1][2]
    # It resumed at the end of the first whole calm window, between 1 and 2 windows later.
    calm_from = started + 3.0
    assert calm_from + 1.0 <= changes[-1][0] <= calm_from + 2.0 + 0.011


def test_utilization_is_judged_per_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(_admission, "_clock", clock)
    changes: list[tuple[float, bool]] = []
    shedder = _admission.Shedder(
        loopwatch.Admission(max_utilization=0.9, window=0.5, resume=0.8),
        lambda on, why: changes.append((clock.now, on)))
    probes(shedder, clock, 1.0, lag=0.001, busy=0.85)
    assert changes == []
    probes(shedder, clock, 0.6, lag=0.001, busy=0.99)  # saturated, no single late probe
    assert [on for _, on in changes] == [True]
    probes(shedder, clock, 1.0, lag=0.001, busy=0.75)  # 0.75 > 0.8 * 0.9: still shedding
    assert [on for _, on in changes] == [True]
    probes(shedder, clock, 1.1, lag=0.001, busy=0.5)
    assert [on for _, on in changes] == [True, False]


# -- a real server, wrk and a CPU hog -------------------------------------------------------

SECONDS = 5  # of load (wrk takes whole seconds)
HOG_AT, HOG_FOR, CHUNK = 1.0, 1.5, 0.08  # the hog holds the loop 2 x max_lag at a time


def run_scenario(loop_kind: str, shed: bool) -> dict[str, Any]:
    """wrk on /fast for SECONDS; a poller sending /fast and /health every 20 ms, timing each;
    at HOG_AT, a task on the server's loop holding it in CHUNK pieces for HOG_FOR s."""
    if shutil.which("wrk") is None:
        missing("wrk is missing: install the Debian package `wrk`")
    port = free_port()
    args = uvicorn_args("tests.apps.shedding:app", port, "--no-access-log", loop=loop_kind)
    env = {"SHED": "1" if shed else "0"}
    with serve_in_subprocess(args, port=port, env=env, cwd=ROOT, path="/health",
                             output="file"):
        base = f"http://127.0.0.1:{port}"
        polled: list[tuple[str, float, float, int, str | None]] = []
        stop = threading.Event()

        def poll() -> None:
            with httpx.Client(base_url=base, timeout=10) as client:
                n = 0
                while not stop.is_set():
                    path = "/health" if n % 5 == 4 else "/fast"
                    n += 1
                    sent = time.time()
                    response = client.get(path)
                    polled.append((path, sent, time.time() - sent, response.status_code,
                                   response.headers.get("retry-after")))
                    time.sleep(0.02)

        # Warm up (a fresh server's first requests, the connections' start), and let any
        # shedding that caused end: the scenario starts at t0.
        subprocess.run(["wrk", "-t1", "-c8", "-d1s", f"{base}/fast"], capture_output=True,
                       check=True, timeout=60)
        time.sleep(3 * WINDOW)
        t0 = time.time()
        wrk = subprocess.Popen(["wrk", "-t1", "-c8", f"-d{SECONDS}s", f"{base}/fast"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(HOG_AT)
        httpx.get(f"{base}/hog", params={"seconds": HOG_FOR, "chunk": CHUNK}, timeout=10)
        out, _ = wrk.communicate(timeout=SECONDS + 30)
        stop.set()
        poller.join(timeout=30)
        time.sleep(0.2)
        report = httpx.get(f"{base}/report", timeout=10).json()
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
    assert wrk.returncode == 0, out.decode(errors="replace")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    return {"polled": polled, "hogs": report["hogs"],
            "changes": [change for change in report["changes"] if change[0] >= t0],
            "samples": samples, "wrk": out.decode(errors="replace")}


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


def test_a_stalled_loop_sheds_new_requests_and_recovers_under_wrk(loop_kind: str) -> None:
    got = run_scenario(loop_kind, shed=True)
    (hog_start, hog_end), = got["hogs"]
    kinds = [("shed" if "shedding new requests" in m else "serve", t) for t, m in got["changes"]]
    assert kinds, "admission never shed"
    assert kinds[0][0] == "shed" and kinds[-1][0] == "serve", got["changes"]
    shed_at, served_at = kinds[0][1], kinds[-1][1]
    # Shedding starts within one window of the hog, and stops within two after it ended
    # (the window the hog ended in, then a calm one), with a probe's slack.
    assert hog_start <= shed_at <= hog_start + WINDOW, (hog_start, shed_at)
    assert hog_end <= served_at <= hog_end + 2 * WINDOW + 0.3, (hog_end, served_at)

    fast = [p for p in got["polled"] if p[0] == "/fast"]
    health = [p for p in got["polled"] if p[0] == "/health"]
    # Before the hog and after the recovery, everything is served. (A request sent just
    # before the hog began but still queued behind wrk's when it did is decided after: it
    # may be shed. So "before" is: answered before the hog began.)
    def relative(requests: list[Any]) -> list[tuple[str, float, float, int]]:
        return [(path, round(sent - hog_start, 3), round(latency, 3), status)
                for path, sent, latency, status, _ in requests]

    not_served = [p for p in fast if p[3] != 200
                  and (p[1] + p[2] < hog_start or p[1] > served_at + 0.1)]
    assert not not_served, (relative(not_served), "shed", shed_at - hog_start,
                            "served", served_at - hog_start)
    # While shedding: /fast answered 503 with Retry-After (the window, rounded up), quickly;
    # /health always served.
    shed = [p for p in fast if p[3] == 503]
    assert len(shed) >= 10, len(shed)
    assert all(retry == "1" for *_, retry in shed)
    # (each answered after the hog began, and sent before the recovery)
    early = [p for p in shed if not hog_start <= p[1] + p[2] or p[1] > served_at + 0.1]
    assert not early, (relative(early), "served", served_at - hog_start)
    assert all(status == 200 for _, _, _, status, _ in health)
    # The admitted requests' latency stays bounded: at most a few hog chunks.
    admitted = [latency for _, _, latency, status, _ in fast if status == 200]
    print(f"\n{loop_kind}: shed {len(shed)} polled, admitted p99 {p99(admitted) * 1e3:.0f} ms, "
          f"shed p50 {sorted(s[2] for s in shed)[len(shed) // 2] * 1e3:.0f} ms, started "
          f"{(shed_at - hog_start) * 1e3:.0f} ms after the hog, resumed "
          f"{(served_at - hog_end) * 1e3:.0f} ms after it")
    assert p99(admitted) <= 8 * CHUNK, p99(admitted)
    samples = got["samples"]
    counted = samples[("loopwatch_requests_shed_total", (("method", "GET"), ("route", "/fast")))]
    assert counted >= len(shed)
    assert samples[("loopwatch_shedding", ())] == 0


def test_admission_is_off_by_default(loop_kind: str) -> None:
    got = run_scenario(loop_kind, shed=False)
    assert got["hogs"] and got["changes"] == []
    assert {p[3] for p in got["polled"]} == {200}
    (hog_start, hog_end), = got["hogs"]
    during = [p[2] for p in got["polled"] if p[0] == "/fast" and hog_start <= p[1] <= hog_end]
    print(f"\n{loop_kind}, admission off: /fast p99 {p99(during) * 1e3:.0f} ms during the hog")
    assert not any(name == "loopwatch_requests_shed_total" for name, _ in got["samples"])


def test_a_shed_request_is_labelled_by_its_route_template() -> None:
    # Shed before routing: the label comes from matching the path against the templates,
    # bounded as every route label (a path matching no route is <unmatched>).
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from loopwatch._routes import RouteIndex

    async def endpoint(request: Any) -> PlainTextResponse:
        return PlainTextResponse("")

    app = Starlette(routes=[
        Route("/users/{user_id}", endpoint),
        Mount("/api", routes=[Route("/items/{item_id:path}", endpoint)]),
    ])
    index = RouteIndex(app)
    index.enter({"type": "http", "app": app, "root_path": ""})
    assert index.template_of("/users/42") == "/users/{user_id}"
    assert index.template_of("/api/items/a/b/c") == "/api/items/{item_id:path}"
    assert {index.template_of(f"/nothing/{n}") for n in range(100)} == {"<unmatched>"}
