"""Keep-alive connections to one backend address, reused most-recent first."""

from __future__ import annotations

import asyncio
import socket

from charon.config.model import Upstream
from charon.worker.upstreams.connection import UpstreamConnection

MAX_IDLE = 256  # idle connections kept per backend; more are closed when released


class UpstreamPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: Upstream, idle_timeout: float):
        self.loop = loop
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self._idle: list[UpstreamConnection] = []  # oldest first

    async def connect(self) -> UpstreamConnection:
        _, conn = await self.loop.create_connection(
            lambda: UpstreamConnection(self), self.upstream.host, self.upstream.port
        )
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if conn.closed:
            return
        if len(self._idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        conn.resume_reading()  # it may have been paused for a slow client
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: drop it if it was idle here."""
        if self._idle and conn in self._idle:
            self._idle.remove(conn)

    def close_expired(self, now: float) -> None:
        limit = now - self.idle_timeout
        while self._idle and self._idle[0].idle_since <= limit:
            self._idle.pop(0).close()

    def close_all(self) -> None:
        while self._idle:
            self._idle.pop().close()
