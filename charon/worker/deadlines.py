"""Per-connection deadlines, checked by one periodic sweep instead of a timer per request.

A connection stores one `deadline` (loop time) and the phase it belongs to; setting it costs an
attribute write on the hot path. The sweep runs every SWEEP_INTERVAL, so a timeout fires up to
that much late.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

SWEEP_INTERVAL = 0.5

# Phases (decision 12). NONE: nothing to wait for (e.g. a WebSocket tunnel with no idle timeout).
NONE = 0
HEADER = 1  # client request head
KEEPALIVE = 2  # client idle between requests
CONNECT = 3  # backend connect
BODY_IDLE = 4  # client request body stalled
FIRST_BYTE = 5  # backend's first response byte
RESPONSE_IDLE = 6  # backend response stalled, or the client not reading it
TUNNEL_IDLE = 7  # WebSocket tunnel: idle limit reached or a ping due
SEND = 8  # clients not taking their responses (http/sendwatch.py)


class HasDeadline(Protocol):
    deadline: float
    deadline_kind: int

    def on_deadline(self, kind: int) -> None: ...


class DeadlineSweeper:
    def __init__(
        self, loop: asyncio.AbstractEventLoop, sources: Callable[[], Iterable[HasDeadline]]
    ) -> None:
        self._loop = loop
        self._sources = sources
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._handle = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _sweep(self) -> None:
        now = self._loop.time()
        expired = [c for c in self._sources() if c.deadline_kind and c.deadline <= now]
        for conn in expired:
            kind = conn.deadline_kind
            conn.deadline_kind = NONE
            conn.on_deadline(kind)
        self._handle = self._loop.call_later(SWEEP_INTERVAL, self._sweep)
