"""Multiprocess: ``uvicorn --workers 2`` with ``PROMETHEUS_MULTIPROC_DIR``.

Both workers' metrics are aggregated by whichever worker answers the scrape; the ``livesum``
gauges add up the live workers (the thread-pool limit is 2 x 40 once both have ticked); and
when a worker is killed with SIGKILL and uvicorn's supervisor starts a new one, the counters
keep the dead worker's counts while its ``livesum`` gauges drop out.

prometheus_client keeps one file per process and gauge mode; a dead process's ``live*`` gauge
files are only removed by ``prometheus_client.multiprocess.mark_process_dead(pid)``, which
gunicorn users call from the ``child_exit`` server hook. uvicorn has no such hook, so unless
someone calls it the dead worker's last values stay in every ``livesum`` forever.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.servers import free_port, serve_in_subprocess, uvicorn_args

ROOT = Path(__file__).resolve().parent.parent


class Scrape:
    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(float(s.value) for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env: dict[str, str | None] = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
                                  "PYTHONPATH": str(ROOT)}
    args = uvicorn_args("tests.apps.hardening_app:app", port, "--workers", "2",
                        "--timeout-worker-healthcheck", "2")
    with serve_in_subprocess(args, port=port, env=env, path="/pid", timeout=30):
        yield f"http://127.0.0.1:{port}"


def worker_pids(url: str, want: int = 2, timeout: float = 20, exclude: int | None = None
                ) -> set[int]:
    """PIDs of the workers answering, from fresh connections (the kernel spreads them)."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(pids - {exclude}) < want:
        assert time.monotonic() < deadline, f"only saw workers {pids}"
        try:
            r = httpx.get(url + "/pid", headers={"connection": "close"}, timeout=2)
            pids.add(r.json()["pid"])
        except httpx.HTTPError:
            time.sleep(0.05)
    return pids - {exclude}


def scrape_until(url: str, condition: str, check: object, timeout: float = 8) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        scrape = Scrape(httpx.get(url + "/metrics/", timeout=5).text)
        if check(scrape):  # type: ignore[operator]
            return scrape
        assert time.monotonic() < deadline, f"not within {timeout} s: {condition}"
        time.sleep(0.2)


def test_two_workers_aggregate_and_a_killed_worker_is_accounted_for(workers: str) -> None:
    url = workers
    pids = worker_pids(url)
    limit = "loopwatch_threadpool_threads_limit"
    scrape_until(url, "both workers ticked: limit livesum 80",
                 lambda s: s.value(limit) == 80)
    for _ in range(30):
        assert httpx.get(url + "/json", headers={"connection": "close"}).status_code == 200
    before = scrape_until(url, "30 requests counted",
                          lambda s: s.value("loopwatch_requests_total", route="/json") == 30)
    lag_before = before.value("loopwatch_event_loop_lag_seconds_count")
    assert lag_before > 0

    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    survivors = worker_pids(url, exclude=victim, timeout=20)  # a replacement was started
    assert victim not in survivors and len(survivors) == 2
    # Once the new worker has ticked, two live workers: the gauge is 2 x 40 again, and the
    # counters still hold what the dead worker counted.
    after = scrape_until(url, "the replacement ticked", lambda s: s.value(limit) >= 80)
    time.sleep(1.2)
    after = Scrape(httpx.get(url + "/metrics/", timeout=5).text)
    assert after.value("loopwatch_requests_total", route="/json") == 30
    assert after.value("loopwatch_event_loop_lag_seconds_count") >= lag_before
    assert after.value(limit) == 80, (
        f"{limit} is {after.value(limit)}: the killed worker's livesum gauge is still counted "
        "(nobody called prometheus_client.multiprocess.mark_process_dead for it)")
    assert after.value("loopwatch_threadpool_threads_busy") == 0
