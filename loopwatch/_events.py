"""What loopwatch reports about one block of the event loop."""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from typing import Any

__all__ = ["BlockEvent", "Frame"]

_STDLIB = os.path.normcase(sysconfig.get_paths()["stdlib"])
_PURELIB = os.path.normcase(sysconfig.get_paths()["purelib"])
_LOOPWATCH = os.path.normcase(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a sampled stack: where the loop thread was, never its local variables."""

    file: str
    line: int
    function: str
    module: str = ""

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def is_library(self) -> bool:
        """True for the standard library, installed packages and loopwatch itself."""
        path = os.path.normcase(self.file)
        return (
            path.startswith((_STDLIB, _PURELIB, _LOOPWATCH))
            or "site-packages" in path
            or path.startswith("<")
        )

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "function": self.function}


@dataclass(frozen=True, slots=True)
class BlockEvent:
    """One stretch in which a single callback or task step held the loop too long.

    ``duration`` is measured on the loop thread around the step, so it is exact even when
    no stack could be sampled. ``frames`` is the loop thread's stack as the watchdog saw it
    *while the loop was still blocked*, innermost first; it is empty when no sample could be
    taken (``stack_status`` says why). ``location`` is the innermost frame in your own code
    (not the standard library or an installed package): the line that blocked, or the line
    that called into the library that blocked.
    """

    time: float  #: wall-clock time (time.time()) when the block started
    duration: float  #: seconds the loop was held
    task: str | None  #: the name of the task whose step blocked, if it was a task step
    frames: tuple[Frame, ...] = ()
    hint: str | None = None  #: the async replacement, when the stack matched a known call
    stack_status: str = "sampled"  #: "sampled", or why there is no stack
    method: str | None = None  #: HTTP method of the request whose code blocked
    route: str | None = None  #: route template of that request
    #: True when the duration was measured around the step itself (exact); False when the
    #: step was not timed (uvloop: code outside tasks created after start) and the duration
    #: is the lag probe's lateness, a lower bound accurate to the probe interval.
    timed: bool = True
    #: Seconds of the block in which Python's garbage collector ran. When the collector
    #: took all but less than the threshold, the block is the collector's: ``route`` is
    #: ``"<gc>"`` and ``method`` None, whatever step it interrupted.
    gc_seconds: float = 0.0
    #: Seconds of the block in which the OS kept the loop thread waiting for a CPU (Linux;
    #: 0.0 elsewhere): the host was overloaded. Still the step's block: the loop was held.
    preempted: float = 0.0
    #: Seconds of the block in which the whole process stood still (SIGSTOP, a debugger, a
    #: VM whose CPU was taken away; Linux). When the pause took all but less than the
    #: threshold, the block is the pause's: ``route`` is ``"<paused>"`` and ``method`` None.
    paused: float = 0.0

    @property
    def location(self) -> str | None:
        frame = self.blocking_frame
        return frame.location if frame else None

    @property
    def blocking_frame(self) -> Frame | None:
        for frame in self.frames:
            if not frame.is_library:
                return frame
        return self.frames[0] if self.frames else None

    def summary(self) -> str:
        """One line for humans: duration, task, route, file:line, hint."""
        parts = [f"event loop blocked for {self.duration * 1000:.1f} ms"]
        if self.task:
            parts.append(f"in task {self.task!r}")
        if self.route == "<gc>":
            parts.append(f"by the garbage collector ({self.gc_seconds * 1000:.1f} ms)")
        elif self.route == "<paused>":
            parts.append(f"while the whole process was paused ({self.paused * 1000:.1f} ms)")
        elif self.route:
            parts.append(f"during {self.method} {self.route}")
        frame = self.blocking_frame
        if frame is not None:
            parts.append(f"at {frame.location} in {frame.function}()")
        else:
            parts.append(f"(no stack: {self.stack_status})")
        if self.preempted >= 0.001:
            parts.append(f"(of which {self.preempted * 1000:.1f} ms waiting for a CPU)")
        text = " ".join(parts)
        if self.hint:
            text += f"; hint: {self.hint}"
        return text

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view: no local variables, arguments, headers or query strings."""
        return {
            "time": self.time,
            "duration": self.duration,
            "task": self.task,
            "method": self.method,
            "route": self.route,
            "location": self.location,
            "hint": self.hint,
            "stack_status": self.stack_status,
            "timed": self.timed,
            "gc_seconds": self.gc_seconds,
            "preempted": self.preempted,
            "paused": self.paused,
            "frames": [f.as_dict() for f in self.frames],
        }


