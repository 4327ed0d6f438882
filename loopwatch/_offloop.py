"""loopwatch's own endpoints never block the loop they guard.

Two ways, by what the work is. The block events are made into JSON on the loop, as the
response goes out (:func:`stream`): one event at a time, a turn of the loop after each
:data:`CHUNK` sent and after about :data:`STEP` of work, one piece in memory at a time. No
thread shares the GIL with the loop's for it: a thread doing Python work makes the loop thread
wait for the GIL up to a switch interval (5 ms) each time it wants it back, and a garbage
collection that the thread's allocations trigger holds the GIL throughout (tens of ms on a
large heap).

The Prometheus exposition is one call into ``prometheus_client``, which cannot be cut into
steps: it runs in a thread of its own (:func:`in_thread`), never in the loop's default
executor (a scrape must not queue behind the app's ``run_in_executor`` work: metrics are most
needed when the app is saturated), and is cut into :data:`CHUNK`-sized pieces there
(:func:`pieces`): one large buffer made or freed on the loop costs a page fault or an
unmapping per 4 kB page (a 10 MB body took 8 ms to free on a VM). It goes out piece by piece,
each followed by a turn of the loop (:func:`respond`). At most :data:`MAX_RENDERS` renders run
at once per process; beyond that a client gets ``503``.
"""

from __future__ import annotations

import _thread
import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any, TypeVar

__all__ = ["CHUNK", "MAX_RENDERS", "STEP", "Busy", "Pieces", "in_thread", "pieces", "respond",
           "stream"]

T = TypeVar("T")
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Renders in flight at once, at most (each is a thread of its own).
MAX_RENDERS = 4
#: Bytes per body message.
CHUNK = 64 * 1024
#: Seconds of work on the loop after which :func:`stream` gives the loop a turn.
STEP = 0.001

_clock = time.perf_counter

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
        out.extend(_filled(buffer, part))
    if buffer or not out:
        out.append(bytes(buffer))
    return out


def _filled(buffer: bytearray, part: bytes | str) -> Iterator[bytes]:
    """Adds ``part`` to ``buffer`` (less than :data:`CHUNK` bytes), yielding each
    :data:`CHUNK` it fills and emptying it: a large part is never copied whole."""
    data = memoryview(part.encode() if isinstance(part, str) else part)
    while len(data):
        take = CHUNK - len(buffer)
        buffer += data[:take]
        data = data[take:]
        if len(buffer) == CHUNK:
            yield bytes(buffer)
            buffer.clear()


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


async def stream(send: Send, status: int, parts: Iterable[bytes | str],
                 headers: list[tuple[bytes, bytes]], head_only: bool = False) -> None:
    """A response whose body is made on the loop as it goes out, from ``parts`` (``str``
    encoded as UTF-8), taken one at a time: sent in :data:`CHUNK`-sized messages, the loop
    given a turn after each and after about :data:`STEP` of making them. Never held whole, so
    sent without a content-length (chunked on HTTP/1.1). Each part should take less than
    :data:`STEP` to make."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if head_only:
        await send({"type": "http.response.body", "body": b""})
        return
    buffer = bytearray()
    turn = _clock() + STEP
    for part in parts:
        for piece in _filled(buffer, part):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(0)
            turn = _clock() + STEP
        if _clock() >= turn:
            await asyncio.sleep(0)
            turn = _clock() + STEP
    await send({"type": "http.response.body", "body": bytes(buffer)})
