"""PROXY protocol listeners (`[server] proxy_protocol`): each connection's PROXY header is read
here before the front door sees a byte of it.

On such a listener the worker accepts in Python instead of the engine: it reads the header
(peeking, then consuming exactly the header's bytes, so the socket's next byte is the
client's first HTTP or TLS byte), then gives the connection to the engine with
`Engine.admit(fd, source, tls)`, and from there it is served as the front door serves its own
(the WebSocket fast path and TLS in C included), with the header's source address as its peer
address: the start of decision 6's client IP, the access log's, the limits'. LOCAL (v2) and
UNKNOWN (v1) keep the TCP peer.

A header that is malformed, missing (the connection starts with anything else, HTTP or a
ClientHello), cut short by the peer, or not whole within `timeouts.header` closes the
connection without an answer (the peer is a balancer, not a browser), logged at warning with
the TCP peer and the reason, and counted (charon_proxy_protocol_errors_total{reason}).

Which listeners take the header follows a reload in place (`Listeners.set_proxied`): the
listening sockets stay, only who accepts on them changes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

from charon.worker.listeners import fds_bound_to
from charon.worker.proxyproto import MAX_HEADER, ProxyProtocolError, parse

if TYPE_CHECKING:
    import asyncio

    from charon.config.model import Config
    from charon.worker.context import WorkerContext

log = logging.getLogger("charon.worker")

ACCEPTS_PER_EVENT = 16  # as the engine's front door: other work gets its turn
ACCEPT_PAUSE = 1.0  # seconds without accepting after running out of fds


def proxied_fds(fds: list[int], config: Config) -> frozenset[int]:
    """Which listening fds are `[server] proxy_protocol` addresses (by their bound address)."""
    return fds_bound_to(fds, config.server.proxy_protocol)


class _Pending:
    """A connection whose PROXY header is not whole yet."""

    __slots__ = ("sock", "peer", "port", "tls", "got", "timer")

    def __init__(self, sock: socket.socket, peer: str, port: int, tls: bool) -> None:
        self.sock = sock
        self.peer = peer  # the TCP peer (the balancer)
        self.port = port
        self.tls = tls
        self.got = b""  # header bytes consumed so far
        self.timer: asyncio.TimerHandle | None = None


class ProxyDoor:
    """Accepts on the PROXY listeners and reads each connection's header."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.watched: dict[int, socket.socket] = {}  # listening fd -> a wrapper (detached)
        self.pending: set[_Pending] = set()

    def watch(self, fd: int, tls: bool) -> None:
        if fd in self.watched:
            return
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        self.watched[fd] = sock
        self.loop.add_reader(fd, self._accept, sock, tls)

    def unwatch(self, fd: int) -> None:
        sock = self.watched.pop(fd, None)
        if sock is not None:
            self.loop.remove_reader(fd)
            sock.detach()  # the fd is Listeners': it closes it

    def _accept(self, listening: socket.socket, tls: bool) -> None:
        fd = listening.fileno()
        for _ in range(ACCEPTS_PER_EVENT):
            if self.watched.get(fd) is not listening:
                return  # (paused meanwhile by the back-off)
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accepting paused for a second: %s", exc.strerror)
                    self.unwatch(fd)
                    self.loop.call_later(ACCEPT_PAUSE, self._resume, fd, tls)
                return
            sock.setblocking(False)
            listeners = self.ctx.listeners
            if listeners is not None:
                listeners.opened(1)
            pending = _Pending(sock, address[0], address[1], tls)
            self.pending.add(pending)
            pending.timer = self.loop.call_later(
                self.ctx.timeouts.header, self._fail, pending, "timeout",
                f"no whole header within {self.ctx.timeouts.header:g}s",
            )
            self.loop.add_reader(sock.fileno(), self._read, pending)
            # Balancers send the header with the connect: most are whole at once.
            self._read(pending)

    def _resume(self, fd: int, tls: bool) -> None:
        listeners = self.ctx.listeners
        if (
            listeners is not None
            and not listeners.closed
            and not listeners.paused
            and fd in listeners.proxied
        ):
            self.watch(fd, tls)

    def _read(self, pending: _Pending) -> None:
        if pending not in self.pending:
            return
        sock = pending.sock
        try:
            data = sock.recv(MAX_HEADER, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(pending, "closed", f"the connection failed: {exc.strerror}")
            return
        if not data:
            self._fail(pending, "closed", "the connection closed before a whole header")
            return
        seen = pending.got + data
        try:
            header = parse(seen)
        except ProxyProtocolError as exc:
            self._fail(pending, exc.reason, exc.detail)
            return
        # Only the header's bytes are taken off the socket: what follows stays for the
        # engine (HTTP or a ClientHello), as if nothing had been read.
        want = len(data) if header is None else header.consumed - len(pending.got)
        try:
            taken = sock.recv(want)
        except OSError as exc:
            self._fail(pending, "closed", f"the connection failed: {exc.strerror}")
            return
        if len(taken) != want:  # (cannot happen: those bytes were there to peek)
            self._fail(pending, "closed", "the connection lost bytes it had sent")
            return
        if header is None:
            pending.got = seen
            return
        self._done(pending, header.source or pending.peer)

    def _forget(self, pending: _Pending) -> None:
        self.pending.discard(pending)
        if pending.timer is not None:
            pending.timer.cancel()
            pending.timer = None
        self.loop.remove_reader(pending.sock.fileno())

    def _done(self, pending: _Pending, peer_ip: str) -> None:
        # [server] max_connections_per_ip (limits/server.py) is not checked here: an admitted
        # connection reaches door.arrived as an engine-accepted one does, with `peer_ip` (the
        # header's source) as its address, so a check made there covers PROXY listeners too.
        self._forget(pending)
        fd = pending.sock.detach()
        try:
            self.ctx.engine.engine.admit(fd, peer_ip, pending.tls)
        except Exception as exc:
            os.close(fd)
            log.warning("cannot serve a connection from %s port %d (PROXY header read): %s",
                        pending.peer, pending.port, exc)
            self._uncount()

    def _fail(self, pending: _Pending, reason: str, detail: str) -> None:
        if pending not in self.pending:
            return
        self._forget(pending)
        pending.sock.close()
        log.warning("PROXY protocol: connection from %s port %d closed: %s",
                    pending.peer, pending.port, detail)
        self.ctx.telemetry.proxy_protocol_error(reason)
        self._uncount()

    def _uncount(self) -> None:
        listeners = self.ctx.listeners
        if listeners is not None:
            listeners.closed_one()
