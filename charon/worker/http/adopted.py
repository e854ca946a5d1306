"""Connections the front door accepted, handed to uvloop as HTTP client connections.

The bytes the front door read are fed to the new `ClientConnection` before any other. A
connection whose WebSocket handshake the engine dialled comes with a `Handover`: the backend's
answer so far (with its socket, the request already sent) or the failure to answer with. A TLS
connection comes as one end of a socketpair that the engine pumps plaintext through, with what
its handshake negotiated (`TlsInfo`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from charon.worker.http.client import ClientConnection
from charon.worker.tlsinfo import TlsInfo
from charon.worker.upstreams.connecting import Connecting

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.upstreams.failure import UpstreamFailure
    from charon.worker.upstreams.group import TargetState

log = logging.getLogger("charon.worker")


class Handover:
    """What the engine did for the first request of a connection it hands over."""

    __slots__ = ("backend_fd", "answered", "failure", "target", "refused", "leases")

    def __init__(
        self,
        backend_fd: int = -1,
        answered: bytes = b"",
        failure: tuple[int, str, UpstreamFailure] | None = None,
        target: TargetState | None = None,
        refused: bool = False,
        leases: list[Callable[[], None]] | None = None,
    ) -> None:
        self.backend_fd = backend_fd  # the request went out on it; -1: none
        self.answered = answered  # what the backend sent on it so far
        self.failure = failure  # (status, detail, why) to answer instead
        self.target = target  # the target dialled: the HTTP path goes on with it
        # Nothing came back (a failed or timed out connect, a close before any answer): the
        # request may go to another target (decision 11), with `failure` if none takes it.
        self.refused = refused
        # What the front door's admission of the request counted (its plan's leases): the
        # HTTP path's plan of it takes them (it is not admitted twice).
        self.leases = leases

    def close(self) -> None:
        """Unused after all (the client left first): the backend connection is cut."""
        leases, self.leases = self.leases, None
        for lease in leases or ():
            lease()
        if self.backend_fd >= 0:
            os.close(self.backend_fd)
            self.backend_fd = -1


def adopt_client(
    ctx: WorkerContext,
    fd: int,
    peer_ip: str,
    first_read: bytes,
    handover: Handover | None = None,
    tls: TlsInfo | None = None,
    seat: int = -1,
) -> None:
    """Serve `fd` as an HTTP client connection. `tls`: it is a TLS connection's plaintext
    socketpair end (tlspump.py), so its peer address is `peer_ip`, not the socket's. `seat`:
    its [server] max_connections_per_ip count, given back when it closes."""
    if tls is not None:
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    except OSError:
        os.close(fd)
        if handover is not None:
            handover.close()
        if ctx.listeners is not None:
            ctx.listeners.closed_one(seat)
        return
    conn = ClientConnection(ctx)
    conn.first_read = first_read
    conn.handover = handover
    conn.seat = seat
    conn.peer_ip = peer_ip  # (a PROXY listener's: the header's source, not the socket's peer)
    if tls is not None:
        conn.tls = tls
    # connect_accepted_socket only waits for connection_made: stepped without a Task.
    coro = ctx.loop.connect_accepted_socket(lambda: conn, sock)
    Connecting(ctx.loop, coro, _adopted).start()


def _adopted(_connecting: Connecting, _conn: Any, exc: BaseException | None) -> None:
    if exc is not None:  # (uvloop closed the socket; connection_lost never comes)
        log.warning("cannot serve an accepted connection: %s", exc)
