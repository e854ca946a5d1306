"""`websocket_max_messages_per_second`: a tunnel whose client sends more messages than its
route's cap is closed with 1008 (policy violation), both ways.

The engine counts each tunnel's client messages (`messages_in`) as its frames pass; a worker
timer looks at the capped tunnels only, every PERIOD seconds, and closes one whose count grew
by more than `cap x (seconds since the last look + PERIOD)`: the rate is judged over each
period with a burst of one period allowed. So a tunnel is closed within about 2 x PERIOD of
going over, and a client may send up to twice the cap in a single period without being closed.
Uncapped tunnels cost nothing: they are never looked at.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

    from charon.worker.context import WorkerContext
    from charon.worker.routing import Route
    from charon.worker.websocket.tunnel import Tunnel

PERIOD = 0.5  # seconds between looks at the capped tunnels
CLOSE_POLICY_VIOLATION = 1008
REASON = b"message rate limit"


def message_cap(route: Route) -> int:
    """The route's websocket_max_messages_per_second (0: none)."""
    checks = route.rules
    if checks is None:
        return 0
    return checks.rules.websocket_max_messages_per_second


class _Watched:
    __slots__ = ("cap", "count", "at")

    def __init__(self, cap: int, count: int, at: float) -> None:
        self.cap = cap
        self.count = count  # messages_in at the last look
        self.at = at  # when (time.monotonic())


class MessageWatch:
    """The worker's capped tunnels and the timer that looks at them."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.watched: dict[Tunnel, _Watched] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, tunnel: Tunnel, cap: int) -> None:
        """Look at `tunnel` from now on (`cap` 0: stop looking, e.g. after a reload)."""
        if not cap:
            self.watched.pop(tunnel, None)
            return
        seen = self.watched.get(tunnel)
        if seen is not None:
            seen.cap = cap
            return
        self.watched[tunnel] = _Watched(cap, tunnel.messages_in, time.monotonic())
        if self._timer is None:
            self._timer = self.ctx.loop.call_later(PERIOD, self._look)

    def _look(self) -> None:
        self._timer = None
        now = time.monotonic()
        open_tunnels = self.ctx.tunnels
        over = []
        for tunnel, seen in list(self.watched.items()):
            if tunnel not in open_tunnels:  # ended since: forgotten
                del self.watched[tunnel]
                continue
            count = tunnel.messages_in
            if count - seen.count > seen.cap * (now - seen.at + PERIOD):
                over.append(tunnel)
                del self.watched[tunnel]
                continue
            seen.count, seen.at = count, now
        for tunnel in over:
            tunnel.close(CLOSE_POLICY_VIOLATION, REASON)
        if self.watched:
            self._timer = self.ctx.loop.call_later(PERIOD, self._look)
