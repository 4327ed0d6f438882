"""The loop thread's scheduling, from the kernel: how much of a block the thread spent on a
CPU, waiting for one, or neither.

A step timed by wall clock also counts the time the OS kept the loop thread off the CPU. On
Linux, ``/proc/self/task/<tid>/schedstat`` gives a thread's cumulative time on a CPU, its
cumulative runqueue wait (runnable, but another thread had the CPU) and how many times it got
a CPU. A thread sleeping in a call (``time.sleep``, a socket read, waiting for the GIL) or
stopped with the whole process (SIGSTOP, a VM whose CPU was taken away) accumulates neither.

None of this excuses a block: the loop was held for its users either way (a CPU-bound step on
a busy host gets less CPU than wall time, and is still the step that held the loop). It labels
blocks: how much of each was runqueue wait (``preempted``), and how much the thread spent
neither running nor waiting for a CPU, which, when the watchdog saw the whole process stand
still, is the time it was paused.

The counters can only be read, not reset, so what happened inside a block is bounded from
*marks*: readings the loop thread takes in the lag probe and at the end of a block (a few
microseconds each, never on the per-step path).

Where the file cannot be read (not Linux, no schedstat, any error), :func:`open_reader`
returns None or the reader stops reading: blocks then carry no such labels.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterable
from typing import Any

__all__ = ["Mark", "Reading", "SchedReader", "inside", "open_reader"]

#: (seconds on a CPU, seconds waiting in the run queue, times it got a CPU), cumulative.
Reading = tuple[float, float, int]

#: (perf_counter() taken just before the read, the reading), read by the thread itself: the
#: kernel adds a wait to the counter when the thread gets a CPU back, so a thread reading its
#: own counters sees every wait up to that moment. (Another thread's read would lack an
#: ongoing wait, and could not run anyway while a preempted loop thread holds the GIL.)
Mark = tuple[float, Reading]

_SIZE = 128  # "<on-cpu ns> <runqueue ns> <timeslices>\n" is far shorter


class SchedReader:
    """Reads one thread's scheduling counters. Use one reader per reading thread.

    The read is a ``pread`` through :class:`ctypes.PyDLL`, which keeps the GIL: ``os.pread``
    would release it, and on the loop thread that lets any other Python thread take the GIL
    for up to a switch interval (5 ms) in the middle of the probe or of a block's report.
    """

    __slots__ = ("__weakref__", "_args", "_buffer", "_finalizer", "_pread")

    def __init__(self, fd: int, pread: Any) -> None:
        import ctypes

        self._buffer = ctypes.create_string_buffer(_SIZE)
        self._args: tuple[Any, ...] | None = (
            ctypes.c_int(fd), self._buffer, ctypes.c_size_t(_SIZE), ctypes.c_int64(0)
        )
        self._pread = pread
        self._finalizer = weakref.finalize(self, os.close, fd)

    def read(self) -> Reading | None:
        """The thread's counters so far, or None (then for good)."""
        args = self._args
        if args is None:
            return None
        try:
            n = self._pread(*args)
            if n <= 0:
                raise OSError("schedstat: nothing read")
            on_cpu, waited, runs = self._buffer.raw[:n].split()[:3]
            return int(on_cpu) * 1e-9, int(waited) * 1e-9, int(runs)
        except Exception:  # noqa: BLE001 - the thread exited, an odd kernel: stop reading
            self.close()
            return None

    def close(self) -> None:
        self._args = None
        self._finalizer()


def open_reader(native_tid: int) -> SchedReader | None:
    """A reader of thread ``native_tid``'s (of this process) counters, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # on first use: importing loopwatch does not pay for it

        libc = ctypes.PyDLL(None)
        # pread64: a 64-bit offset everywhere (musl has only pread, always 64-bit).
        pread = getattr(libc, "pread64", None) or libc.pread
        pread.restype = ctypes.c_ssize_t
        fd = os.open(f"/proc/self/task/{native_tid}/schedstat", os.O_RDONLY | os.O_CLOEXEC)
    except (ImportError, OSError, AttributeError):
        return None
    reader = SchedReader(fd, pread)
    if reader.read() is None:
        return None
    return reader


def inside(marks: Iterable[Mark], t0: float, t_end: float, end: Reading) -> tuple[float, float]:
    """(runqueue wait, time neither on a CPU nor waiting for one), lower bounds of each
    within ``[t0, t_end]``, from ``end`` (the thread's own reading, taken at ``t_end``).

    The counters grow by at most the elapsed time, so a mark taken ``g`` seconds before
    ``t0`` proves at least ``wait_end - wait - g`` of wait inside the stretch, and that the
    thread spent at most ``cpu_end - cpu`` on a CPU and ``wait_end - wait`` waiting in it.
    """
    waited = off = 0.0
    for clock, (cpu, wait, _) in marks:
        gap = max(0.0, t0 - clock)
        waited = max(waited, end[1] - wait - gap)
        off = max(off, (t_end - max(t0, clock)) - (end[0] - cpu) - (end[1] - wait))
    return max(waited, 0.0), max(off, 0.0)
