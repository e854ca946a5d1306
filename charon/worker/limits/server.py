"""`[server] max_connections` and `max_connections_per_ip`: client TCP connections, decided in
the front door (door.py) for every connection the engine hands over (plain, TLS, PROXY).

The total is the sum of every worker's open client connections in the accept back-off table
(listeners.py's LoadTable, all generations: 256 words, about 2 us to add up), so it
counts connections from their accept on, those that have not sent a byte yet included. The
per-address count is a shared count (counts.py, key `s\\0` + address): its word index is the
connection's *seat*, carried with the connection to wherever it ends (`Listeners.closed_one`)
and given back there once; a worker killed holding seats gives them back through its ledger.

Past either cap a plain connection gets a short 503 (Retry-After: 1, Connection: close) and
is closed, a TLS one is closed (the engine did its handshake already: the front door only
hands over connections it has read from), counted as `denied="connections"` with host "-".
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

from charon.worker.limits import checks, counts

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.limits.counts import CountTable

log = logging.getLogger("charon.worker")

NO_SEAT = -1  # nothing to give back
REFUSED = -3  # the connection was refused (and closed)
WARN_EVERY = 1.0  # seconds between warnings about refused connections

_BODY = b"503 Service Unavailable: too many connections\n"
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n\r\n" % len(_BODY)
) + _BODY

_table: CountTable | None = None
_warned_at = 0.0
_refused = 0


def _seats() -> CountTable:
    global _table
    if _table is None:
        _table = counts.per_ip(ledger=checks.current_ledger())
    return _table


def release(seat: int) -> None:
    """Give back a connection's seat (its per-address count), once."""
    if seat >= 0:
        _seats().release(seat)


def admit(ctx: WorkerContext, fd: int, peer_ip: str, tls: bool) -> int:
    """The connection's seat (NO_SEAT: none held), or REFUSED after answering and closing
    `fd`. Called only when one of the caps is set."""
    server = ctx.config.server
    listeners = ctx.listeners
    table = listeners.table if listeners is not None else None
    if server.max_connections and table is not None and table.total() > server.max_connections:
        _refuse(ctx, fd, peer_ip, tls, "max_connections")
        return REFUSED
    if not server.max_connections_per_ip:
        return NO_SEAT
    seat = _seats().acquire(b"s\0" + peer_ip.encode(), server.max_connections_per_ip)
    if seat == counts.DENIED:
        _refuse(ctx, fd, peer_ip, tls, "max_connections_per_ip")
        return REFUSED
    return seat if seat >= 0 else NO_SEAT


def _refuse(ctx: WorkerContext, fd: int, peer_ip: str, tls: bool, which: str) -> None:
    global _warned_at, _refused
    if not tls:
        with contextlib.suppress(OSError):  # (a fresh socket's buffer takes these bytes)
            os.write(fd, BUSY)
    os.close(fd)
    if ctx.listeners is not None:
        ctx.listeners.closed_one()  # (counted at accept)
    ctx.telemetry.count_denied("-", "connections")
    _refused += 1
    now = time.monotonic()
    if now - _warned_at >= WARN_EVERY:
        log.warning("connection from %s refused: past [server] %s (%d refused since the last "
                    "such warning)", peer_ip, which, _refused)
        _warned_at = now
        _refused = 0
