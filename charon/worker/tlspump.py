"""A TLS connection served by the HTTP path: the engine keeps the session and pumps plaintext
through a socketpair whose other end uvloop serves as an ordinary client connection.

The front door completed the handshake and read the first bytes in C. A WebSocket handshake it
can dial stays in C as a tunnel with its TLS side (door.py); everything else comes here. The
pump is a raw tunnel (no frames walked): the session on the client side, the socketpair on the
other. When either side ends, the pump sends what it still holds to the other side (for at
most the send timeout) and closes; the HTTP path sees its end of the socketpair close as it
would see a TCP client's.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from charon.worker.http.adopted import Handover, adopt_client
from charon.worker.tlsinfo import TlsInfo
from charon.worker.websocket import _engine
from charon.worker.websocket._engine import CLIENT

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.websocket._engine import TlsConn

log = logging.getLogger("charon.worker")


class TlsPump(_engine.Tunnel):
    __slots__ = ("ctx",)
    ctx: WorkerContext

    def on_report(self, flags: int, code: int) -> None:
        # Either side ended: the other gets what is still on its way, then closes.
        self.finish(self.ctx.timeouts.send)
        self.ctx.tls_pumps.discard(self)


def serve_http(
    ctx: WorkerContext, fd: int, peer_ip: str, first_read: bytes, conn: TlsConn,
    handover: Handover | None = None, seat: int = -1,
) -> None:
    """Hand a TLS connection (`fd` with its session `conn`) to the HTTP path (`seat`: see
    adopt_client)."""
    info = TlsInfo(*conn.info())
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pump = TlsPump(ctx.engine.engine, fd, ours.fileno(), 0, adopt=True, raw=True)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    ours.detach()  # the pump's now
    pump.ctx = ctx
    pump.attach_tls(CLIENT, conn)
    try:
        pump.start(b"", b"", b"")
    except BaseException:
        theirs.close()
        raise
    ctx.tls_pumps.add(pump)
    adopt_client(ctx, theirs.detach(), peer_ip, first_read, handover, tls=info, seat=seat)
