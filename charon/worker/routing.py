"""Host routing: exact domain, then the longest wildcard, then an explicit catch-all "*"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from charon.config.model import ProxyHost, Timeouts, Upstream, WebSocketSettings

if TYPE_CHECKING:
    from charon.worker.upstreams.pool import UpstreamPool


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the proxy host it matched and the location inside it, if any."""

    host: ProxyHost
    upstream: Upstream
    timeouts: Timeouts
    websocket: WebSocketSettings
    pool: UpstreamPool  # the worker's connections to `upstream`, found once, not per request
    host_name: str  # host.name, the label of logs and metrics


# A proxy host's routes: (location prefix, route) longest first, and the host's own route.
HostRoutes = tuple[tuple[tuple[bytes, Route], ...], Route]


class Router:
    def __init__(
        self, hosts: tuple[ProxyHost, ...], pool_for: Callable[[Upstream], UpstreamPool]
    ) -> None:
        self._exact: dict[bytes, HostRoutes] = {}
        self._wildcards: dict[bytes, HostRoutes] = {}  # ".example.org" -> routes
        self._catch_all: HostRoutes | None = None
        self._by_name: dict[str, HostRoutes] = {}  # host.name -> routes, for open tunnels
        for host in hosts:
            routes = _host_routes(host, pool_for)
            self._by_name[host.name] = routes
            for domain in host.domains:
                name = domain.encode("ascii")
                if name == b"*":
                    self._catch_all = routes
                elif name.startswith(b"*."):
                    self._wildcards[name[1:]] = routes
                else:
                    self._exact[name] = routes

    def route(self, name: bytes, path: bytes) -> Route | None:
        """Where a request for host `name` (lowercased, without port) and `path` goes."""
        routes = self._exact.get(name)
        if routes is None:
            # A wildcard covers exactly one label: "*.example.org" matches "a.example.org" only.
            dot = name.find(b".")
            if dot > 0:
                routes = self._wildcards.get(name[dot:])
            if routes is None:
                routes = self._catch_all
                if routes is None:
                    return None
        locations, own = routes
        for prefix, route in locations:
            if path.startswith(prefix):
                return route
        return own

    def find(self, host_name: str, path: bytes, upstream: tuple[str, int]) -> Route | None:
        """After a reload, the route of an open tunnel of host `host_name` to `upstream`: the
        one its path takes if it still goes there, else any of the host's that does; None if
        the host or that backend address is gone."""
        routes = self._by_name.get(host_name)
        if routes is None:
            return None
        locations, own = routes
        chosen = own
        for prefix, route in locations:
            if path.startswith(prefix):
                chosen = route
                break
        if chosen.upstream.key == upstream:
            return chosen
        for route in (own, *(r for _, r in locations)):
            if route.upstream.key == upstream:
                return route
        return None


def _host_routes(host: ProxyHost, pool_for: Callable[[Upstream], UpstreamPool]) -> HostRoutes:
    def route(upstream: Upstream, timeouts: Timeouts, websocket: WebSocketSettings) -> Route:
        return Route(host, upstream, timeouts, websocket, pool_for(upstream), host.name)

    locations = tuple(
        (loc.path.encode("latin-1"), route(loc.upstream, loc.timeouts, loc.websocket))
        for loc in host.locations
    )
    return locations, route(host.upstream, host.timeouts, host.websocket)
