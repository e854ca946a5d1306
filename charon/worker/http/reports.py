"""What an exchange tells when it ends, or when one of its attempts fails: the request record
(live log, access log, metrics), its target's counts (`active`, per-target requests and
response times) and upstream errors. Bound as methods of `Exchange` (exchange.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from charon.worker.http.errors import CLIENT_CLOSED
from charon.worker.upstreams.failure import address, log_failure

if TYPE_CHECKING:
    from charon.worker.http.exchange import Exchange
    from charon.worker.upstreams.failure import UpstreamFailure

OTHER_HOST = "_other"  # the host label of requests that matched no proxy host


def report(exchange: Exchange, status: int) -> None:
    """The exchange ended with `status` (once): its last attempt's target is counted too
    (not for a client that left: the target did not answer it)."""
    plan = exchange.plan
    if plan is not None and status != 101:  # (a tunnel gives them back when it closes)
        plan.release()
    now = time.monotonic()
    target = exchange.chosen
    if target is not None:
        exchange.chosen = None
        target.active -= 1
        if status != CLIENT_CLOSED:
            target.totals.request(status, now - exchange.attempt_at)
    error = exchange.error
    if plan is not None:
        host, client_ip = plan.route.host_name, plan.client_ip
    elif error is not None and error.host is not None:  # refused by its route's rules
        host, client_ip = error.host, error.client_ip or exchange.client.peer_ip
    else:
        host, client_ip = OTHER_HOST, exchange.client.peer_ip
    exchange.client.ctx.telemetry.request(
        host,
        exchange.method,
        status,
        now - exchange.started,
        exchange.body_bytes,
        client_ip,
        exchange.target,
        exchange.failure,
        error.denied if error is not None else None,
    )


def attempt_over(exchange: Exchange, status: int, failure: UpstreamFailure) -> None:
    """A failed attempt that goes on elsewhere: told and counted on its own target."""
    upstream_error(exchange, failure, status, retried=True)
    target, exchange.chosen = exchange.chosen, None
    if target is not None:
        target.active -= 1
        target.totals.request(status, time.monotonic() - exchange.attempt_at)


def upstream_error(
    exchange: Exchange, failure: UpstreamFailure, status: int, retried: bool = False
) -> None:
    """The attempt on the exchange's target failed: the worker's log line (which target, in
    which phase, why), the live log's record and the metric (worker/upstreams/failure.py).
    `retried`: the request goes on to another target."""
    plan = exchange.plan
    if plan is None:
        return
    if not failure.address and exchange.chosen is not None:
        failure.address = address(exchange.chosen.upstream.host, exchange.chosen.upstream.port)
    if not retried:  # (the request's own record tells the failure that ended it, no other)
        exchange.failure = failure
    if retried:
        outcome = "tried on another target"
    elif exchange.response_started:
        outcome = "cut short"
    else:
        outcome = f"answered {status}"
    log_failure(failure, outcome, exchange.method, plan.route.host_name, exchange.target)
    exchange.client.ctx.telemetry.upstream_error(
        plan.route.host_name, failure, status, plan.client_ip, exchange.target
    )
