"""A new config applied inside a running worker, between two events of its loop.

What a request looks up at its start (the router, the forwarded policy, limits and timeouts)
is replaced on the context, so a request in flight keeps the route it planned with and the next
one on the same connection finds the new config. Upstream pools whose address is still used
are kept with their idle connections; the others close their idle connections and take no
more. A WebSocket tunnel is kept when its host (by name) still has its target (by URL) and
the target is not marked `drain`, with the host's new idle timeout and ping interval;
otherwise it is drained: closed with 1001 after drain_timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from charon.config.model import Config, Upstream
from charon.worker.http.headers import ForwardedPolicy
from charon.worker.proxydoor import proxied_fds
from charon.worker.routing import config_router

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.websocket.tunnel import Tunnel


def apply_config(ctx: WorkerContext, config: Config) -> int:
    """Swap `config` in; the number of tunnels set to drain."""
    old_pools = ctx.pools
    ctx.pools = pools = {}
    idle = config.timeouts.idle
    # The router makes each host's routes, and any pool a new address needs, on the host's
    # first request (ctx.pool); only the pools an address keeps are carried over here.
    for upstream in _upstreams(config):
        key = upstream.key
        pool = old_pools.pop(key, None)
        if pool is not None:
            pool.upstream = upstream
            pool.idle_timeout = idle
            pools[key] = pool
    for pool in old_pools.values():
        pool.retire()  # in-flight exchanges still hold it: they close, not release
    router = config_router(config, ctx.pool, ctx.router.generation + 1, ctx.groups, ctx.rules)
    server = config.server
    ctx.config = config
    ctx.router = router
    ctx.forwarded = ForwardedPolicy(server.trusted_proxies, server.underscores_in_headers)
    ctx.limits = server.limits
    ctx.timeouts = config.timeouts
    # Certificates are read again (changed files, ACME's new ones): new handshakes use them,
    # open TLS connections keep the sessions they have.
    ctx.apply_tls(config)
    if ctx.listeners is not None:  # which listeners take a PROXY header (no rebinding)
        ctx.listeners.set_proxied(proxied_fds(ctx.listeners.fds, config))
    drain_at = ctx.loop.time() + server.drain_timeout
    return sum(not retarget(ctx, tunnel, drain_at) for tunnel in list(ctx.tunnels))


def retarget(ctx: WorkerContext, tunnel: Tunnel, drain_at: float) -> bool:
    """Match an open tunnel against the current config: kept (True) or set to close with 1001
    at loop time `drain_at` (its host, or its target, is gone, or the target is now marked
    `drain`). Also for a tunnel whose handshake was planned before a reload and opened after
    it (tunnel.py's running)."""
    old = tunnel.route
    url = tunnel.target.url if tunnel.target is not None else old.upstream.url
    route = ctx.router.find(old.host_name, tunnel.info.path.encode("latin-1"), url)
    if route is None:
        tunnel.drain(drain_at)
        return False
    state = route.group.by_url[url]
    tunnel.retarget(route, state)
    if state.target.drain:
        tunnel.drain(drain_at)
        return False
    return True


def _upstreams(config: Config) -> list[Upstream]:
    """Every backend the config names, each once (the supervisor sends equal ones shared:
    charon/config/sharing.py, so the identity check below skips most repeats cheaply)."""
    seen: dict[int, Upstream] = {}
    for host in config.hosts:
        for backends in (host.backends, *(location.backends for location in host.locations)):
            for target in backends.targets:
                seen[id(target.upstream)] = target.upstream
    return list(seen.values())
