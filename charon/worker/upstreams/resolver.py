"""Backends given by name, resolved in the worker every `resolve_interval` (issue 13).

A target such as `http://app.internal:3000` may stand for several machines. Its pool keeps the
addresses the name last resolved to (sorted, so every worker holds them in the same order)
and opens each new connection to the next of them; the front door can then dial it like a
target given by address. Resolving runs off the request path (`loop.getaddrinfo`, uvloop's
thread pool), looked at with the worker's once-a-second upkeep. A failed resolution keeps the
addresses known before (a resolver hiccup should not take a target out); until the first
answer, connections go by name as uvloop resolves them. resolve_interval = 0: no caching.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from charon.config.values import is_ip_address

if TYPE_CHECKING:
    from charon.worker.upstreams.pool import UpstreamPool

log = logging.getLogger("charon.worker")


class Resolver:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._interval: dict[UpstreamPool, float] = {}  # watched pools, the shortest interval
        self._due: dict[UpstreamPool, float] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._resolving: set[UpstreamPool] = set()

    def watch(self, pool: UpstreamPool, interval: float) -> None:
        """Keep `pool`'s name resolved every `interval` seconds (its first resolution now)."""
        if interval <= 0 or is_ip_address(pool.upstream.host):
            return
        known = self._interval.get(pool)
        self._interval[pool] = min(known, interval) if known is not None else interval
        if known is None:
            self._start(pool)

    def tick(self) -> None:
        """Resolve the names that are due; forget the pools a reload retired."""
        now = self.loop.time()
        for pool in list(self._interval):
            if pool.retired:
                del self._interval[pool]
                self._due.pop(pool, None)
            elif now >= self._due.get(pool, 0.0) and pool not in self._resolving:
                self._start(pool)

    def _start(self, pool: UpstreamPool) -> None:
        self._resolving.add(pool)
        task = self.loop.create_task(self._resolve(pool))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _resolve(self, pool: UpstreamPool) -> None:
        upstream = pool.upstream
        try:
            infos = await self.loop.getaddrinfo(
                upstream.host, upstream.port, type=socket.SOCK_STREAM
            )
            addresses = tuple(sorted({str(info[4][0]) for info in infos}))
            if addresses and pool.set_addresses(addresses):
                log.info("%s resolved to %s", upstream.host, ", ".join(addresses))
        except OSError as exc:
            log.warning("cannot resolve %s (keeping %s): %s", upstream.host,
                        ", ".join(pool.addresses) or "its name", exc)
        finally:
            self._resolving.discard(pool)
            self._due[pool] = self.loop.time() + self._interval.get(pool, 0.0)

    def close(self) -> None:
        for task in self._running:
            task.cancel()
