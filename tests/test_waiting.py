"""Who waited: each request's delay from other code holding the loop
(``loopwatch_request_delayed_seconds``), in process and through a real uvicorn server, on
asyncio and uvloop. The scenarios are in ``tests/apps/waiting.py``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

import loopwatch
from harness.servers import free_port, serve_in_subprocess, uvicorn_args
from loopwatch._metrics import metrics_for
from tests.apps import waiting
from tests.conftest import run_on
from tests.needs import missing

ROOT = Path(__file__).resolve().parent.parent
DELAYED = "loopwatch_request_delayed_seconds"
#: Requests in flight at once in the saturated server.
IN_FLIGHT = 64

#: Each scenario: the requests sent at once; what the first path's requests waited for /slow
#: in all, from the app's timeline; and whether that wait is the client's (charged).
SCENARIOS: dict[str, tuple[list[str], Callable[[Any], float], bool]] = {
    # Five requests asleep; 10 ms later /slow blocks 200 ms: each wakes ~160 ms late.
    "sleepers": ([*["/fast"] * waiting.FAST, "/slow"], lambda t: t.expected_delay(), True),
    # One request asleep in three gather children: it waited once, not three times (its
    # children are the request itself), from its earliest timer.
    "gather": (["/fanout", "/slow?after=3"], lambda t: t.expected_delay([min(t.sleeps)]),
               True),
    # Background tasks sleep after the response was sent: they wait as long as the
    # sleepers do, but no client waits with them, so the requests are charged nothing
    # (their loop time still counts: blocking is the culprit's side).
    "background": ([*["/background"] * waiting.FAST, "/slow"],
                   lambda t: t.expected_delay(), False),
    # As "sleepers", and another thread holds the GIL 15 ms right after the block: the
    # loop's thread stands still between steps, which looks like a pause. The sleepers were
    # due before it all the same: each is charged from its due time to its waking.
    "stalled": ([*["/fast"] * waiting.FAST, "/slow?stall=15"], lambda t: t.woke_late(), True),
}


def _once_recorded(samples: Callable[[], dict[str, float]], name: str, route: str,
                   count: int) -> float:
    """The sum of histogram ``name`` in ``samples()`` (sample name to value), once its count
    reaches ``count`` (within 5 s)."""
    deadline = time.monotonic() + 5
    while (seen := (got := samples()).get(f"{name}_count", 0.0)) < count:
        assert time.monotonic() < deadline, f"{route}: {seen} of {count} requests recorded"
        time.sleep(0.02)
    return got.get(f"{name}_sum", 0.0)


def histogram(registry: CollectorRegistry, name: str, route: str, count: int) -> float:
    """The sum of ``name`` for GET ``route``, once ``count`` requests are in."""
    metrics = metrics_for(registry)
    labels = {"method": "GET", "route": route}

    def samples() -> dict[str, float]:
        metrics.flush()
        return {f"{name}_{part}": registry.get_sample_value(f"{name}_{part}", labels) or 0.0
                for part in ("count", "sum")}

    return _once_recorded(samples, name, route, count)


async def send_together(client: httpx.AsyncClient, paths: list[str]) -> None:
    # A connection for each request, open before they are sent, so that they arrive together.
    await asyncio.gather(*(client.get("/reset") for _ in paths))
    responses = await asyncio.gather(*(client.get(path) for path in paths))
    assert [r.status_code for r in responses] == [200] * len(paths)


def scraped(url: str, name: str, route: str, count: int) -> float:
    """The sum of ``name`` for GET ``route`` on the server at ``url``'s ``/metrics/``, once
    ``count`` requests are in."""
    return _once_recorded(lambda: _scrape(url, route), name, route, count)


def check(name: str, timeline: waiting.Timeline, delayed: Callable[[str, int], float]) -> None:
    """Scenario ``name`` as ``timeline`` saw it; ``delayed(route, count)`` is the sum of
    the delay histogram for GET ``route`` once ``count`` requests are in."""
    paths, expect, charged = SCENARIOS[name]
    victim = paths[0]
    got = delayed(victim, paths.count(victim))
    slow = delayed("/slow", 1)
    waited = expect(timeline)
    expected = waited if charged else 0.0
    print(f"{name}: {victim} delayed {got:.3f} s over {paths.count(victim)} requests "
          f"(they waited {waited:.3f} s from the app's timeline, expected charged "
          f"{expected:.3f} s); /slow {slow * 1000:.1f} ms")
    # The scenario happened as staged: each sleeper was due 50 ms after it fell asleep, 10 ms
    # before the 200 ms block, so it waited for most of the block, and never for longer than
    # the loop was held (the block, as long as it took, then any stall of the loop's thread
    # after it), give or take its own waking.
    start, end = timeline.block
    held = end - start + sum(float(p.partition("stall=")[2] or 0) / 1000 for p in paths)
    n = paths.count(victim)
    assert 0.14 * n < waited < (held + 0.01) * n, (waited, held)
    if charged:
        assert got == pytest.approx(expected, rel=0.10)
    else:
        assert got < 0.02
    assert slow < 0.02  # it waited on the sleepers, who never held the loop for long


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_request_is_charged_what_it_waited_for_others_in_process(
        loop_kind: str, name: str) -> None:
    registry = CollectorRegistry()
    app = waiting.build(registry)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/reset")  # starts the monitor: the tasks after it are timed
            await send_together(client, SCENARIOS[name][0])

    run_on(loop_kind, main())
    check(name, app.state.timeline,
          lambda route, count: histogram(registry, DELAYED, route, count))


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_request_is_charged_what_it_waited_for_others_through_uvicorn(
        loop_kind: str, name: str) -> None:
    """A uvicorn server in a process of its own, as in production (in this process a
    collection of the whole test run's heap, in the client's thread, would hold the server's
    loop too, and the sleepers would rightly be charged for a wait the scenario did not
    stage)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    async def main() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            await send_together(client, SCENARIOS[name][0])

    args = uvicorn_args("tests.apps.waiting:app", port, "--no-access-log", loop=loop_kind)
    with serve_in_subprocess(args, port=port, cwd=ROOT, path="/reset", output="file"):
        asyncio.run(main())
        timeline = waiting.Timeline.from_json(httpx.get(f"{url}/timeline").json())
        check(name, timeline, lambda route, count: scraped(url, DELAYED, route, count))


