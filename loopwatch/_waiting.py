"""Who waited: the time an owner's steps were ready to run but other code held the loop.

Every step hook (:mod:`._hooks`, and its C twin) keeps, per loop, when the last step ended
(``last_end``), the pauses of the loop so far (``idle``: a step that starts more than
``IDLE_GAP`` after the previous one ended follows a pause, in which the loop had nothing to
run) and when the loop last started running after one (``run_start``); and, per owner, when
its last step ended and a mark from which the time *other* code held the loop since then
follows (``others_mark``: that time is the time passed, less the owner's own steps and the
loop's pauses). When an owner's step starts, the wait it suffered is

    min(time other code held the loop since the owner's last step,
        start of this step - the earliest moment it can have been ready)

"Other code" is other owners' steps, steps of no owner, and the loop's own work between
steps (on uvloop that includes plain callbacks, such as the server's protocol code, which
are not timed one by one; one that runs longer than ``IDLE_GAP`` looks like a pause, as does
the loop's thread waiting that long for the GIL or a CPU). The earliest moment is the later
of the end of the owner's last step and either the due time of the timer that woke the step,
where that is known, or else the start of the loop's current run (before its last pause
nothing was ready; a known due time overrides it, as the loop does not pause while a timer
is due). A step that follows the owner's own asyncio timer callback (``timer_end``: asyncio
ends a sleep so, the callback making the task's step ready for the next iteration) was ready
from that callback's end. Where the step was due or ready before the loop's last pause
(``last_gap`` long), that pause was the loop's thread held, not a pause: its part after the
step was ready counts as other code's time. An owner is never charged for its own steps (its
``gather`` children are the same owner), nor for a pause of the loop, nor for a step that
starts once its ``ended`` is set (a request's response was sent: its background tasks wait on
no client; the request's delay stays within its duration).

What this sees exactly: a timer that ran late (on asyncio, any timer: its handle's due time,
read as it runs; on uvloop, whose timers run unseen in C, an ``asyncio.sleep``: its due time
is read from the sleeping coroutine, which costs a few microseconds, so only when a step of
``LOOK_AFTER`` or more ran while the task waited) -- looked up whatever the loop did before
(a gap before the step may be another thread or the OS holding the loop's thread, not a
pause); and a step woken by another task's step (it is ready from inside
that step, so within the run). What it estimates: a step woken by I/O that arrived while the
loop was running. The moment the data arrived is not known, so it is charged from the start
of that run (or the owner's last step, if later): an upper bound, off by at most the part of
the run before the data came. On uvloop, other timers (``wait_for``, ``asyncio.timeout``),
and a sleep while the loop ran only short steps, are estimated the same way. So on a loop
that never pauses (saturated), such waits are charged whole: there the figure says that the
loop, not the request, decided when it ran again.

The C twin (``account`` and ``begin_step`` in ``_ctiming.c``) does exactly this for each
step; :func:`running_wait` is the same charge for the step still running when a request
finishes (:func:`._request.finish`).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

__all__ = ["IDLE_GAP", "LOOK_AFTER", "begin_step", "charge_wait", "running_wait", "wake_due"]

#: A step that starts more than this after the loop's previous step ended follows a pause of
#: the loop (seconds). Small idle periods count as running: that errs towards charging.
IDLE_GAP = 0.001
#: On uvloop, a task's sleep is looked at closely (its due time read) when a step this long
#: or longer ran while it waited (seconds).
LOOK_AFTER = 0.002

_clock = time.perf_counter
_SLEEP = asyncio.sleep.__code__
#: Await chains deeper than this are not followed.
_DEPTH = 64


def begin_step(mon: Any, t0: float, what: Any, look: bool) -> None:
    """Before a step that starts at ``t0``: the loop's pauses and run, and, where ``look``,
    the due time of ``what`` (the step's handle, or its timed coroutine)."""
    mon.step_start = t0
    mon.due = 0.0
    gap = t0 - mon.last_end
    paused = gap > mon.idle_gap
    if paused:
        mon.idle += gap
        mon.run_start = t0
        mon.last_gap = gap
    if look:
        mon.due = mon._wake_due(t0, what)


def running_wait(mon: Any, owner: Any, t0: float) -> float:
    """The wait charged to ``owner`` for its step that started at ``t0`` (its busy time not
    yet counting that step)."""
    others: float = t0 - mon.idle - owner.busy - owner.others_mark
    ready = owner.last_end
    # Its last step was its timer's callback, which made this step ready (asyncio ends a
    # sleep so): ready from that step's end, whatever the loop did after it.
    chained = ready == owner.timer_end
    if (others <= 0.0 and not chained and not mon.due) or not ready \
            or (owner.ended and t0 >= owner.ended):
        return 0.0
    # A known due time overrides the run's start: the loop does not pause while a timer is
    # due, so a "pause" after it was another thread, or the OS, holding the loop's thread.
    since = ready if chained else (mon.due if mon.due else mon.run_start)
    if since > ready:
        ready = since
    wait: float = t0 - ready
    if wait <= 0.0:
        return 0.0
    if chained or mon.due:
        # Nor while a step is ready: the part of the loop's last "pause" after the step was
        # ready was other code's time (the loop's thread held), not a pause.
        pause_start = mon.run_start - mon.last_gap
        held = mon.run_start - (ready if ready > pause_start else pause_start)
        if held > 0.0:
            others += held
    if others <= 0.0:
        return 0.0
    return wait if wait < others else others


def charge_wait(mon: Any, owner: Any, t0: float, end: float, timer: bool = False) -> None:
    """After ``owner``'s step from ``t0`` to ``end`` (``timer``: an asyncio timer's
    callback), before it is added to its busy time: charge the wait before it, and mark
    where the owner's next wait starts."""
    owner.delayed += running_wait(mon, owner, t0)
    owner.last_end = end
    owner.timer_end = end if timer else 0.0
    owner.others_mark = end - mon.idle - owner.busy - (end - t0)


def wake_due(what: Any, loop: asyncio.AbstractEventLoop | None) -> float:
    """When the step about to run was due (``perf_counter`` time): an asyncio timer's own due
    time, or that of the ``asyncio.sleep`` timer the task about to step was waiting in (the
    timer of uvloop is not seen run); 0 for anything else."""
    if loop is None:
        return 0.0
    if isinstance(what, asyncio.TimerHandle):
        return what.when() + (_clock() - loop.time())
    coro = _coroutine_of(what)
    for _ in range(_DEPTH):
        if coro is None:
            return 0.0
        if getattr(coro, "cr_code", None) is _SLEEP:
            frame = coro.cr_frame
            timer = frame.f_locals.get("h") if frame is not None else None
            when = getattr(timer, "when", None)
            if when is None:
                return 0.0
            return float(when()) + (_clock() - loop.time())
        coro = _awaited(coro)
    return 0.0


def _awaited(coro: Any) -> Any:
    """What ``coro`` is suspended in: its ``cr_await`` (``gi_yieldfrom`` for a generator);
    through an awaitable that wraps a coroutine and shows nothing of it (a compiled
    coroutine's ``__await__``, as loopwatch's own middleware), the coroutine it holds."""
    inner = getattr(coro, "cr_await", None)
    if inner is None:
        inner = getattr(coro, "gi_yieldfrom", None)
    if inner is None or hasattr(inner, "cr_await") or hasattr(inner, "gi_yieldfrom"):
        return inner
    held = [ref for ref in gc.get_referents(inner) if hasattr(ref, "cr_await")]
    return held[0] if len(held) == 1 else None


def _coroutine_of(what: Any) -> Any:
    """The coroutine of the task a step runs: ``what`` is a timed coroutine (its ``wrapped``)
    or a Handle whose callback is a bound method of a task."""
    wrapped = getattr(what, "wrapped", None)
    if wrapped is not None:
        return wrapped()
    task = getattr(getattr(what, "_callback", None), "__self__", None)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
        wrapped = getattr(coro, "wrapped", None)
        return coro if wrapped is None else wrapped()
    return None
