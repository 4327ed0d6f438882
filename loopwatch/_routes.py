"""Bounded label values: the route template and the HTTP method of a request."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

__all__ = ["UNMATCHED", "method_label", "route_label"]

UNMATCHED = "<unmatched>"
OTHER_METHOD = "_OTHER"
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def method_label(method: str) -> str:
    """The method itself for the standard ones; ``_OTHER`` for anything a client invents."""
    return method if method in _METHODS else OTHER_METHOD


def route_label(scope: MutableMapping[str, Any], root_path: str) -> str:
    """The template of the route that handled the request, never the raw path.

    Starlette and FastAPI leave the matched route in ``scope["route"]``; routers included
    with a prefix carry it in the route's own path, and each ``Mount`` appends its prefix to
    ``scope["root_path"]`` (``root_path`` is what it was when the request entered the
    middleware). Anything that matched no route is ``<unmatched>``.
    """
    route = scope.get("route")
    mounted = scope.get("root_path", "")
    if mounted == root_path and route is not None:
        # The common case, a route of the app itself: one dict lookup after the first time.
        # Routes define __eq__ and so are unhashable: key by id, check identity.
        entry = _plain.get(id(route))
        if entry is not None and entry[0] is route:
            return entry[1]
        template = _template(route, "")
        if len(_plain) < _CACHE_LIMIT:
            _plain[id(route)] = (route, template)
        return template
    prefix = mounted[len(root_path):] if len(mounted) > len(root_path) else ""
    return _template(route, prefix)


_plain: dict[int, tuple[Any, str]] = {}
_CACHE_LIMIT = 10_000


def _template(route: Any, prefix: str) -> str:
    path = getattr(route, "path", None)
    if isinstance(path, str) and not _is_mount(route):
        return prefix + path
    if prefix:
        # The request went into a mounted app that has no routes of its own (static
        # files, an ASGI app) or none that matched: the mount's prefix is its template.
        return prefix + "/{path}"
    return UNMATCHED


def _is_mount(route: Any) -> bool:
    return type(route).__name__ in ("Mount", "Host")