def test_death_by_a_thousand_cuts(loop_kind: str) -> None:
    """Eight requests hold the loop 1 ms at a time, 20 times each, yielding in between: no
    block, but each waits for the others' slices every time. All their waiting was for
    others, so what they were charged is their duration less their own loop time."""
    registry = CollectorRegistry()
    app = waiting.build(registry)
    n = 8

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.get("/reset")
            await send_together(client, ["/cuts?n=20&ms=1"] * n)

    run_on(loop_kind, main())
    delayed = histogram(registry, DELAYED, "/cuts", n)
    duration = histogram(registry, "loopwatch_request_duration_seconds", "/cuts", n)
    held = histogram(registry, "loopwatch_request_blocking_seconds", "/cuts", n)
    print(f"/cuts x{n}: delayed {delayed:.3f} s, duration {duration:.3f} s, own loop time "
          f"{held:.3f} s")
    assert registry.get_sample_value("loopwatch_event_loop_block_duration_seconds_count",
                                     {"method": "GET", "route": "/cuts"}) is None
    assert held > n * 0.020  # each held the loop 20 x 1 ms
    # Each waited for the 7 others' slices 20 times: ~140 ms each.
    assert delayed > n * 0.1
    assert delayed == pytest.approx(duration - held, rel=0.10)


def _scrape(url: str, route: str) -> dict[str, float]:
    """The sums and counts of GET ``route``'s histograms on the server at ``url``."""
    text = httpx.get(f"{url}/metrics/").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if (s.labels.get("route") == route and s.labels.get("method") == "GET"
                    and s.name.endswith(("_sum", "_count"))):
                out[s.name] = s.value
    return out


