"""``ui_app()``: the live page, an ASGI app to mount where you choose.

One page at the mount's root (``/loopwatch/``) and what it reads:

* ``static/...``         the page's script and style sheet (shipped in the package)
* ``api/state``          block events the page has not seen, history points, the route table
* ``api/event``          one event's whole stack (``?seq=&epoch=``)
* ``api/flame``          the aggregated blocking stacks as a tree
* ``api/collapsed.txt``  the same stacks in the collapsed-stack text format

Every data request takes a snapshot on the loop (references only, bounded by ``max_events``
and the monitor's ring) and is serialised in a thread of its own (see ``_ui_offloop``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from . import _ui_flame
from ._monitor import get_monitor
from ._ui_data import Snapshot, event_detail, find_event, to_json, to_json_with
from ._ui_guard import Allow, Guard
from ._ui_history import enable, history_for
from ._ui_http import (
    JSON, NO_STORE, SECURITY, STATIC, ASGIApp, Headers, Receive, Scope, Send, Static, busy,
    gzip_if, not_found, not_http, query, query_int, refuse, respond, route_path, send_static,
)
from ._ui_offloop import Busy, off_loop

__all__ = ["ui_app"]


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"loopwatch: invalid ui_app option {name}={value!r}; allowed: {allowed}")


def ui_app(
    *,
    registry: CollectorRegistry | None = None,
    token: str | None = None,
    allow: Allow | None = None,
    max_events: int = 100,
    history_seconds: int = 600,
    poll_interval: float = 1.0,
) -> ASGIApp:
    """The live page: what blocks the event loop, updated every ``poll_interval`` seconds.

    Mount it: ``app.mount("/loopwatch", loopwatch.ui_app())`` and open ``/loopwatch/``.

    * ``registry`` — the Prometheus registry the middleware writes to (default: the global
      one; with ``PROMETHEUS_MULTIPROC_DIR`` set, every worker's files).
    * ``token`` — if set, every request needs it: ``Authorization: Bearer <token>``, or
      open ``/loopwatch/?token=<token>`` once and the browser keeps a cookie.
    * ``allow`` — ``allow(scope)`` (or an async one) returning True lets a request in;
      anything else, or an exception, answers 403.
    * ``max_events`` — the most recent block events listed (1–1000).
    * ``history_seconds`` — the seconds of loop lag and utilization kept (60–3600), per
      loop, from the moment the monitor starts.
    * ``poll_interval`` — how often an open page asks for news, in seconds (0.5–60).

    A bad value raises :class:`ValueError` naming the option, the value and what is allowed.
    """
    if registry is not None and not isinstance(registry, CollectorRegistry):
        raise _bad("registry", registry, "None or a prometheus_client CollectorRegistry")
    if token is not None and (not isinstance(token, str) or len(token) < 16
                              or not token.isascii() or not token.isprintable()
                              or any(c.isspace() for c in token)):
        raise _bad("token", "<hidden>" if isinstance(token, str) else token,
                   "None or a string of at least 16 printable ASCII characters without spaces")
    if allow is not None and not callable(allow):
        raise _bad("allow", allow, "None or a callable taking the ASGI scope")
    if isinstance(max_events, bool) or not isinstance(max_events, int) \
            or not 1 <= max_events <= 1000:
        raise _bad("max_events", max_events, "an integer from 1 to 1000")
    if isinstance(history_seconds, bool) or not isinstance(history_seconds, int) \
            or not 60 <= history_seconds <= 3600:
        raise _bad("history_seconds", history_seconds, "an integer from 60 to 3600")
    if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) \
            or not math.isfinite(poll_interval) or not 0.5 <= poll_interval <= 60:
        raise _bad("poll_interval", poll_interval, "a number of seconds from 0.5 to 60")
    enable(history_seconds)
    return _UIApp(registry, Guard(token, allow), max_events, float(poll_interval))


class _UIApp:
    """The ASGI app that :func:`ui_app` returns."""

    def __init__(self, registry: CollectorRegistry | None, guard: Guard, max_events: int,
                 poll_interval: float) -> None:
        self.registry = registry
        self.guard = guard
        self.max_events = max_events
        self.poll_interval = poll_interval
        self.static = {name: Static(name) for name in STATIC}
        #: The last flame graph and collapsed text: name -> ((epoch, block count), body,
        #: gzipped body or None when too small to gzip).
        self._cache: dict[str, tuple[tuple[str, int], bytes, bytes | None]] = {}
        self._stacks = _ui_flame.Stacks()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await not_http(scope, receive, send)
            return
        method = scope["method"]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            await respond(send, 405, b"Method Not Allowed\n",
                          [(b"allow", b"GET, HEAD"), (b"content-type", b"text/plain")], False)
            return
        root = scope.get("root_path", "")
        path = route_path(scope)
        headers = {k.lower(): v for k, v in scope.get("headers", ())}
        if path == "":  # the mount point itself: the page's relative URLs need the slash
            raw = scope.get("query_string", b"")
            location = (root + "/").encode() + (b"?" + raw if raw else b"")
            await respond(send, 307, b"", [(b"location", location)], head)
            return
        if path == "/" and self.guard.has_token:
            offered = query(scope).get("token")
            if offered is not None:
                await self._token_in_url(scope, send, root, offered, head)
                return
        verdict = await self.guard.check(scope, headers)
        if verdict != "ok":
            await refuse(send, verdict, head)
            return
        accept_gzip = b"gzip" in headers.get(b"accept-encoding", b"")
        if path == "/" or path.startswith("/static/"):
            name = "index.html" if path == "/" else path[len("/static/"):]
            static = self.static.get(name)
            if static is None or name == "index.html" and path != "/":
                await not_found(send, head)
                return
            await send_static(send, static, headers, accept_gzip, head)
            return
        if not path.startswith("/api/"):
            await not_found(send, head)
            return
        await self._api(scope, send, path[len("/api/"):], accept_gzip, head)

    async def _token_in_url(self, scope: Scope, send: Send, root: str, offered: str,
                            head: bool) -> None:
        if not self.guard.token_matches(offered):
            await refuse(send, "token", head)
            return
        # Set the cookie and drop the token from the address bar and the history.
        cookie = self.guard.cookie_header(root + "/", scope.get("scheme") == "https")
        location = (root + "/").encode()
        await respond(send, 303, b"", [(b"location", location), (b"set-cookie", cookie), NO_STORE],
                      head)

    async def _api(self, scope: Scope, send: Send, name: str, accept_gzip: bool,
                   head: bool) -> None:
        monitor = get_monitor()
        if monitor is None:
            body = to_json({"monitoring": False, "pid": os.getpid(), "detail": (
                "loopwatch is not watching this event loop: add LoopWatchMiddleware to the app")})
            status = 200 if name == "state" else 404
            await respond(send, status, body, [JSON, NO_STORE, *SECURITY], head)
            return
        history = history_for(monitor)
        params = query(scope)
        work: Callable[..., tuple[bytes, bool]]
        args: tuple[Any, ...]
        content_type = JSON
        extra: Headers = []
        if name == "state":
            snapshot = Snapshot.take(
                monitor, history, epoch=params.get("epoch", ""),
                since=query_int(params, "since", -1),
                since_point=query_int(params, "since_point", -1),
                max_events=self.max_events, poll_interval=self.poll_interval,
                registry=self.registry,
            )
            work, args = _encode_state, (snapshot, accept_gzip)
        elif name == "event":
            seq = query_int(params, "seq", -1)
            event = find_event(monitor, seq) if params.get("epoch") == history.epoch else None
            if event is None:
                body = to_json({"detail": "this event is no longer in the monitor's ring"})
                await respond(send, 404, body, [JSON, NO_STORE, *SECURITY], head)
                return
            work, args = _encode_event, (seq, event, accept_gzip)
        elif name in ("flame", "collapsed.txt"):
            key = (history.epoch, monitor.block_count)
            cached = self._cache.get(name)
            if name == "collapsed.txt":
                content_type = (b"content-type", b"text/plain; charset=utf-8")
                extra = [(b"content-disposition",
                          f'attachment; filename="loopwatch-blocks-{os.getpid()}.txt"'.encode())]
            if cached is not None and cached[0] == key:
                _, plain, packed = cached
                if accept_gzip and packed is not None:
                    await self._send_body(send, packed, True, content_type, extra, head)
                else:
                    await self._send_body(send, plain, False, content_type, extra, head)
                return
            news = self._stacks.news(history.epoch, monitor.block_count, monitor.blocks)
            while news.more:  # a long backlog: label it in steps, the loop free between them
                try:
                    await off_loop(_label, news, self._stacks)
                except Busy:
                    await busy(send, head)
                    return
                news = self._stacks.news(history.epoch, monitor.block_count, monitor.blocks)
            work, args = _encode_stacks, (name, news, self._stacks, self._cache, accept_gzip)
        else:
            await not_found(send, head)
            return
        try:
            body, gzipped = await off_loop(work, *args)
        except Busy:
            await busy(send, head)
            return
        await self._send_body(send, body, gzipped, content_type, extra, head)

    @staticmethod
    async def _send_body(send: Send, body: bytes, gzipped: bool, content_type: tuple[bytes, bytes],
                         extra: Headers, head: bool) -> None:
        headers = [content_type, NO_STORE, (b"vary", b"Accept-Encoding"), *SECURITY, *extra]
        if gzipped:
            headers.append((b"content-encoding", b"gzip"))
        await respond(send, 200, body, headers, head)


# -- in the worker thread -------------------------------------------------------------------

def _encode_state(snapshot: Snapshot, accept_gzip: bool) -> tuple[bytes, bool]:
    return gzip_if(snapshot.encode(), accept_gzip)


def _encode_event(seq: int, event: Any, accept_gzip: bool) -> tuple[bytes, bool]:
    return gzip_if(event_detail(seq, event, os.getcwd()), accept_gzip)


def _label(news: _ui_flame.News, stacks: _ui_flame.Stacks) -> None:
    with stacks.lock:
        stacks.update(news, os.getcwd())


def _encode_stacks(name: str, news: _ui_flame.News, stacks: _ui_flame.Stacks,
                   cache: dict[str, Any], accept_gzip: bool) -> tuple[bytes, bool]:
    with stacks.lock:
        stacks.update(news, os.getcwd())
        totals = stacks.totals
        if name == "flame":
            # Two flat trees, [depth, label, ms, library] in preorder, one after the other.
            user = _ui_flame.flame(totals, stacks, True)
            every = _ui_flame.flame(totals, stacks, False)
            body = to_json_with({"events": news.length, "stacks": len(totals),
                                 "max_nodes": _ui_flame.MAX_NODES, "user_nodes": len(user)},
                                "nodes", user + every, chunk=64)
        else:
            body = _ui_flame.collapsed(totals).encode()
    packed, gzipped = gzip_if(body, True)
    # One assignment of a whole entry: the loop reads it without a lock.
    cache[name] = ((news.epoch, news.blocks), body, packed if gzipped else None)
    return (packed, True) if gzipped and accept_gzip else (body, False)


