"""What every connection of a worker shares: config-derived tables, pools, the loop."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from charon.config.model import Config, Upstream, UpstreamKey
from charon.worker.access.maker import AccessMaker
from charon.worker.http.headers import ForwardedPolicy
from charon.worker.http.sendwatch import SendWatch
from charon.worker.routing import config_router
from charon.worker.telemetry import Telemetry
from charon.worker.tlsserver import TicketKeyRotation, build_server
from charon.worker.upstreams.cookie import cookie_key
from charon.worker.upstreams.group import GroupMaker
from charon.worker.upstreams.health import HealthBoard, TargetHealth
from charon.worker.upstreams.pool import UpstreamPool
from charon.worker.upstreams.resolver import Resolver
from charon.worker.websocket.msgcap import MessageWatch
from charon.worker.websocket.tunnel import TunnelEngine

if TYPE_CHECKING:
    from charon.worker.http.client import ClientConnection
    from charon.worker.listeners import Listeners
    from charon.worker.tlspump import TlsPump
    from charon.worker.websocket.dialled import DialledTunnel
    from charon.worker.websocket.tunnel import Tunnel


class WorkerContext:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: Config,
        telemetry: Telemetry,
        secret: bytes = b"",
    ) -> None:
        """`secret`: the supervisor's, shared by its workers (TLS tickets, sticky cookies); a
        worker without one makes its own (its cookies then mean nothing to other workers)."""
        self.loop = loop
        self.config = config
        server = config.server
        self.forwarded = ForwardedPolicy(server.trusted_proxies, server.underscores_in_headers)
        self.limits = config.server.limits
        self.timeouts = config.timeouts
        self.connections: set[ClientConnection] = set()
        self.tunnels: set[Tunnel] = set()
        self.dialling: set[DialledTunnel] = set()  # handshakes the front door took, until 101
        self.engine = TunnelEngine(loop)  # every tunnel's sockets, on one epoll set
        self.message_watch = MessageWatch(self)  # websocket_max_messages_per_second
        self.send_watch = SendWatch(loop)
        self.telemetry = telemetry
        self.listeners: Listeners | None = None  # set once serving
        self.draining = False
        self.closing_tunnels = False
        self.pools: dict[UpstreamKey, UpstreamPool] = {}
        # Every target's health in this worker, kept across reloads (by backends name and URL).
        self.health = HealthBoard(loop.time)
        # Told when this worker's passive checks mark a target down (the supervisor shares it).
        self.target_down: Callable[[TargetHealth], None] | None = None
        self.resolver = Resolver(loop)  # targets given by name (resolve_interval)
        self.groups = GroupMaker(
            self.pool,
            self.health,
            telemetry.target_totals,
            cookie_key(secret or secrets.token_bytes(32)),
            loop.time,
            self.resolver,
        )
        # Each route's checks (access lists, limits, auth), for this router and each reload's.
        self.rules = AccessMaker(self)
        self.router = config_router(config, self.pool, groups=self.groups, rules=self.rules)
        self.tls_pumps: set[TlsPump] = set()  # TLS connections the HTTP path serves
        self.tls_rotation: TicketKeyRotation | None = None  # set when serving TLS

    def serve_tls(self, ticket_secret: bytes) -> None:
        """Serve TLS listeners: certificates and settings from the config (again on reload)."""
        if self.tls_rotation is None:
            self.tls_rotation = TicketKeyRotation(self.loop, ticket_secret)
        self.apply_tls(self.config)

    def apply_tls(self, config: Config) -> None:
        if self.tls_rotation is None:
            return
        server = build_server(config, self.tls_rotation.secret)
        self.engine.engine.set_tls(server)
        self.tls_rotation.serve(server, config.tls.ticket_key_lifetime)

    def pool(self, upstream: Upstream) -> UpstreamPool:
        pool = self.pools.get(upstream.key)
        if pool is None:
            pool = self.pools[upstream.key] = self.new_pool(upstream, self.timeouts.idle)
        return pool

    def new_pool(self, upstream: Upstream, idle_timeout: float) -> UpstreamPool:
        return UpstreamPool(self.loop, upstream, idle_timeout)

    def close_expired_upstreams(self) -> None:
        """The upstreams' upkeep (once a second): idle connections past their timeout, names
        due to be resolved again."""
        now = self.loop.time()
        for pool in self.pools.values():
            pool.close_expired(now)
        self.resolver.tick()

    def report_metrics(self) -> None:
        if self.tls_rotation is not None:
            self.telemetry.tls_counts(self.engine.engine.take_tls_counts())
        in_flight = sum(1 for conn in self.connections if conn.exchanges)
        self.telemetry.flush_metrics(in_flight, len(self.connections), len(self.tunnels))

    def close_idle_upstreams(self) -> None:
        for pool in self.pools.values():
            pool.close_all()
