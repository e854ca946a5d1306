"""A new config applied inside a running worker, between two events of its loop.

What a request looks up at its start (the router, the forwarded policy, limits and timeouts)
is replaced on the context, so a request in flight keeps the route it planned with and the next
one on the same connection finds the new config. Upstream pools whose address is still used
are kept with their idle connections; the others close their idle connections and take no
more. A WebSocket tunnel is kept when its host (by name) still routes to its backend address,
with the host's new idle timeout and ping interval; otherwise it is drained: closed with 1001
after drain_timeout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from charon.config.model import Config, Upstream
from charon.worker.http.headers import ForwardedPolicy
from charon.worker.routing import Router

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.upstreams.pool import UpstreamPool


def apply_config(ctx: WorkerContext, config: Config) -> int:
    """Swap `config` in; the number of tunnels set to drain."""
    old_pools = ctx.pools
    ctx.pools = {}
    reused: dict[tuple[str, int], UpstreamPool] = {}
    idle = config.timeouts.idle

    def pool_for(upstream: Upstream) -> UpstreamPool:
        key = upstream.key
        pool = ctx.pools.get(key)
        if pool is None:
            pool = old_pools.get(key)
            if pool is not None:
                pool.upstream = upstream
                pool.idle_timeout = idle
                reused[key] = pool
            else:
                pool = ctx.new_pool(upstream, idle)
            ctx.pools[key] = pool
        return pool

    router = Router(config.hosts, pool_for)
    for key, pool in old_pools.items():
        if key not in reused:
            pool.retire()  # in-flight exchanges still hold it: they close, not release
    server = config.server
    ctx.config = config
    ctx.router = router
    ctx.forwarded = ForwardedPolicy(server.trusted_proxies, server.underscores_in_headers)
    ctx.limits = server.limits
    ctx.timeouts = config.timeouts
    return _retarget_tunnels(ctx, router, server.drain_timeout)


def _retarget_tunnels(ctx: WorkerContext, router: Router, drain_timeout: float) -> int:
    drained = 0
    drain_at = ctx.loop.time() + drain_timeout
    for tunnel in list(ctx.tunnels):
        old = tunnel.route
        route = router.find(old.host_name, tunnel.info.path.encode("latin-1"), old.upstream.key)
        if route is None:
            drained += 1
            tunnel.drain(drain_at)
        else:
            tunnel.retarget(route)
    return drained
