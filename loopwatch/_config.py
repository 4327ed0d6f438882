"""The one configuration object of the loop monitor, validated when it is created."""

from __future__ import annotations

import difflib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

from ._stacks import MAX_FRAMES

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Config", "ConfigOptions"]

_MIN_PROBE_INTERVAL = 0.001  # a probe more often than this would keep the loop busy itself


@dataclass(frozen=True)
class _Option:
    """One setting: its type, default, bounds (inclusive; ``low_open``: above ``low``), and
    what the error message says is allowed."""

    kind: type
    default: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    allowed: str = ""


#: Every setting and its limits: the one place they are written down.
_OPTIONS: dict[str, _Option] = {
    "block_threshold": _Option(float, 0.1, 0.0, 60.0, low_open=True,
                               allowed="a number of seconds > 0 and <= 60"),
    "probe_interval": _Option(float, 0.01, _MIN_PROBE_INTERVAL, None,
                              allowed=f"a number of seconds >= {_MIN_PROBE_INTERVAL} and below "
                                      "block_threshold"),
    "stack_depth": _Option(int, 50, 1, MAX_FRAMES,
                           allowed=f"an integer from 1 to {MAX_FRAMES} (the most frames "
                                   "Python's faulthandler, which reads the stack safely, "
                                   "writes)"),
    "ring_size": _Option(int, 100, 1, 100_000, allowed="an integer from 1 to 100000"),
    "log_blocks": _Option(bool, True, allowed="True or False"),
    "sample_stacks": _Option(bool, True, allowed="True or False"),
}



class ConfigOptions(TypedDict, total=False):
    """The options of :class:`Config` as keyword arguments, for the type checker: every
    ``**options`` of loopwatch (``Config``, ``LoopWatchMiddleware``, ``Monitor``, ``watch``)
    is typed by it. The same names as ``_OPTIONS`` (a test holds the two together)."""

    block_threshold: float
    probe_interval: float
    stack_depth: int
    ring_size: int
    log_blocks: bool
    sample_stacks: bool


_ENV_PREFIX = "LOOPWATCH_"
logger = logging.getLogger("loopwatch")
_warned: set[str] = set()
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bad(name: str, option: _Option, value: Any, owner: str) -> ValueError:
    return ValueError(f"loopwatch: invalid {owner}{name}={value!r}; allowed: {option.allowed}")


class Config:
    """Settings of a loop monitor.

    * ``block_threshold`` — a single callback or task step that holds the loop longer than
      this many seconds is a *block* (default 0.1 s, asyncio's own slow-callback default).
    * ``probe_interval`` — how often the lag probe fires, in seconds (default 0.01 s).
    * ``stack_depth`` — at most this many frames are kept per block event.
    * ``ring_size`` — how many recent block events are kept in memory.
    * ``log_blocks`` — log one WARNING on the ``loopwatch`` logger per block.
    * ``sample_stacks`` — run the watchdog thread that samples the blocking stack.

    A bad value raises :class:`ValueError` naming the option, the value and what is allowed.
    """

    __slots__ = tuple(_OPTIONS)

    block_threshold: float
    probe_interval: float
    stack_depth: int
    ring_size: int
    log_blocks: bool
    sample_stacks: bool

    def __init__(self, **options: Unpack[ConfigOptions]) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ValueError(
                f"loopwatch: unknown option {unknown[0]!r}; allowed options: "
                + ", ".join(sorted(_OPTIONS))
            )
        for name, option in _OPTIONS.items():
            value = options.get(name, option.default)
            object.__setattr__(self, name, _coerce(name, option, value))
        if not self.probe_interval < self.block_threshold:
            raise ValueError(
                f"loopwatch: invalid probe_interval={self.probe_interval!r}; allowed: a number "
                f"of seconds >= {_MIN_PROBE_INTERVAL} and below block_threshold "
                f"({self.block_threshold!r})"
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Unpack[ConfigOptions]
    ) -> Config:
        """Build a config from ``LOOPWATCH_*`` environment variables, then ``overrides``.

        ``LOOPWATCH_BLOCK_THRESHOLD=0.05`` sets ``block_threshold``, and so on. A bad value
        raises :class:`ValueError` naming the variable.
        """
        env = os.environ if environ is None else environ
        _warn_misspelled(env)
        options: dict[str, Any] = {}
        for name, option in _OPTIONS.items():
            var = _ENV_PREFIX + name.upper()
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                options[name] = _parse(option.kind, raw.strip())
            except ValueError:
                raise ValueError(
                    f"loopwatch: invalid environment variable {var}={raw!r}; allowed: "
                    f"{option.allowed}"
                ) from None
        from_env = [name for name in options if name not in overrides]
        options.update(overrides)
        try:
            return cls(**options)
        except ValueError as exc:
            # Name the variables when a bad value, or a bad combination, came from them.
            if from_env:
                variables = ", ".join(
                    f"{_ENV_PREFIX + n.upper()}={env[_ENV_PREFIX + n.upper()]!r}"
                    for n in from_env
                )
                raise ValueError(f"{exc} (set from environment: {variables})") from None
            raise

    def replace(self, **changes: Unpack[ConfigOptions]) -> Config:
        """A copy with some options changed, validated like a new config."""
        options = {name: getattr(self, name) for name in _OPTIONS}
        options.update(changes)
        return Config(**options)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("loopwatch.Config is immutable; use .replace(...)")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Config):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in _OPTIONS)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in _OPTIONS))

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in _OPTIONS)
        return f"Config({args})"


def _warn_misspelled(env: Mapping[str, str]) -> None:
    """Log (once each) a ``LOOPWATCH_*`` variable that is no option but looks like one: a
    misspelled setting would otherwise be ignored without a word."""
    known = [_ENV_PREFIX + name.upper() for name in _OPTIONS]
    for var in env:
        if not var.startswith(_ENV_PREFIX) or var in known or var in _warned:
            continue
        close = difflib.get_close_matches(var, known, n=1, cutoff=0.8)
        if close:
            _warned.add(var)
            logger.warning(
                "loopwatch: ignoring the environment variable %s: no such setting; did you "
                "mean %s? (loopwatch reads: %s)", var, close[0], ", ".join(known),
            )


def _parse(kind: type, raw: str) -> Any:
    if kind is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(raw)
    return kind(raw)


def _coerce(name: str, option: _Option, value: Any, owner: str = "") -> Any:
    """``value`` checked against ``option`` (and made its kind); a ``ValueError`` naming
    ``owner`` (e.g. ``"Admission "``), the option, the value and what is allowed."""
    if option.kind is bool:
        if not isinstance(value, bool):
            raise _bad(name, option, value, owner)
        return value
    # bool is an int subclass; True is never a sensible threshold.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, option, value, owner)
    if option.kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise _bad(name, option, value, owner)
        number: float = int(value)
    else:
        number = float(value)
        if not math.isfinite(number):
            raise _bad(name, option, value, owner)
    low, high = option.low, option.high
    if low is not None and (number <= low if option.low_open else number < low):
        raise _bad(name, option, value, owner)
    if high is not None and number > high:
        raise _bad(name, option, value, owner)
    return number
