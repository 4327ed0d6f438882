"""Bounded label values: the route template and the HTTP method of a request.

The ``route`` label is always a template of the app's own routing (``/users/{user_id}``,
``/blobs/{bucket}/k/{key}``), never the request's concrete path: a label made from a path lets
any client mint series. Starlette and FastAPI leave the matched route's endpoint in
``scope["endpoint"]`` (every version loopwatch supports, every kind of route: decorators,
``add_route``, ``add_api_route``, ``include_router``, ``Mount``, ``Host``, nested), and
``scope["route"]`` only for some of them. So :class:`RouteIndex` walks the app's route tree
once, keeps each endpoint's full template (the templates of the mounts above it joined to its
own), and a request's label is one dictionary lookup of its endpoint.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OTHER_METHOD", "UNMATCHED", "RouteIndex", "method_label"]

UNMATCHED = "<unmatched>"
OTHER_METHOD = "_OTHER"
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_MAX_DEPTH = 32  # mounts within mounts: deeper than any real app, and no cycle runs away
_REBUILD_SECONDS = 1.0  # an endpoint the index does not know: look again at most this often
_PARAM = re.compile(r"{([^{}:]+)(?::([^{}]+))?}")


def method_label(method: Any) -> str:
    """The method itself for the standard ones; ``_OTHER`` for anything a client invents."""
    return method if method in _METHODS else OTHER_METHOD


@dataclass(frozen=True)
class _Target:
    """Where an endpoint sits in the route tree."""

    label: str  #: the route label of a request it served
    route: Any  #: the route (or mount) object
    regex: re.Pattern[str] | None  #: its full template as a regex (to tell apart duplicates)
    #: The template of the mounts above it as a regex, matched by a request's concrete
    #: root_path; None at the top level (no mount).
    mount: re.Pattern[str] | None


@dataclass
class _Index:
    by_endpoint: dict[int, list[_Target]] = field(default_factory=dict)
    #: What the tree looked like: (id, template) of every route, in order.
    shape: tuple[tuple[int, str], ...] = ()
    #: (full mount template as a regex, its label) of every mount, the longest first.
    mounts: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    built: float = 0.0


class RouteIndex:
    """The route templates of one application, by endpoint.

    ``app`` is found on the first request: ``scope["app"]`` as it enters the middleware
    (Starlette and FastAPI set it to themselves), else the app the middleware wraps.
    """

    __slots__ = ("_app", "_base_root", "_endpoints", "_fallback", "_index")

    def __init__(self, fallback_app: Any) -> None:
        self._fallback = fallback_app
        self._app: Any = None
        self._base_root = ""  #: root_path as requests enter (a server's --root-path)
        self._index = _Index()
        #: endpoint id -> the endpoint itself: ids are only trusted while it lives.
        self._endpoints: dict[int, Any] = {}

    def enter(self, scope: MutableMapping[str, Any]) -> None:
        """Called as a request enters the middleware, before any routing; cheap after the
        first time."""
        if self._app is None:
            app = scope.get("app")
            self._app = app if app is not None else self._fallback
            root = scope.get("root_path")
            self._base_root = root if isinstance(root, str) else ""
            self._build()

    def label(self, scope: MutableMapping[str, Any]) -> tuple[str, bool]:
        """(route label, whether the endpoint alone decides it), once the request has been
        routed (or not): the template of the route that served it, ``<mount>/{path}`` for
        a request that ended in a mounted app without routes of its own, else
        ``<unmatched>``."""
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return UNMATCHED, False
        targets = self._targets(endpoint)
        if targets is None and time.monotonic() - self._index.built >= _REBUILD_SECONDS:
            self._build()  # a route added since (or a first look)
            targets = self._targets(endpoint)
        if targets is None:
            return self._mount_of(scope), False
        # Only where the request was: the same endpoint may also serve routes of a mounted
        # app that the index cannot see (one wrapped in middleware).
        relative = self._relative_root(scope)
        here = [t for t in targets if (t.mount.fullmatch(relative) if t.mount is not None
                                       else relative == "")]
        if not here:
            return self._mount_of(scope), False
        if len(here) == 1:
            return here[0].label, len(targets) == 1 and relative == ""
        return self._choose(here, scope), False

    def template_of(self, path: str) -> str:
        """The template of the first route whose template matches ``path`` (a request not
        routed yet, e.g. a shed one), else ``<unmatched>``: one regex per route."""
        base = self._base_root
        if base and path.startswith(base):
            path = path[len(base):]
        for targets in list(self._index.by_endpoint.values()):
            for target in targets:
                if target.regex is not None and target.label != UNMATCHED \
                        and target.regex.fullmatch(path):
                    return target.label
        return UNMATCHED

    def _relative_root(self, scope: MutableMapping[str, Any]) -> str:
        root = scope.get("root_path")
        if not isinstance(root, str):
            return ""
        base = self._base_root
        return root[len(base):] if base and root.startswith(base) else root

    # -- the index -----------------------------------------------------------------------

    def refresh(self) -> bool:
        """Look at the routes again (once a second, off the request path); True when they
        changed since the index was built, and it was rebuilt."""
        if self._app is None:
            return False
        shape = _shape(self._app)
        if shape == self._index.shape:
            return False
        self._build()
        return True

    def _targets(self, endpoint: Any) -> list[_Target] | None:
        key = id(endpoint)
        if self._endpoints.get(key) is not endpoint:
            return None
        return self._index.by_endpoint.get(key)

    def _build(self) -> None:
        index = _Index(built=time.monotonic())
        endpoints: dict[int, Any] = {}
        routes = _root_routes(self._app)
        if routes is not None:
            _walk(routes, "", index, endpoints, 0)
        index.mounts.sort(key=lambda m: -len(m[0].pattern))
        index.shape = _shape(self._app)
        self._index = index
        self._endpoints = endpoints

    def _mount_of(self, scope: MutableMapping[str, Any]) -> str:
        """An endpoint the index does not know (inside a mounted app wrapped in middleware,
        say): the deepest mount its concrete ``root_path`` matches, else unmatched."""
        relative = self._relative_root(scope)
        if not relative:
            return UNMATCHED
        for regex, label in self._index.mounts:
            if regex.fullmatch(relative):
                return label
        return UNMATCHED

    def _choose(self, targets: list[_Target], scope: MutableMapping[str, Any]) -> str:
        """One endpoint under several routes: the one that matched (``scope["route"]``
        where the framework sets it), else the one whose template matches the path."""
        route = scope.get("route")
        for target in targets:
            if route is not None and target.route is route:
                return target.label
        path = scope.get("path")
        if isinstance(path, str):
            candidates = [path]
            outer = scope.get("app_root_path")
            if isinstance(outer, str) and outer and path.startswith(outer):
                candidates.append(path[len(outer):])
            for target in targets:
                if target.regex is not None and any(target.regex.fullmatch(p)
                                                    for p in candidates):
                    return target.label
        return targets[0].label


def _routes_of(obj: Any) -> list[Any] | None:
    """The routes of a Starlette/FastAPI app, router, ``Mount`` or ``Host`` (None for
    anything else)."""
    try:
        routes = getattr(obj, "routes", None)
    except Exception:  # noqa: BLE001 - something whose routes cannot be read
        return None
    return routes if isinstance(routes, list) else None


def _root_routes(app: Any) -> list[Any] | None:
    """The routes of the app, or of the first app under the middlewares wrapping it (ASGI
    middlewares keep the app they wrap as ``.app``)."""
    for _ in range(_MAX_DEPTH):
        routes = _routes_of(app)
        if routes is not None or app is None:
            return routes
        app = getattr(app, "app", None)
    return None


def _walk(routes: Iterable[Any], prefix: str, index: _Index, endpoints: dict[int, Any],
          depth: int, mount_prefix: str = "") -> None:
    """Index ``routes``; ``prefix`` is the template above them, ``mount_prefix`` the part of it
    that mounts contributed (a request under them has it, concrete, in root_path)."""
    if depth > _MAX_DEPTH:
        return
    mount_of_prefix = _regex(mount_prefix) if mount_prefix else None
    for route in list(routes):
        included = _included(route)
        if included is not None:
            # A router included lazily (FastAPI >= 0.16x keeps include_router's routers as
            # they are, with the prefix beside them, instead of copying their routes).
            include_prefix, included_routes = included
            _walk(included_routes, prefix + include_prefix, index, endpoints, depth + 1,
                  mount_prefix)
            continue
        sub = _routes_of(route)
        path = getattr(route, "path", None)
        path = path if isinstance(path, str) else ""
        if sub is not None:
            # A Mount (its path is the prefix template) or a Host (no path of its own).
            template = prefix + path
            app = getattr(route, "app", None)
            mount = _regex(mount_prefix + path) if mount_prefix + path else None
            if sub:
                # A request the mounted router did not match ends with the mount's app as
                # its endpoint: unmatched.
                _add(index, endpoints, app, UNMATCHED, route, None, mount)
                _walk(sub, template, index, endpoints, depth + 1, mount_prefix + path)
            else:
                # A mounted app without routes (static files, any ASGI app).
                label = template + "/{path}" if template else UNMATCHED
                _add(index, endpoints, app, label, route, _regex(template + "/{path:path}"),
                     mount)
            if mount_prefix + path:
                index.mounts.append((_regex(mount_prefix + path), template + "/{path}"))
            continue
        endpoint = getattr(route, "endpoint", None)
        if endpoint is not None:
            template = prefix + path
            _add(index, endpoints, endpoint, template or UNMATCHED, route, _regex(template),
                 mount_of_prefix)


def _shape(app: Any) -> tuple[tuple[int, str], ...]:
    """Every route of the tree as (id, path), in order: what a rebuild would index."""
    out: list[tuple[int, str]] = []

    def visit(routes: list[Any] | None, depth: int) -> None:
        if routes is None or depth > _MAX_DEPTH:
            return
        for route in list(routes):
            path = getattr(route, "path", None)
            out.append((id(route), path if isinstance(path, str) else ""))
            included = _included(route)
            visit(included[1] if included is not None else _routes_of(route), depth + 1)

    visit(_root_routes(app), 0)
    return tuple(out)


def _included(route: Any) -> tuple[str, list[Any]] | None:
    """(prefix, routes) of a lazily included router, else None."""
    router = getattr(route, "original_router", None)
    context = getattr(route, "include_context", None)
    prefix = getattr(context, "prefix", None)
    routes = _routes_of(router) if router is not None else None
    if routes is None or not isinstance(prefix, str):
        return None
    return prefix, routes


def _add(index: _Index, endpoints: dict[int, Any], endpoint: Any, label: str, route: Any,
         regex: re.Pattern[str] | None, mount: re.Pattern[str] | None) -> None:
    if endpoint is None:
        return
    key = id(endpoint)
    endpoints[key] = endpoint
    targets = index.by_endpoint.setdefault(key, [])
    if not any(t.label == label for t in targets):
        targets.append(_Target(label, route, regex, mount))


def _regex(template: str) -> re.Pattern[str]:
    """A template as a regex: ``{name}`` one segment, ``{name:path}`` the rest."""
    out, last = [], 0
    for match in _PARAM.finditer(template):
        out.append(re.escape(template[last:match.start()]))
        out.append(".*" if match.group(2) == "path" else "[^/]+")
        last = match.end()
    out.append(re.escape(template[last:]))
    return re.compile("".join(out))
