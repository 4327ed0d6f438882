"""Settings for the demo and its simulator, read from keyword arguments or the environment.

Every value is checked where it enters: a bad one raises :class:`ConfigError` naming the
setting (or environment variable), the value given and what is allowed, so a typo in a
``docker-compose.yml`` fails at start-up instead of as a confusing timeout under load.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "Settings",
    "Spec",
    "flag",
    "fraction",
    "host",
    "int_range",
    "positive_seconds",
    "url",
]


class ConfigError(ValueError):
    """A setting has a value the demo cannot use."""


@dataclass(frozen=True)
class Spec(Generic[T]):
    """How one setting is parsed from text and which values are allowed."""

    parse: Callable[[str], T]
    check: Callable[[Any], bool]
    allowed: str

    def validate(self, name: str, value: Any) -> None:
        if not self.check(value):
            raise ConfigError(f"{name}={value!r} is invalid: expected {self.allowed}")

    def from_text(self, name: str, raw: str) -> T:
        """Parse ``raw`` (an environment variable, a header) and validate the result."""
        try:
            value = self.parse(raw.strip())
            valid = self.check(value)
        except ValueError:
            valid = False
        if not valid:
            raise ConfigError(f"{name}={raw!r} is invalid: expected {self.allowed}")
        return value

    def from_env(self, environ: Mapping[str, str], name: str, default: T) -> T:
        """The variable ``name`` parsed, or ``default`` when it is unset or empty."""
        raw = environ.get(name)
        return default if raw is None or raw == "" else self.from_text(name, raw)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_seconds() -> Spec[float]:
    return Spec(float, lambda v: _is_number(v) and v > 0, "a number of seconds > 0, e.g. 10 or 0.5")


def int_range(low: int, high: int, unit: str = "") -> Spec[int]:
    suffix = f" ({unit})" if unit else ""
    return Spec(int, lambda v: _is_int(v) and low <= v <= high, f"an integer {low}..{high}{suffix}")


def fraction() -> Spec[float]:
    return Spec(float, lambda v: _is_number(v) and 0 <= v <= 1, "a number 0..1, e.g. 0.05")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_flag(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE | _FALSE:
        return lowered in _TRUE
    raise ValueError(raw)


def flag() -> Spec[bool]:
    return Spec(
        _parse_flag, lambda v: isinstance(v, bool), "one of 1/true/yes/on or 0/false/no/off"
    )


def _is_http_url(value: Any) -> bool:
    if not isinstance(value, str) or any(c.isspace() for c in value):
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError unless the port is a number 0..65535
    except ValueError:  # also "Invalid IPv6 URL"
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _is_host(value: Any) -> bool:
    """An IP address or a DNS name, as a server can bind to."""
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return len(value) <= 253 and _HOST_NAME.fullmatch(value) is not None
    return True


def host() -> Spec[str]:
    return Spec(str, _is_host, "a host name or IP address, e.g. 127.0.0.1, 0.0.0.0 or ::")


def url() -> Spec[str]:
    return Spec(
        str, _is_http_url, "an http:// or https:// URL with a host, e.g. http://127.0.0.1:8001"
    )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """How the demo reaches its upstream services.

    The defaults are the article's: a 10 s timeout with 5 s to connect, and a pool of
    50 connections of which 20 are kept alive between requests. Keeping many more alive
    costs a burst of requests event-loop time in httpcore 1.0's pool, which hands every
    waiting request the same idle connection and retries the losers (docs/performance.md).
    ``analytics_url`` defaults to the simulator's event sink under ``upstream_url``.
    :meth:`from_env` reads each field from the variable named in its metadata
    (``DEMO_UPSTREAM_URL``, ``DEMO_TIMEOUT_SECONDS``, ...).
    """

    upstream_url: str = field(
        default="http://127.0.0.1:8001", metadata={"env": "DEMO_UPSTREAM_URL", "spec": url()}
    )
    analytics_url: str = field(default="", metadata={"env": "DEMO_ANALYTICS_URL", "spec": url()})
    timeout: float = field(
        default=10.0, metadata={"env": "DEMO_TIMEOUT_SECONDS", "spec": positive_seconds()}
    )
    connect_timeout: float = field(
        default=5.0, metadata={"env": "DEMO_CONNECT_TIMEOUT_SECONDS", "spec": positive_seconds()}
    )
    max_connections: int = field(
        default=50, metadata={"env": "DEMO_MAX_CONNECTIONS", "spec": int_range(1, 10_000)}
    )
    max_keepalive_connections: int = field(
        default=20, metadata={"env": "DEMO_MAX_KEEPALIVE_CONNECTIONS", "spec": int_range(0, 10_000)}
    )

    def __post_init__(self) -> None:
        if not self.analytics_url and _is_http_url(self.upstream_url):
            object.__setattr__(
                self, "analytics_url", f"{self.upstream_url.rstrip('/')}/analytics/events"
            )
        for f in fields(self):
            f.metadata["spec"].validate(f"{f.name} ({f.metadata['env']})", getattr(self, f.name))
        if self.max_keepalive_connections > self.max_connections:
            raise ConfigError(
                "max_keepalive_connections (DEMO_MAX_KEEPALIVE_CONNECTIONS)="
                f"{self.max_keepalive_connections} is larger than max_connections"
                f" (DEMO_MAX_CONNECTIONS)={self.max_connections}: a pool cannot keep alive"
                " more connections than it may open"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``DEMO_*`` environment variables; ``overrides`` win over both."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"])
            if raw:
                values[f.name] = f.metadata["spec"].from_text(f.metadata["env"], raw)
        values.update(overrides)
        return cls(**values)