def test_a_saturated_loop_without_blocks(loop_kind: str) -> None:
    """A real server (its own process) saturated by 64 clients at once, each request only
    yielding to the loop 50 times: no block, yet every request spends most of its time
    waiting for the others' steps, and is charged that.

    Less what the OS took: while the server's thread waits for a CPU (the client, or anything
    else on a loaded host, has it) for more than ``IDLE_GAP``, the gap looks like a pause of
    the loop, and nobody is charged for it (docs/sre.md). The kernel counts that runqueue
    wait; each second of it can leave out at most one second for each request in flight."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = uvicorn_args("tests.apps.waiting:app", port, loop=loop_kind)

    async def load() -> int:
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            end = time.monotonic() + 2.0
            sent = 0
            while time.monotonic() < end:
                responses = await asyncio.gather(
                    *(client.get("/yields?n=50") for _ in range(IN_FLIGHT)))
                assert all(r.status_code == 200 for r in responses)
                sent += len(responses)
            return sent

    with serve_in_subprocess([*args], port=port, path="/reset") as server:
        queued = _runqueue_wait(server.pid)
        sent = asyncio.run(load())
        scraped(url, DELAYED, "/yields", sent)
        got = _scrape(url, "/yields")
        queued = _runqueue_wait(server.pid) - queued
    delayed = got[f"{DELAYED}_sum"]
    duration = got["loopwatch_request_duration_seconds_sum"]
    held = got["loopwatch_request_blocking_seconds_sum"]
    print(f"/yields x{sent} ({loop_kind}): delayed {delayed:.3f} s, duration {duration:.3f} s, "
          f"own loop time {held:.3f} s, ratio {delayed / (duration - held):.2f}, "
          f"server thread waited for a CPU {queued * 1000:.1f} ms")
    assert held < 0.5 * duration
    # Within 10 %: a request's own time includes the part of its first step before the
    # middleware started its clock, and the loop's work between steps is nobody's.
    assert delayed <= (duration - held) * 1.10
    assert delayed >= (duration - held - IN_FLIGHT * queued) * 0.90


def _runqueue_wait(pid: int) -> float:
    """Seconds the main thread of process ``pid`` has waited for a CPU, from the kernel."""
    path = Path(f"/proc/{pid}/task/{pid}/schedstat")
    if not path.exists():
        missing(f"{path} (Linux schedstat)")
    fields = path.read_text().split()
    return int(fields[1]) / 1e9


def test_an_owner_of_another_framework_is_charged_its_wait(loop_kind: str) -> None:
    """``owner_scope`` (a job runner, a consumer): the job sleeps 50 ms; 10 ms in, other code
    blocks 200 ms. The job's owner is charged from its timer's due time to the block's end,
    the blocker's owner nothing."""
    job = loopwatch.Owner("JOB", "sleeper")
    other = loopwatch.Owner("JOB", "blocker")
    moments: dict[str, float] = {}

    async def sleeper() -> None:
        with loopwatch.owner_scope(job):
            moments["due"] = time.perf_counter() + waiting.SLEEP
            await asyncio.sleep(waiting.SLEEP)

    async def blocker() -> None:
        with loopwatch.owner_scope(other):
            await asyncio.sleep(0.01)
            time.sleep(waiting.BLOCK)
            moments["end"] = time.perf_counter()

    async def main() -> None:
        async with loopwatch.watch(log_blocks=False):
            await asyncio.gather(asyncio.create_task(sleeper()), asyncio.create_task(blocker()))

    run_on(loop_kind, main())
    expected = moments["end"] - moments["due"]
    print(f"job delayed {job.delayed * 1000:.1f} ms (expected {expected * 1000:.1f} ms), "
          f"blocker {other.delayed * 1000:.1f} ms")
    assert 0.14 < expected < 0.2
    assert job.delayed == pytest.approx(expected, rel=0.10)
    assert other.delayed < 0.005
