"""Clients that do not take their responses (issue #10, exhaustion).

A client whose write buffer is full (uvloop called pause_writing) holds the response, and
the backend connection behind it, for as long as it likes; closing such a connection waits
for the buffer to drain, which may never happen. The watch holds the connections whose
buffer is full, or that are closing with bytes still buffered, and is swept with the
deadlines: one that took no byte for `send` seconds, or took less than `body_min_rate` bytes
per second once `send` seconds have passed, is aborted. It costs nothing per request: a
connection joins only when its buffer fills (or it closes with bytes left).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios
from typing import TYPE_CHECKING

from charon.worker.deadlines import NONE, SEND

if TYPE_CHECKING:
    from charon.config.model import Timeouts
    from charon.worker.http.client import ClientConnection

log = logging.getLogger("charon.worker")

_LINGER_RESET = struct.pack("ii", 1, 0)


def watch_sending(conn: ClientConnection) -> None:
    plan = conn.exchanges[0].plan if conn.exchanges else None
    conn.ctx.send_watch.add(conn, plan.route.timeouts if plan else conn.ctx.timeouts)


# Seconds a closed connection goes on reading (and dropping) what the client still sends.
LINGER = 2.0
LINGER_BYTES = 1 << 20  # ... and at most this many bytes: a client that floods on is cut


def close_transport(conn: ClientConnection, transport: asyncio.Transport) -> None:
    """Close; with bytes still buffered the connection stays open until the client takes
    them, so it is watched. A lingering close (nginx's lingering_close): the FIN goes after
    the last response, and what the client still sends (pipelined requests behind a refused
    one) is read and dropped for LINGER seconds, since closing with unread bytes sends an RST,
    which can destroy the response before the client has read it."""
    if not transport.is_closing() and transport.can_write_eof():
        try:
            transport.write_eof()
            transport.resume_reading()  # (data_received drops it: conn.closing)
        except (OSError, RuntimeError):
            transport.close()
        else:
            conn.ctx.loop.call_later(LINGER, transport.close)
    else:
        transport.close()
    if transport.get_write_buffer_size():
        watch_sending(conn)


def cut_off(transport: asyncio.Transport) -> None:
    """Abort with an RST: a plain close leaves the kernel sending what the socket's buffer
    holds (MiBs) to a client that does not read it."""
    sock = transport.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


def _unsent(transport: asyncio.Transport) -> int:
    """Bytes not yet taken by the client: in the transport's buffer and in the socket's
    (the kernel's can hold MiBs, and the buffer shrinks only once much of it has gone)."""
    size = transport.get_write_buffer_size()
    try:
        fd = transport.get_extra_info("socket").fileno()
        return size + int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0" * 4))[0])
    except (OSError, AttributeError):
        return size


class _Stall:
    __slots__ = ("since", "progress_at", "size", "taken", "send", "rate")

    def __init__(self, now: float, size: int, timeouts: Timeouts) -> None:
        self.since = now
        self.progress_at = now  # when the buffer last shrank
        self.size = size  # bytes unsent when last looked at
        self.taken = 0  # bytes the client took since `since`
        self.send = timeouts.send
        self.rate = timeouts.body_min_rate


class SendWatch:
    """Swept as one deadline source (charon.worker.deadlines)."""

    __slots__ = ("_loop", "_stalled", "deadline", "deadline_kind")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stalled: dict[ClientConnection, _Stall] = {}
        self.deadline = 0.0
        self.deadline_kind = NONE

    def add(self, conn: ClientConnection, timeouts: Timeouts) -> None:
        transport = conn.transport
        if transport is None or conn in self._stalled:
            return
        now = self._loop.time()
        self._stalled[conn] = _Stall(now, _unsent(transport), timeouts)
        self.deadline_kind = SEND
        self.deadline = now  # looked at by every sweep while a connection is watched

    def remove(self, conn: ClientConnection) -> None:
        self._stalled.pop(conn, None)

    def on_deadline(self, kind: int) -> None:
        now = self._loop.time()
        for conn, stall in list(self._stalled.items()):
            transport = conn.transport
            if transport is None:
                del self._stalled[conn]
                continue
            size = _unsent(transport)
            if size < stall.size:
                stall.taken += stall.size - size
                stall.progress_at = now
            stall.size = size
            if size == 0 and not transport.is_closing():
                del self._stalled[conn]  # (resume_writing normally removes it first)
                continue
            late = now - stall.since - stall.send
            if now - stall.progress_at >= stall.send or (
                late > 0 and stall.taken < stall.rate * late
            ):
                del self._stalled[conn]
                log.info(
                    "client %s took %d bytes of its response in %.0f s: cut off",
                    conn.peer_ip, stall.taken, now - stall.since,
                )
                conn.send_timed_out()
        if self._stalled:
            self.deadline_kind = SEND
            self.deadline = now
