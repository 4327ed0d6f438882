"""The live page behind several worker processes (``uvicorn --workers 2`` with
``PROMETHEUS_MULTIPROC_DIR``): each worker serves its own blocks, the route table adds up
every worker's requests and blocks, and the page names the workers."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from harness.servers import free_port, serve_in_subprocess, uvicorn_args

WORKERS = 2
ROOT = Path(__file__).resolve().parent.parent


def test_the_route_table_covers_every_worker(tmp_path: Path) -> None:
    port = free_port()
    args = uvicorn_args("tests.test_ui_support:default_registry_app", port, "--factory",
                        "--workers", str(WORKERS))
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    with serve_in_subprocess(args, port=port, env=env, path="/items/0", timeout=60):
        url = f"http://127.0.0.1:{port}"
        served: dict[int, dict[str, object]] = {}
        deadline = time.monotonic() + 30
        # A new connection each time: the kernel hands it to one worker or the other.
        while len(served) < WORKERS and time.monotonic() < deadline:
            httpx.get(url + "/long")
            body = httpx.get(url + "/loopwatch/api/state").json()
            served[body["pid"]] = body
        assert len(served) == WORKERS, "every request went to the same worker"
        sent = 0
        for _ in range(4):
            httpx.get(url + "/items/1")
            sent += 1
        time.sleep(0.2)  # each worker folds its requests into its files at its next probe
        tables = [httpx.get(url + "/loopwatch/api/state").json() for _ in range(6)]
    for body in tables:
        assert body["routes"]["all_workers"] is True
        assert sorted(body["workers"]) == sorted(served)
        rows = {row["route"]: row for row in body["routes"]["rows"]}
        # Whichever worker answers, the table has every worker's requests and blocks.
        long_requests = rows["/long"]["requests"]
        assert long_requests >= WORKERS and rows["/long"]["blocks"] == long_requests
        assert rows["/items/{item_id}"]["requests"] >= sent
        worst = rows["/long"]
        assert worst["worst"] is not None or worst["worst_range"] == [0.25, 0.5]
