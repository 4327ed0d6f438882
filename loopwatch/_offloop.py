"""loopwatch's own endpoints never block the loop they guard.

Their work (rendering the Prometheus exposition, serialising block events) runs in a thread
of its own, never in the loop's default executor (a scrape must not queue behind the app's
``run_in_executor`` work: metrics are most needed when the app is saturated), and in small
pieces: a thread that holds the GIL for long in one C call (``json.dumps`` of a large
document) blocks the loop as surely as the loop itself would. A large body is made, and cut
into :data:`CHUNK`-sized pieces, in the thread (:func:`pieces`): one large buffer made or freed
on the loop, or in one C call in any thread, costs a page fault or an unmapping per 4 kB page
(a 10 MB body took 8 ms to free on a VM). The response goes out piece by piece, each followed
by a turn of the loop, so that sending a large body is many short steps, not one long one. At
most
:data:`MAX_RENDERS` renders run at once per process; beyond that a client gets ``503``.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, TypeVar

__all__ = ["CHUNK", "MAX_RENDERS", "Busy", "Pieces", "in_thread", "pieces", "respond"]

T = TypeVar("T")
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Renders in flight at once, at most (each is a thread of its own).
MAX_RENDERS = 4
#: Bytes per body message.
CHUNK = 64 * 1024

_in_flight = 0
_lock = threading.Lock()


class Pieces(list[bytes]):
    """A body already cut into pieces of at most :data:`CHUNK` bytes (:func:`pieces`)."""


def pieces(parts: Iterable[bytes | str]) -> Pieces:
    """The concatenation of ``parts`` (``str`` encoded as UTF-8) in :data:`CHUNK`-sized
    pieces, never held whole: for a render thread, each piece a short C call."""
    out = Pieces()
    buffer = bytearray()
    for part in parts:
        data = memoryview(part.encode() if isinstance(part, str) else part)
        while len(data):
            take = CHUNK - len(buffer)
            buffer += data[:take]
            data = data[take:]
            if len(buffer) == CHUNK:
                out.append(bytes(buffer))
                buffer.clear()
    if buffer or not out:
        out.append(bytes(buffer))
    return out


class Busy(Exception):
    """:data:`MAX_RENDERS` renders are running already."""


async def in_thread(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in a thread of its own; the result (or its exception) on the loop.

    A thread per call costs ~0.1 ms, leaves no thread behind and is fork-safe. It is started
    with ``_thread.start_new_thread``, which returns at once: ``threading.Thread.start()``
    waits until the new thread runs, and on a busy host that wait (tens of ms) would be the
    loop's. Raises :class:`Busy` when too many are running.
    """
    global _in_flight
    with _lock:
        if _in_flight >= MAX_RENDERS:
            raise Busy
        _in_flight += 1
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def run() -> None:
        global _in_flight
        try:
            result, error = work(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, exc
        finally:
            with _lock:
                _in_flight -= 1
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop was closed meanwhile: nobody is waiting
            pass

    try:
        _thread.start_new_thread(run, ())
    except BaseException:
        with _lock:
            _in_flight -= 1
        raise
    return await future


async def respond(send: Send, status: int, body: bytes | Pieces,
                  headers: list[tuple[bytes, bytes]], head_only: bool = False) -> None:
    """A complete response, its body in :data:`CHUNK`-sized messages: ``body`` whole (small,
    or made on the loop anyway) or already in :class:`Pieces`."""
    if not isinstance(body, Pieces):
        body = pieces([body])
    length = sum(len(piece) for piece in body)
    headers = [*headers, (b"content-length", str(length).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if head_only or len(body) <= 1:
        await send({"type": "http.response.body", "body": b"" if head_only else body[0]})
        return
    last = len(body) - 1
    for i, piece in enumerate(body):
        await send({"type": "http.response.body", "body": piece, "more_body": i < last})
        # A server's send only waits when its buffer is full; a fast client keeps it empty,
        # and all pieces would go out in one long step.
        await asyncio.sleep(0)
    # Freed here, the pieces' memory would go back to the OS in this step (8 ms for 10 MB
    # on a VM): a thread lets go of them instead.
    with contextlib.suppress(Busy):
        await in_thread(body.clear)
