"""Host routing: exact domain, then the longest wildcard, then an explicit catch-all "*"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from charon.config.model import (
    Backends,
    Config,
    ProxyHost,
    Timeouts,
    Upstream,
    WebSocketSettings,
)
from charon.config.rules import Rules
from charon.worker.http.headerrules import HeaderRules, header_rules
from charon.worker.upstreams.group import GroupMaker, TargetGroup

if TYPE_CHECKING:
    from charon.worker.access.route import RouteRules, RulesMaker
    from charon.worker.upstreams.pool import UpstreamPool


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the proxy host it matched and the location inside it, if any."""

    host: ProxyHost
    upstream: Upstream  # the first target's (for messages naming one backend)
    timeouts: Timeouts
    websocket: WebSocketSettings
    backends: Backends
    group: TargetGroup  # its targets with the worker's pools and health, found once
    host_name: str  # host.name, the label of logs and metrics
    generation: int  # the router's (see Router.generation)
    hsts: bytes | None = None  # host.hsts, ready for the response head (sent over TLS only)
    rules: RouteRules | None = None  # access, auth, limits, header rules; None: none to apply
    max_body_size: int = 0  # request body bytes past which the answer is 413 (0: no limit)
    headers: HeaderRules | None = None  # request/response header rules, host_header; None: none


# A proxy host's routes: (location prefix, route) longest first, and the host's own route.
HostRoutes = tuple[tuple[tuple[bytes, Route], ...], Route]


class Router:
    """Each host's routes are built on its first request, not when the router is: a reload of
    1,000 hosts then costs their domain names only (bench/reload_apply.py)."""

    def __init__(
        self,
        hosts: tuple[ProxyHost, ...],
        pool_for: Callable[[Upstream], UpstreamPool],
        generation: int = 0,
        https_port: int = 443,
        acme_state_dir: str | None = None,
        groups: GroupMaker | None = None,
        rules: RulesMaker | None = None,
    ) -> None:
        # +1 per config applied in place: a tunnel whose route is older was planned before
        # the reload and is matched against this router when it opens (tunnel.py).
        self.generation = generation
        # Where force_https redirects to: ":port" after the host, empty for 443.
        self.https_port = b"" if https_port == 443 else b":%d" % https_port
        # Where HTTP-01 challenge answers are (http/acme_challenge.py); None: no ACME host.
        self.acme_state_dir = acme_state_dir
        # Makes each route's TargetGroup (pools, health, telemetry of its targets).
        self._groups = groups if groups is not None else GroupMaker(pool_for)
        # Makes each route's RouteRules (None: rules are not applied, as in unit tests).
        self._rules = rules
        self._exact: dict[bytes, HostRoutes] = {}  # filled from _exact_hosts as names are asked
        self._exact_hosts: dict[bytes, ProxyHost] = {}
        self._wildcards: dict[bytes, HostRoutes] = {}  # ".example.org" -> routes
        self._wildcard_hosts: dict[bytes, ProxyHost] = {}
        self._catch_all: HostRoutes | None = None
        self._catch_all_host: ProxyHost | None = None
        self._by_name: dict[str, ProxyHost] = {}  # host.name -> host, for open tunnels
        self._built: dict[int, HostRoutes] = {}  # id(host) -> its routes, shared by its names
        exact = self._exact_hosts
        wildcards = self._wildcard_hosts
        for host in hosts:
            domains = host.domains
            self._by_name[domains[0]] = host
            for domain in domains:
                if domain.startswith("*"):
                    if domain == "*":
                        self._catch_all_host = host
                    else:
                        wildcards[domain[1:].encode("ascii")] = host
                else:
                    exact[domain.encode("ascii")] = host
        self._hosts = hosts  # keeps every host alive, so id(host) stays unique in _built

    def _routes(self, host: ProxyHost) -> HostRoutes:
        routes = self._built.get(id(host))
        if routes is None:
            routes = self._built[id(host)] = _host_routes(
                host, self._groups, self._rules, self.generation
            )
        return routes

    def _lookup(self, name: bytes) -> HostRoutes | None:
        """The slow path of `route`: a name whose routes are not built yet, or no exact name."""
        host = self._exact_hosts.get(name)
        if host is not None:
            routes = self._exact[name] = self._routes(host)
            return routes
        # A wildcard covers exactly one label: "*.example.org" matches "a.example.org" only.
        dot = name.find(b".")
        if dot > 0:
            suffix = name[dot:]
            built = self._wildcards.get(suffix)
            if built is not None:
                return built
            host = self._wildcard_hosts.get(suffix)
            if host is not None:
                built = self._wildcards[suffix] = self._routes(host)
                return built
        if self._catch_all is None and self._catch_all_host is not None:
            self._catch_all = self._routes(self._catch_all_host)
        return self._catch_all

    def host_for(self, name: bytes) -> ProxyHost | None:
        """The proxy host that `name` (lowercased, without port) routes to, the catch-all
        included: what a TLS connection's SNI name is compared with (decision 7)."""
        routes = self._exact.get(name)
        if routes is None:
            routes = self._lookup(name)
            if routes is None:
                return None
        return routes[1].host

    def route(self, name: bytes, path: bytes) -> Route | None:
        """Where a request for host `name` (lowercased, without port) and `path` goes."""
        routes = self._exact.get(name)
        if routes is None:
            routes = self._lookup(name)
            if routes is None:
                return None
        locations, own = routes
        for prefix, route in locations:
            if path.startswith(prefix):
                return route
        return own

    def find(self, host_name: str, path: bytes, url: str) -> Route | None:
        """After a reload, the route of an open tunnel of host `host_name` to the target
        `url`: the one its path takes if that route still has the target, else any of the
        host's that does; None if the host or that target is gone."""
        host = self._by_name.get(host_name)
        if host is None:
            return None
        locations, own = self._routes(host)
        chosen = own
        for prefix, route in locations:
            if path.startswith(prefix):
                chosen = route
                break
        if url in chosen.group.by_url:
            return chosen
        for route in (own, *(r for _, r in locations)):
            if url in route.group.by_url:
                return route
        return None


