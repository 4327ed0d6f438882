"""What the live page reads, as JSON: taken on the loop in O(what is sent), encoded in a
worker thread.

A :class:`Snapshot` is taken on the loop thread: references to the newest block events
(frozen objects), the new history points and a copy of the worst-block table, nothing
formatted. Everything else (the route table from the registry, JSON, gzip) runs in the
thread that calls :meth:`Snapshot.encode`. Nothing here reads a request: block events hold
the route template, never the path, query string, headers or body.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from ._accel import HOT_PATH
from ._events import BlockEvent
from ._ui_history import History, Point
from ._ui_offloop import breathe
from ._ui_paths import short_path
from ._ui_routes import live_workers, routes

__all__ = ["Snapshot", "event_detail", "find_event", "to_json", "to_json_with"]


def to_json(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def to_json_with(payload: dict[str, Any], key: str, items: Iterable[Any], chunk: int = 1,
                 ) -> bytes:
    """``payload`` as JSON with ``key`` set to the list of ``items``, encoded ``chunk``
    items at a time (``json.dumps`` holds the GIL until it returns: see _ui_offloop)."""
    head = to_json(payload)
    pieces: list[bytes] = []
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= chunk:
            pieces.append(to_json(batch)[1:-1])
            batch = []
            breathe()
    if batch:
        pieces.append(to_json(batch)[1:-1])
    separator = b"," if len(head) > 2 else b""
    return b"".join((head[:-1], separator, to_json(key), b":[", b",".join(pieces), b"]}"))


def _loop_name(loop: Any) -> str:
    kind = type(loop)
    module = kind.__module__.split(".", 1)[0]
    return module if module in ("asyncio", "uvloop") else f"{kind.__module__}.{kind.__name__}"


@dataclass(frozen=True)
class Snapshot:
    """One poll of the page: what changed since the page's last poll."""

    pid: int
    epoch: str
    monitoring: bool
    loop: str
    config: dict[str, Any]
    block_count: int
    ring_length: int
    #: (sequence number, event), newest first, only those the page has not seen.
    events: tuple[tuple[int, BlockEvent], ...]
    points: tuple[Point, ...]
    worst: dict[tuple[str, str], float]
    history_seconds: int
    poll_interval: float
    registry: CollectorRegistry | None
    cwd: str

    @classmethod
    def take(cls, monitor: Any, history: History, *, epoch: str, since: int, since_point: int,
             max_events: int, poll_interval: float, registry: CollectorRegistry | None,
             ) -> Snapshot:
        """On the loop thread: at most ``max_events`` events and the points the page lacks."""
        if epoch != history.epoch:  # a new page, or a new monitor: send everything
            since = since_point = -1
        count = monitor.block_count
        ring = monitor.blocks
        wanted = max(min(max_events, len(ring), count - 1 - since), 0)
        events = tuple(zip(itertools.count(count - 1, -1),
                           itertools.islice(reversed(ring), wanted)))
        points = history.points
        new = max(min(len(points), points[-1][0] - since_point), 0) if points else 0
        config = monitor.config
        return cls(
            pid=os.getpid(),
            epoch=history.epoch,
            monitoring=bool(monitor.active),
            loop=_loop_name(monitor.loop),
            config={
                "block_threshold": config.block_threshold,
                "probe_interval": config.probe_interval,
                "ring_size": config.ring_size,
                "stack_depth": config.stack_depth,
                "sample_stacks": config.sample_stacks,
                "max_events": max_events,
            },
            block_count=count,
            ring_length=len(ring),
            events=events,
            points=tuple(itertools.islice(points, len(points) - new, None)),
            worst=dict(history.worst),
            history_seconds=history.seconds,
            poll_interval=poll_interval,
            registry=registry,
            cwd=os.getcwd(),
        )

    def encode(self) -> bytes:
        """In a worker thread: the state as JSON."""
        table = routes(self.registry, self.worst)
        return to_json_with({
            "pid": self.pid,
            "workers": live_workers(),
            "epoch": self.epoch,
            "monitoring": self.monitoring,
            "loop": self.loop,
            "hot_path": HOT_PATH,
            "config": self.config,
            "block_count": self.block_count,
            "ring_length": self.ring_length,
            "poll_interval": self.poll_interval,
            "history_seconds": self.history_seconds,
            "points": [list(point) for point in self.points],
            "routes": table,
        }, "events", (_summary(seq, event, self.cwd) for seq, event in self.events))


def _where(event: BlockEvent, cwd: str) -> dict[str, Any] | None:
    frame = event.blocking_frame
    if frame is None:
        return None
    return {"file": frame.file, "short": short_path(frame.file, cwd), "line": frame.line,
            "function": frame.function}


def _summary(seq: int, event: BlockEvent, cwd: str) -> dict[str, Any]:
    """One row of the page's list: no frames (the stack is fetched when the row opens), so
    its size does not grow with ``stack_depth``."""
    return {
        "seq": seq,
        "time": event.time,
        "duration": event.duration,
        "method": event.method,
        "route": event.route,
        "task": event.task,
        "where": _where(event, cwd),
        "hint": event.hint,
        "stack_status": event.stack_status,
        "timed": event.timed,
        "gc_seconds": event.gc_seconds,
        "depth": len(event.frames),
    }


def find_event(monitor: Any, seq: int) -> BlockEvent | None:
    """On the loop thread: the event numbered ``seq``, if it is still in the ring."""
    ring = monitor.blocks
    back = monitor.block_count - 1 - seq
    if not 0 <= back < len(ring):
        return None
    return ring[len(ring) - 1 - back]  # type: ignore[no-any-return]


def event_detail(seq: int, event: BlockEvent, cwd: str) -> bytes:
    """In a worker thread: one event with its whole stack (innermost first), each frame
    with its short path and whether it is library code."""
    payload = event.as_dict()
    payload["seq"] = seq
    payload["where"] = _where(event, cwd)
    payload["frames"] = [
        {**frame.as_dict(), "short": short_path(frame.file, cwd), "lib": frame.is_library}
        for frame in event.frames
    ]
    return to_json(payload)
