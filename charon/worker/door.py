"""The front door: what becomes of each connection the engine accepted (door.c).

The engine accepts on the listening sockets and reads each new connection once. A connection
whose first read is a whole WebSocket handshake for a backend at an IP address becomes a
`DialledTunnel` at once: its request is planned here as the HTTP path plans one, and the engine
dials the backend, checks the 101 and starts the tunnel without uvloop or another Python step.
Every other connection, and a handshake this path does not take, goes to uvloop as HTTP with
the bytes already read (`adopt_client`), exactly as if uvloop had accepted it.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from charon.worker.http.adopted import adopt_client
from charon.worker.http.errors import HttpError
from charon.worker.http.request import BODY_NONE, plan_request
from charon.worker.websocket.dialled import DialledTunnel, Handshake

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.websocket._engine import Arrival, SplitHead

_ip_literals: dict[str, bool] = {}


def _is_ip(host: str) -> bool:
    known = _ip_literals.get(host)
    if known is None:
        try:
            ipaddress.ip_address(host)
            known = True
        except ValueError:
            known = False  # a name: uvloop resolves it on the HTTP path
        _ip_literals[host] = known
    return known


def arrived(ctx: WorkerContext, arrivals: list[Arrival] | None, accepted: int) -> None:
    """Serve what the front door took in. Open client connections are counted (for accept
    back-off) from the accept on, silent ones waiting in the engine included; they are
    uncounted when they close, whichever path served them."""
    if accepted and ctx.listeners is not None:
        ctx.listeners.opened(accepted)
    if arrivals is None:
        return
    for fd, peer_ip, first_read, head in arrivals:
        if head is None or ctx.draining or not _dial(ctx, fd, peer_ip, first_read, head):
            adopt_client(ctx, fd, peer_ip, first_read)


def _dial(ctx: WorkerContext, fd: int, peer_ip: str, first_read: bytes, head: SplitHead) -> bool:
    """Open a tunnel that dials the backend, if this handshake is one the HTTP path would
    forward as it is; False leaves the connection to the HTTP path, which answers the rest."""
    method, target, fields, head_len = head
    limits = ctx.limits
    if (
        len(fields) > limits.max_header_count
        or head_len > limits.max_header_bytes
        or len(target) > limits.max_request_target
    ):
        return False
    try:
        plan = plan_request(
            method, target, "1.1", fields, peer_ip, ctx.scheme, ctx.router, ctx.forwarded
        )
    except HttpError:
        return False
    if plan.websocket_key is None or plan.body != BODY_NONE:
        return False
    if not _is_ip(plan.route.upstream.host):
        return False
    handshake = Handshake(plan, target, peer_ip, first_read)
    DialledTunnel(ctx, fd, handshake).begin(first_read[head_len:])
    return True
