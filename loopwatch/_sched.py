"""Runqueue wait of the loop thread: telling a block from the OS preempting the loop.

A step timed by wall clock also counts the time the OS kept the loop thread off the CPU while
it was runnable (another process or thread had the core). On Linux,
``/proc/self/task/<tid>/schedstat`` gives a thread's cumulative runqueue wait (its second
field, in ns): the time it was runnable but not running. A thread sleeping or blocked in a
syscall (``time.sleep``, a socket read) does not accumulate it; one computing does only while
it waits for a CPU. So the time a step's own code held the loop is its wall duration minus the
runqueue wait inside it.

The counter can only be read, not reset, so the wait inside a step is bounded from *marks*:
(clock, wait) pairs the loop thread takes in the lag probe and at the end of a block, and a
read at the step's end: a few microseconds each, never on the per-step path.

Where the file cannot be read (not Linux, no schedstat, any error), :func:`open_reader`
returns None or the reader stops reading: everything then behaves as without it.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterable
from typing import Any

__all__ = ["Mark", "SchedReader", "held_at_most", "open_reader"]

#: (perf_counter() taken just before the read, cumulative runqueue wait in seconds), read by
#: the thread itself: the kernel adds a wait to the counter when the thread gets a CPU back,
#: so a thread reading its own counter sees every wait up to that moment. (Another thread's
#: read would lack an ongoing wait, and the watchdog cannot run anyway while a preempted
#: loop thread holds the GIL: marks come from the loop thread only.)
Mark = tuple[float, float]

_SIZE = 128  # "<on-cpu ns> <runqueue ns> <timeslices>\n" is far shorter


class SchedReader:
    """Reads one thread's cumulative runqueue wait. Use one reader per reading thread.

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

    def wait(self) -> float | None:
        """Seconds the thread waited in the run queue so far, or None (then for good)."""
        args = self._args
        if args is None:
            return None
        try:
            n = self._pread(*args)
            if n <= 0:
                raise OSError("schedstat: nothing read")
            return int(self._buffer.raw[:n].split()[1]) * 1e-9
        except Exception:  # noqa: BLE001 - the thread exited, an odd kernel: stop reading
            self.close()
            return None

    def close(self) -> None:
        self._args = None
        self._finalizer()


def open_reader(native_tid: int) -> SchedReader | None:
    """A reader of thread ``native_tid``'s (of this process) runqueue wait, or None."""
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
    if reader.wait() is None:
        return None
    return reader


def held_at_most(marks: Iterable[Mark], t0: float, t_end: float, wait_end: float) -> float:
    """An upper bound of the time, within ``[t0, t_end]``, the thread was *not* waiting in
    the run queue: running, or sleeping in a call of its own.

    ``wait_end`` is the thread's own read of its runqueue wait, taken before ``t_end``. The
    counter grows by at most the elapsed time, so a mark taken ``g`` seconds before ``t0``
    proves at least ``wait_end - wait - g`` of wait inside the stretch; one taken inside it
    proves ``wait_end - wait``.
    """
    proven = 0.0
    for clock, wait in marks:
        proven = max(proven, wait_end - wait - max(0.0, t0 - clock))
    return (t_end - t0) - proven
