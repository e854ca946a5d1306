"""Keep-alive connections to one backend address, reused most-recent first."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from charon.config.model import Upstream
from charon.worker.upstreams.connecting import Connecting
from charon.worker.upstreams.connection import UpstreamConnection
from charon.worker.upstreams.tls import client_context

if TYPE_CHECKING:
    from charon.worker.http.exchange import Exchange

MAX_IDLE = 256  # idle connections kept per backend; more are closed when released


class UpstreamPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: Upstream, idle_timeout: float):
        self.loop = loop
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self._idle: list[UpstreamConnection] = []  # oldest first
        self.retired = False  # a reload removed its address: released connections close
        # A backend given by name, as the worker last resolved it (resolver.py), sorted: new
        # connections go to each in turn. Empty: connected by name (resolved at each connect).
        self.addresses: tuple[str, ...] = ()
        self._turn = 0

    def connect(self, exchange: Exchange, fd: int = -1) -> Connecting:
        """A connection for `exchange`, to `start`: it hears of it in `connection_made` (via
        `upstream_connected`) and when the connect is complete (`connect_done`). `fd`: one
        already connected (the front door's dial, plain backends only), taken over instead of
        a new connect. uvloop sets TCP_NODELAY on every TCP transport itself. An https://
        backend's connection is made once its TLS handshake is done (within the connect
        deadline)."""
        factory = partial(UpstreamConnection, self, exchange)
        upstream = self.upstream
        if fd >= 0:
            sock = socket.socket(fileno=fd)  # (its family from the socket: a name's address)
            coro = _take_over(self.loop, factory, sock)
        elif upstream.tls:
            coro = self.loop.create_connection(
                factory,
                self.next_host(),
                upstream.port,
                ssl=client_context(upstream.tls_verify, upstream.tls_ca),
                server_hostname=upstream.host,
            )
        else:
            coro = self.loop.create_connection(factory, self.next_host(), upstream.port)
        return Connecting(self.loop, coro, exchange.connect_done)

    def next_host(self) -> str:
        """Where the next connection goes: the next resolved address, or the configured host."""
        addresses = self.addresses
        if not addresses:
            return self.upstream.host
        turn = self._turn
        self._turn = turn + 1
        return addresses[turn % len(addresses)]

    def set_addresses(self, addresses: tuple[str, ...]) -> bool:
        """The name resolved to `addresses` (sorted); True if they changed (the idle
        connections, maybe to an address gone, are closed)."""
        if addresses == self.addresses:
            return False
        self.addresses = addresses
        self.close_all()
        return True

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
        if len(self._idle) >= MAX_IDLE or self.retired:
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

    def retire(self) -> None:
        self.retired = True
        self.close_all()


async def _take_over(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], UpstreamConnection],
    sock: socket.socket,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """Serve a connected socket. libuv owns and closes the fd from here on; uvloop detaches
    the socket object when the transport closes, but attaches it only once this resumes, a loop
    turn after connection_made. A transport closed before (the exchange that ends in
    connection_made: a handed-back answer relayed or refused at once) kept the object attached,
    and its finalizer closed the fd number again when the transport was freed: by then maybe a
    new connection's (its client got an EOF, or libuv aborted the worker on epoll_ctl)."""
    transport, protocol = await loop.create_connection(factory, sock=sock)
    sock.detach()  # (on a failure or a cancel, uvloop detaches it itself)
    return transport, protocol
