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


class Router:
    def __init__(
        self, hosts: tuple[ProxyHost, ...], pool_for: Callable[[Upstream], UpstreamPool]
    ) -> None:
        self._exact: dict[bytes, ProxyHost] = {}
        self._wildcards: dict[bytes, ProxyHost] = {}  # ".example.org" -> host
        self._catch_all: ProxyHost | None = None
        self._locations: dict[int, tuple[tuple[bytes, Route], ...]] = {}
        self._host_routes: dict[int, Route] = {}
        for host in hosts:
            for domain in host.domains:
                name = domain.encode("ascii")
                if name == b"*":
                    self._catch_all = host
                elif name.startswith(b"*."):
                    self._wildcards[name[1:]] = host
                else:
                    self._exact[name] = host
            self._host_routes[id(host)] = Route(
                host, host.upstream, host.timeouts, host.websocket, pool_for(host.upstream),
                host.name,
            )
            self._locations[id(host)] = tuple(
                (
                    loc.path.encode("latin-1"),
                    Route(
                        host, loc.upstream, loc.timeouts, loc.websocket, pool_for(loc.upstream),
                        host.name,
                    ),
                )
                for loc in host.locations
            )

    def find_host(self, name: bytes) -> ProxyHost | None:
        """The proxy host for a lowercased host name without port."""
        host = self._exact.get(name)
        if host is not None:
            return host
        # A wildcard covers exactly one label: "*.example.org" matches "a.example.org" only.
        dot = name.find(b".")
        if dot > 0:
            host = self._wildcards.get(name[dot:])
            if host is not None:
                return host
        return self._catch_all

    def route(self, name: bytes, path: bytes) -> Route | None:
        host = self.find_host(name)
        if host is None:
            return None
        for prefix, route in self._locations[id(host)]:
            if path.startswith(prefix):
                return route
        return self._host_routes[id(host)]