def config_router(
    config: Config,
    pool_for: Callable[[Upstream], UpstreamPool],
    generation: int = 0,
    groups: GroupMaker | None = None,
    rules: RulesMaker | None = None,
) -> Router:
    """The router of `config`, with its TLS settings: the port force_https redirects to (the
    first TLS listener's) and the ACME state directory when a host gets certificates over ACME."""
    tls_listen = config.server.tls_listen
    auto = any(host.tls is not None and host.tls.auto for host in config.hosts)
    return Router(
        config.hosts,
        pool_for,
        generation,
        https_port=tls_listen[0].port if tls_listen else 443,
        acme_state_dir=config.tls.state_dir if auto else None,
        groups=groups,
        rules=rules,
    )


def _host_routes(
    host: ProxyHost, groups: GroupMaker, rules_maker: RulesMaker | None, generation: int
) -> HostRoutes:
    hsts = host.hsts.encode("latin-1") if host.hsts else None
    name = host.name

    def route(
        backends: Backends, timeouts: Timeouts, websocket: WebSocketSettings, rules: Rules
    ) -> Route:
        checks = None
        if rules_maker is not None and not rules.bare:
            checks = rules_maker.route_rules(rules, host, backends.name)
        return Route(
            host, backends.upstream, timeouts, websocket, backends,
            groups.group(backends, name), name, generation, hsts, checks, rules.max_body_size,
            header_rules(rules),
        )

    locations = tuple(
        (loc.path.encode("latin-1"),
         route(loc.backends, loc.timeouts, loc.websocket, loc.rules))
        for loc in host.locations
    )
    return locations, route(host.backends, host.timeouts, host.websocket, host.rules)
