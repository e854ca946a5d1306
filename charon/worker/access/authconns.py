"""Keep-alive connections to forward-auth services (worker/access/forward.py), per service.

Every request to a forward-auth route asks the service, so a new TCP (and TLS) connection per
question would cost a handshake per request and leave a TIME_WAIT socket each. A connection
whose answer was complete and kept alive waits here for the next question to the same service
(the same host, port, TLS and CA: `Upstream.key`).

Bounded: at most MAX_IDLE wait per service, each for at most IDLE_TIMEOUT (less than the usual
servers' own keep-alive timeouts, 60-90 s, so the service rarely closes one first). Expired ones
are aborted when the service is next asked; until then one the service closed costs only its
object. A reused connection the service closed meanwhile fails before any byte of the answer:
forward.py then asks again on a new one (the question is a GET: asking twice is safe).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from charon.config.model import Upstream

MAX_IDLE = 16  # idle connections kept per service
IDLE_TIMEOUT = 15.0  # seconds one may wait for the next question

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class AuthConnections:
    """The worker's idle connections, by service."""

    def __init__(self, max_idle: int = MAX_IDLE, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[tuple[object, ...], deque[tuple[float, Connection]]] = {}

    def take(self, upstream: Upstream) -> Connection | None:
        """The most recently used idle connection to `upstream` still open, or None."""
        idle = self._idle.get(upstream.key)
        if not idle:
            return None
        self._expire(idle)
        while idle:
            _, (reader, writer) = idle.pop()
            if not writer.transport.is_closing() and not reader.at_eof():
                return reader, writer
            writer.transport.abort()
        return None

    def give_back(self, upstream: Upstream, connection: Connection) -> None:
        """`connection` answered completely and was kept alive: it may be asked again."""
        idle = self._idle.setdefault(upstream.key, deque())
        self._expire(idle)
        idle.append((time.monotonic(), connection))
        while len(idle) > self.max_idle:
            _, (_, writer) = idle.popleft()
            writer.transport.abort()

    def idle_count(self, upstream: Upstream) -> int:
        return len(self._idle.get(upstream.key, ()))

    def _expire(self, idle: deque[tuple[float, Connection]]) -> None:
        limit = time.monotonic() - self.idle_timeout
        while idle and idle[0][0] < limit:
            _, (_, writer) = idle.popleft()
            writer.transport.abort()


_connections: AuthConnections | None = None


def auth_connections() -> AuthConnections:
    """This worker's (made on first use, after the fork)."""
    global _connections
    if _connections is None:
        _connections = AuthConnections()
    return _connections
