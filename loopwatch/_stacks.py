"""Reading the loop thread's stack from the watchdog thread, safely on every CPython.

Walking another thread's frames from Python (``sys._current_frames()``, then ``f_back``) races
that thread as it unwinds: a thread switch can happen between two steps of the walk, and on
CPython 3.11 the walk has crashed the process (python/cpython#99110,
getsentry/sentry-python#2386, DataDog/dd-trace-py#13567). loopwatch never does it. It asks
:func:`faulthandler.dump_traceback` — C code written to dump every thread's stack from inside
a signal handler, reading the interpreter's own frame records and creating no frame object —
to write all stacks into an in-memory file, in one call that runs no bytecode and never lets
go of the GIL, so the loop thread cannot move while its stack is read. The text is parsed
afterwards, outside that call.

faulthandler writes at most :data:`MAX_FRAMES` frames per thread (innermost first) for at most
100 threads, and each function's bare name (``co_name``); :func:`qualname` finds the class
afterwards in the function's module, and :func:`module_of` the module from the file name.
"""

from __future__ import annotations

import faulthandler
import os
import re
import sys
import tempfile
import threading
import types
from collections.abc import Iterator
from typing import Any

__all__ = ["MAX_FRAMES", "RawFrame", "StackReader", "module_of", "qualname"]

#: The most frames faulthandler writes for one thread (CPython's MAX_FRAME_DEPTH).
MAX_FRAMES = 100

#: (file, line, bare function name), as faulthandler wrote it.
RawFrame = tuple[str, int, str]

_HEADER = re.compile(r"^(?:Current thread|Thread) 0x([0-9a-fA-F]+)")
_FRAME = re.compile(r'^  File "(.*)", line (\d+|\?\?\?) in (.*)$')
_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


class StackReader:
    """Takes snapshots of one thread's Python stack. One reader per reading thread."""

    __slots__ = ("_fd", "_thread_id")

    def __init__(self, thread_id: int) -> None:
        self._thread_id = thread_id
        self._fd = _memory_file()

    def snapshot(self, depth: int = MAX_FRAMES) -> list[RawFrame] | None:
        """The thread's innermost ``depth`` frames, innermost first; None when the dump did not
        include the thread (it has exited, or it is beyond faulthandler's 100 threads)."""
        fd = self._fd
        if fd < 0:
            raise RuntimeError("loopwatch: the stack reader is closed")
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        # The one step that must not be interrupted: C, no bytecode, the GIL held throughout.
        faulthandler.dump_traceback(fd, all_threads=True)
        size = os.lseek(fd, 0, os.SEEK_CUR)
        text = os.pread(fd, size, 0).decode("ascii", "replace")
        return _parse(text, self._thread_id, depth)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def _memory_file() -> int:
    """A file descriptor of an anonymous regular file (never a pipe, which could fill up and
    block the dump while it holds the GIL)."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            return int(memfd_create("loopwatch-stack", getattr(os, "MFD_CLOEXEC", 0)))
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix="loopwatch-stack-")
    os.unlink(path)
    return fd


def _parse(text: str, thread_id: int, depth: int) -> list[RawFrame] | None:
    lines = iter(text.splitlines())
    for line in lines:
        header = _HEADER.match(line)
        if header is not None and int(header.group(1), 16) == thread_id:
            return _frames(lines, depth)
    return None


def _frames(lines: Iterator[str], depth: int) -> list[RawFrame]:
    frames: list[RawFrame] = []
    for line in lines:
        match = _FRAME.match(line)
        if match is None:
            if line.startswith("  "):  # "  ..." (truncated), "  <no Python frame>"
                continue
            break  # the blank line that ends this thread's section
        if len(frames) < depth:
            file, number, name = match.groups()
            frames.append((_unescape(file), int(number) if number.isdigit() else 0,
                           _unescape(name)))
    return frames


def _unescape(text: str) -> str:
    """faulthandler writes non-ASCII characters as \\xNN, \\uNNNN or \\UNNNNNNNN."""
    if "\\" not in text:
        return text
    return _ESCAPE.sub(lambda m: chr(int(m.group(1)[1:], 16)), text)


# -- what faulthandler leaves out: the module and the class ----------------------------

_modules_by_file: dict[str, str] = {}
_modules_seen = 0
_lock = threading.Lock()


def module_of(file: str) -> str:
    """The name of the imported module whose file this is, or ``""``."""
    with _lock:
        global _modules_seen
        name = _modules_by_file.get(file)
        if name is None and len(sys.modules) != _modules_seen:
            _modules_seen = len(sys.modules)
            for mod_name, module in list(sys.modules.items()):
                path = getattr(module, "__file__", None)
                if isinstance(path, str):
                    _modules_by_file.setdefault(path, mod_name)
            name = _modules_by_file.get(file)
        return name or ""


#: module name -> [(first line, last line, bare name, qualified name)] of its functions.
_code_index: dict[str, list[tuple[int, int, str, str]]] = {}
_INDEXED_MODULES = 1000


def qualname(module: str, line: int, name: str) -> str:
    """``Class.method`` for a method, ``outer.<locals>.inner`` for a nested function; the bare
    ``name`` when the module's functions do not tell (code made by ``exec``, a lambda)."""
    if not module or name.startswith("<"):
        return name
    with _lock:
        index = _code_index.get(module)
        if index is None:
            mod = sys.modules.get(module)
            if mod is None:
                return name
            index = sorted(_index_module(mod))
            if len(_code_index) < _INDEXED_MODULES:
                _code_index[module] = index
    best: tuple[int, str] | None = None
    for first, last, bare, qual in index:
        if first > line:
            break
        if bare == name and line <= last and (best is None or first >= best[0]):
            best = (first, qual)  # the innermost function that spans the line
    return best[1] if best is not None else name


def _index_module(module: types.ModuleType) -> list[tuple[int, int, str, str]]:
    found: list[tuple[int, int, str, str]] = []
    seen: set[int] = set()
    file = getattr(module, "__file__", None)

    def add_code(code: types.CodeType, qual: str) -> None:
        if id(code) in seen or code.co_filename != file:
            return
        seen.add(id(code))
        lines = [n for _, _, n in code.co_lines() if n is not None]
        first = min(lines, default=code.co_firstlineno)
        found.append((min(first, code.co_firstlineno), max(lines, default=first),
                      code.co_name, qual))
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                inner = getattr(const, "co_qualname", None) or f"{qual}.<locals>.{const.co_name}"
                add_code(const, inner)

    def add(obj: Any, depth: int) -> None:
        # Only plain functions, methods, properties and classes: never getattr() on an
        # arbitrary object, whose __getattr__ could do anything.
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        if isinstance(obj, types.FunctionType):
            for _ in range(8):  # functools.wraps chains: the wrapper and what it wraps
                add_code(obj.__code__, obj.__qualname__)
                inner = obj.__dict__.get("__wrapped__")
                if not isinstance(inner, types.FunctionType) or inner is obj:
                    break
                obj = inner
        elif isinstance(obj, property):
            for accessor in (obj.fget, obj.fset, obj.fdel):
                add(accessor, depth + 1)
        elif isinstance(obj, type) and depth < 4 and id(obj) not in seen:
            # Classes of other modules too (a package may re-export them under its own
            # __module__): add_code keeps only this file's code.
            seen.add(id(obj))
            for member in list(obj.__dict__.values()):
                add(member, depth + 1)

    for value in list(vars(module).values()):
        try:
            add(value, 0)
        except Exception:  # noqa: BLE001 - an odd object: its names stay bare
            continue
    return found
