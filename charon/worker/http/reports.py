"""What an exchange tells when it ends, or when one of its attempts fails: the request record
(live log, access log, metrics), its target's counts (`active`, per-target requests and
response times) and upstream errors. Bound as methods of `Exchange` (exchange.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from charon.worker.http.errors import CLIENT_CLOSED

if TYPE_CHECKING:
    from charon.worker.http.exchange import Exchange

OTHER_HOST = "_other"  # the host label of requests that matched no proxy host


def report(exchange: Exchange, status: int) -> None:
    """The exchange ended with `status` (once): its last attempt's target is counted too
    (not for a client that left: the target did not answer it)."""
    plan = exchange.plan
    now = time.monotonic()
    target = exchange.chosen
    if target is not None:
        exchange.chosen = None
        target.active -= 1
        if status != CLIENT_CLOSED:
            target.totals.request(status, now - exchange.attempt_at)
    exchange.client.ctx.telemetry.request(
        plan.route.host_name if plan is not None else OTHER_HOST,
        exchange.method,
        status,
        now - exchange.started,
        exchange.body_bytes,
        plan.client_ip if plan is not None else exchange.client.peer_ip,
        exchange.target,
    )


def attempt_over(exchange: Exchange, status: int, kind: str) -> None:
    """A failed attempt that goes on elsewhere: told and counted on its own target."""
    upstream_error(exchange, kind, status)
    target, exchange.chosen = exchange.chosen, None
    if target is not None:
        target.active -= 1
        target.totals.request(status, time.monotonic() - exchange.attempt_at)


def upstream_error(exchange: Exchange, kind: str, status: int) -> None:
    plan = exchange.plan
    if plan is not None:
        exchange.client.ctx.telemetry.upstream_error(
            plan.route.host_name, kind, status, plan.client_ip, exchange.target
        )
