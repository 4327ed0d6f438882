"""Run the live page's serialisation in a thread of its own, never on the event loop.

As ``metrics_app`` does: not the loop's default executor (the page must not queue behind the
application's ``run_in_executor`` work, nor take its threads), and a thread per request
(~0.1 ms) that leaves nothing behind. At most :data:`MAX_RUNNING` at once per process: a
request beyond that is answered 503 at once, so that pages left open cannot pile up threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["MAX_RUNNING", "Busy", "breathe", "off_loop"]

T = TypeVar("T")
MAX_RUNNING = 4
_slots = threading.BoundedSemaphore(MAX_RUNNING)
_WORK = 0.001  # seconds of work between two rests
_REST = 0.0005  # seconds without the GIL: the loop's thread, if it waits, takes it
_clock = time.perf_counter
_local = threading.local()


def breathe() -> None:
    """In a worker thread's long loop (never on the event loop): rest a moment without the
    GIL once a millisecond of work has passed since the last rest."""
    now = _clock()
    due: float = getattr(_local, "due", 0.0)
    if now >= due:
        if due:
            time.sleep(_REST)
        _local.due = _clock() + _WORK


class Busy(Exception):
    """Already :data:`MAX_RUNNING` serialisations running."""


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a new thread; raises :class:`Busy` when too many run."""
    if not _slots.acquire(blocking=False):
        raise Busy
    try:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
    except BaseException:
        _slots.release()
        raise

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the request was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        # Let the loop's thread, which start() woke up, finish its step before any work
        # here holds the GIL: it would otherwise wait for the first rest (up to 1 ms).
        time.sleep(_REST)
        try:
            result, error = function(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, exc
        finally:
            _slots.release()
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop was closed meanwhile: nobody is waiting
            pass

    try:
        threading.Thread(target=work, name="loopwatch-ui", daemon=True).start()
    except BaseException:
        _slots.release()
        raise
    return await future
