"""Known blocking calls and the async replacement to suggest for each.

The watchdog matches a stack sampled while the loop was blocked. Library frames are matched
by module name (``requests.sessions``, ``subprocess``); calls into C, which leave no frame of
their own, are matched on the source line of the innermost Python frame (``time.sleep(...)``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from ._events import Frame

__all__ = ["CPU_HINT", "GIL_HINT", "PAUSE_HINT", "hint_for"]

REQUESTS_HINT = (
    "requests is synchronous and blocks the event loop: use a shared httpx.AsyncClient "
    "and `await client.get(...)`"
)
HTTPX_SYNC_HINT = (
    "httpx.Client / httpx.get() are synchronous: use a shared httpx.AsyncClient "
    "and `await client.get(...)`"
)
URLLIB_HINT = (
    "urllib/http.client are synchronous: use httpx.AsyncClient and `await client.get(...)`"
)
SLEEP_HINT = "time.sleep() blocks the event loop: use `await asyncio.sleep(...)`"
FILE_HINT = (
    "blocking file I/O (open().read/write): use `await asyncio.to_thread(...)` or aiofiles"
)
SUBPROCESS_HINT = (
    "subprocess.run/check_output/call block until the child exits: use "
    "`await asyncio.create_subprocess_exec(...)`"
)
PSYCOPG2_HINT = "psycopg2 is synchronous: use asyncpg or SQLAlchemy's AsyncSession"
PYMONGO_HINT = "pymongo is synchronous: use motor (the async MongoDB driver)"
SOCKET_HINT = (
    "a blocking socket call: use asyncio streams (`await asyncio.open_connection(...)`) "
    "or loop.sock_recv/sock_sendall"
)
CPU_HINT = (
    "CPU-bound Python code is running on the event loop: move it to a process pool "
    "(`await loop.run_in_executor(process_pool, fn, ...)`) or, for short work, "
    "`await asyncio.to_thread(fn, ...)`"
)
GIL_HINT = (
    "the loop thread kept the GIL for the whole block, as CPU-bound C code does (a large "
    "sum(), regex or JSON parse): run it in a process pool with "
    "`await loop.run_in_executor(...)`"
)

PAUSE_HINT = (
    "the whole process stood still (SIGSTOP, a debugger, a container or VM whose CPU was "
    "taken away) in the middle of a short step: not the code's block; look at the host"
)

# (module prefix, hint): a frame whose module starts with the prefix names the culprit.
# The library the user's own code called is tried first (see hint_for), and the rules in
# this order within one frame.
_MODULE_RULES: tuple[tuple[str, str], ...] = (
    ("requests", REQUESTS_HINT),
    ("urllib3", REQUESTS_HINT),
    ("httpx._api", HTTPX_SYNC_HINT),
    ("psycopg2", PSYCOPG2_HINT),
    ("psycopg", PSYCOPG2_HINT),
    ("pymongo", PYMONGO_HINT),
    ("subprocess", SUBPROCESS_HINT),
    ("urllib.request", URLLIB_HINT),
    ("http.client", URLLIB_HINT),
)

# Source-line patterns for calls into C, tried on the innermost frames.
_LINE_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bsleep\s*\("), SLEEP_HINT),
    (re.compile(r"\b(requests|session)\.(get|post|put|patch|delete|head|request)\s*\("),
     REQUESTS_HINT),
    (re.compile(r"\bsubprocess\.\w+\s*\(|\bos\.(system|popen|wait)\s*\("), SUBPROCESS_HINT),
    (re.compile(r"\.(recv|recv_into|recvfrom|sendall|accept|connect)\s*\(|\bcreate_connection\s*\("),
     SOCKET_HINT),
    # (an asyncio transport's or stream writer's write never blocks: it sends what the
    # socket takes and buffers the rest)
    (re.compile(r"\bopen\s*\(|(?<!transport)(?<!writer)\.(read|readline|readlines|write|read_text|"
                r"read_bytes|write_text|write_bytes)\s*\("), FILE_HINT),
)

# The event loop's and the server's own modules: what runs inside them (asyncio's TLS through
# ssl.SSLObject, a transport's send) is how they read and send, never a call the user should
# replace.
_MACHINERY = frozenset({"asyncio", "uvloop", "uvicorn"})

# The standard library's modules whose frames are a socket's calls.
_SOCKET_MODULES = frozenset({"socket", "ssl", "selectors"})

_DB_LINE = re.compile(r"\.(execute|executemany|fetchone|fetchall|fetchmany|commit)\s*\(")
_MONGO_LINE = re.compile(r"\.(find|find_one|insert_one|insert_many|update_one|aggregate)\s*\(")


def hint_for(frames: Sequence[Frame], lines: Sequence[str], cpu_bound: bool) -> str | None:
    """The async replacement for what ``frames`` (innermost first) were blocked in.

    ``lines`` holds the source text of the innermost frames, in the same order (it may be
    shorter); ``cpu_bound`` says whether the loop thread was seen executing different
    bytecode in two samples of the same block.

    The hint names the library the user's code called, not the layer it is built on:
    ``requests.get`` blocks in ``http.client`` and ``socket``, and the hint is the one for
    requests. So library frames are tried from the outermost one inside the user's
    innermost frame inwards.
    """
    for frame in _called_libraries(frames):
        hint = _module_hint(frame)
        if hint is not None:
            return hint
    if _in_machinery(frames):
        return CPU_HINT if cpu_bound else None
    if frames and frames[0].module in _SOCKET_MODULES:
        # socket.py's and ssl.py's own lines wrap the socket's C calls: an SSL socket's
        # recv is `self._sslobj.read(len)`, a socket's read, not a file's
        return SOCKET_HINT
    for text in lines[:2]:
        if _DB_LINE.search(text) and ("psycopg2" in sys.modules or "psycopg" in sys.modules):
            return PSYCOPG2_HINT
        if _MONGO_LINE.search(text) and "pymongo" in sys.modules:
            return PYMONGO_HINT
        for pattern, hint in _LINE_RULES:
            if pattern.search(text):
                return hint
    for frame in frames:
        if frame.module in _SOCKET_MODULES:
            return SOCKET_HINT
    if cpu_bound:
        return CPU_HINT
    return None


def _in_machinery(frames: Sequence[Frame]) -> bool:
    """Whether the innermost frames, before any of the user's code, reach the loop's or the
    server's own (see _MACHINERY): the block is in their work, not in a call of the user's."""
    for frame in frames:
        if frame.module.partition(".")[0] in _MACHINERY:
            return True
        if not frame.is_library:
            return False
    return False


def _called_libraries(frames: Sequence[Frame]) -> list[Frame]:
    """The library frames the innermost user frame called into, outermost first (all
    frames, outermost first, when there is no user frame)."""
    for i, frame in enumerate(frames):
        if not frame.is_library:
            return list(reversed(frames[:i]))
    return list(reversed(frames))


def _module_hint(frame: Frame) -> str | None:
    if frame.module == "httpx._client" and frame.function.startswith("Client."):
        return HTTPX_SYNC_HINT
    for prefix, hint in _MODULE_RULES:
        if frame.module == prefix or frame.module.startswith(prefix + "."):
            return hint
    return None
