"""The front door: what becomes of each connection the engine accepted (door.c).

The engine accepts on the listening sockets and reads each new connection once. A connection
whose first read is a whole WebSocket handshake for a route whose targets are all at IP
addresses becomes a `DialledTunnel` at once: its request is planned here as the HTTP path plans
one (the route's policy chooses the target), and the engine dials that target and starts the
tunnel once Python has accepted the backend's 101. Every
other connection, and a handshake this path does not take, goes to uvloop as HTTP with the
bytes already read (`adopt_client`), exactly as if uvloop had accepted it.

Each arrival is served on its own: whatever goes wrong with one (a bug included) is logged
and that connection goes the HTTP way or is closed; the arrivals after it are served as usual.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from charon.worker.http.adopted import adopt_client
from charon.worker.http.choosing import choose_target
from charon.worker.http.errors import HttpError
from charon.worker.http.request import BODY_NONE, RequestPlan, plan_request
from charon.worker.limits.server import NO_SEAT, REFUSED
from charon.worker.limits.server import admit as admit_connection
from charon.worker.tlsinfo import TlsInfo
from charon.worker.tlspump import serve_http
from charon.worker.websocket._engine import CLIENT
from charon.worker.websocket.dialled import DialledTunnel, Handshake

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.websocket._engine import Arrival, SplitHead, TlsConn

log = logging.getLogger("charon.worker")

def arrived(ctx: WorkerContext, arrivals: list[Arrival] | None, accepted: int) -> None:
    """Serve what the front door took in. Open client connections are counted (for accept
    back-off) from the accept on, silent ones waiting in the engine included; they are
    uncounted when they close, whichever path served them."""
    if accepted and ctx.listeners is not None:
        ctx.listeners.opened(accepted)
    if arrivals is None:
        return
    server = ctx.config.server
    capped = server.max_connections or server.max_connections_per_ip
    for fd, peer_ip, first_read, head, tls in arrivals:
        seat = NO_SEAT  # its [server] max_connections_per_ip count, given back when it ends
        if capped:
            seat = admit_connection(ctx, fd, peer_ip, tls is not None)
            if seat == REFUSED:
                continue
        if head is not None and not ctx.draining:
            try:
                plan = _plan(ctx, peer_ip, head, tls)
            except Exception:
                log.exception("the front door could not plan a handshake; the HTTP path takes it")
                plan = None
            if plan is not None:
                _dial(ctx, fd, peer_ip, first_read, head, plan, tls, seat)
                continue
        try:
            if tls is not None:
                serve_http(ctx, fd, peer_ip, first_read, tls, seat=seat)
            else:
                adopt_client(ctx, fd, peer_ip, first_read, seat=seat)
        except Exception:  # (its socket object, if made, closes the fd when dropped)
            log.exception("cannot hand an accepted connection to the HTTP path")
            if ctx.listeners is not None:
                ctx.listeners.closed_one(seat)


def _plan(
    ctx: WorkerContext, peer_ip: str, head: SplitHead, tls: TlsConn | None
) -> RequestPlan | None:
    """The plan of a handshake this path may dial as the HTTP path would forward it; None
    leaves the connection to the HTTP path, which answers the rest (a force_https 308, a 421,
    a 503, a route with a target over TLS or by name, which the engine does not dial)."""
    method, target, fields, head_len = head
    limits = ctx.limits
    if (
        len(fields) > limits.max_header_count
        or head_len > limits.max_header_bytes
        or len(target) > limits.max_request_target
    ):
        return None
    info = TlsInfo(*tls.info()) if tls is not None else None  # (421 compares its SNI name)
    try:
        plan = plan_request(
            method, target, "1.1", fields, peer_ip, info, ctx.router, ctx.forwarded, False,
            admit=False,
        )
        # The target is chosen only for a handshake dialled here: the HTTP path would choose
        # again (a round robin would then skip one).
        group = plan.route.group
        if plan.websocket_key is None or plan.body != BODY_NONE or not group.dialable:
            return None
        if group.named and not all(state.pool.addresses for state in group.named):
            return None  # a name not resolved yet: uvloop resolves it on the HTTP path
        rules = plan.route.rules
        if rules is not None and rules.would_wait(plan):
            return None  # (forward auth, or a credential to verify: the HTTP path waits)
        if plan.target is None:
            choose_target(plan)
        # The route's rules run once per request, last: here for a handshake dialled here
        # (its counts go with it, also when handed back), else on the HTTP path. A refusal
        # goes there too, which refuses it again (a refusal takes nothing) and answers it.
        if rules is not None:
            rules.admit(plan, fields)
            if plan.waits:  # (a check that may wait should have said so)
                plan.release()
                return None
    except HttpError:
        return None
    return plan


def _dial(
    ctx: WorkerContext, fd: int, peer_ip: str, first_read: bytes, head: SplitHead,
    plan: RequestPlan, tls: TlsConn | None, seat: int,
) -> None:
    tunnel = None
    try:
        tunnel = DialledTunnel(ctx, fd, Handshake(plan, head[1], peer_ip, first_read))
        tunnel.info.seat, seat = seat, NO_SEAT  # the tunnel gives it back from now on
        if tls is not None:
            tunnel.attach_tls(CLIENT, tls)
        tunnel.begin(first_read[head[3]:])
    except Exception:
        # The tunnel owns the fd once made: dropping it closes the connection, unanswered.
        log.exception("the front door could not dial a handshake's backend")
        plan.release()
        if tunnel is not None:
            ctx.dialling.discard(tunnel)
            tunnel.uncount()
            seat = tunnel.info.take_seat()
        if ctx.listeners is not None:
            ctx.listeners.closed_one(seat)
