"""What an exchange does when its attempt on a target fails (decision 11, issue 13).

A failed attempt (connect error or timeout, a reset before the response began, a bad
response, a stalled backend) counts against the target's passive health. It goes again, to
another target, only when nothing of the response reached the client, the request can be
sent whole again (nothing was sent: a connect that failed; or a request without a body whose
method is idempotent), the group's `max_retries` are not spent and its retry budget allows.
The failed attempt is then told (an upstream error, counted on its target) and the exchange
goes on with the next target; otherwise the exchange answers the failure itself (502/504).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from charon.worker.http.request import BODY_LENGTH, BODY_NONE, IDEMPOTENT, use_target

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.http.adopted import Handover
    from charon.worker.http.exchange import Exchange
    from charon.worker.upstreams.group import TargetGroup, TargetState

log = logging.getLogger("charon.worker")


def may_send_again(exchange: Exchange) -> bool:
    """Whether the request may go again whole after its backend closed before answering:
    no body (nothing of it was streamed away; `Content-Length: 0` is none), an idempotent
    method, and no interim response relayed to the client yet."""
    plan = exchange.plan
    return (
        plan is not None
        and (plan.body == BODY_NONE or (plan.body == BODY_LENGTH and plan.length == 0))
        and plan.method in IDEMPOTENT
        and not exchange.informed
    )


def stale_connection(exchange: Exchange) -> bool:
    """A connection from the pool that the backend closed before answering (its keep-alive
    timeout crossed our request): the same target is tried again once on a new connection,
    which is no failure of the target."""
    return exchange.reused and not exchange.retried and may_send_again(exchange)


def attempt_failed(exchange: Exchange, status: int, kind: str, resend: bool) -> bool:
    """The attempt on the exchange's target failed (`status`: the 502 or 504 it would get).
    True when the exchange now has another target to send the request to (`resend`: it may
    be sent again whole)."""
    plan, target = exchange.plan, exchange.chosen
    if plan is None or target is None:
        return False
    ctx = exchange.client.ctx
    group = plan.route.group
    note_failure(ctx, group, target)
    if not resend or exchange.response_started:
        return False
    tried = exchange.tried = (*exchange.tried, target) if exchange.tried else (target,)
    if len(tried) > group.backends.max_retries:
        return False
    following = group.retry(tried, plan.lb_key)
    if following is None or not group.may_retry():
        return False
    exchange.attempt_over(status, kind)
    use_target(plan, following)
    exchange.count(following)
    return True


def note_failure(ctx: WorkerContext, group: TargetGroup, target: TargetState) -> None:
    """A passive failure of `target`; the supervisor hears when it marks the target down."""
    if not group.passive:
        return
    backends = group.backends
    if target.health.failed(ctx.loop.time(), backends.max_fails, backends.fail_timeout):
        log.warning(
            "%s: target %s marked down for %gs (%d failures within %gs)", backends.name,
            target.url, backends.fail_timeout, backends.max_fails, backends.fail_timeout,
        )
        if ctx.target_down is not None:
            ctx.target_down(target.health)


def response_status(exchange: Exchange, status: int) -> None:
    """The target answered (a passive group only): a `fail_status` answer is a failure (it is
    still relayed), any other a success."""
    plan, target = exchange.plan, exchange.chosen
    if plan is None or target is None:
        return
    group = plan.route.group
    if status in group.backends.fail_status:
        note_failure(exchange.client.ctx, group, target)
    elif target.health.failures:
        target.health.succeeded()


def resume_handover(exchange: Exchange, handover: Handover) -> None:
    """The exchange goes on from where the front door's dial of its WebSocket handshake
    stopped, with the target it dialled: a refused connect goes to another target, a failure
    is answered, or the backend's answer so far is read on its connection (an Exchange
    method)."""
    plan, target = exchange.plan, handover.target
    assert plan is not None and target is not None
    use_target(plan, target)  # (this plan was made without a choice)
    exchange.count(target)
    failure = handover.failure
    if failure is not None:
        handover.close()
        if not handover.refused:
            exchange.attempt_failed(*failure, False)
        elif failure[0] == 502 and len(plan.route.group.states) == 1:
            exchange.connect()  # its one target: connected again, as without a front door
        else:
            exchange.attempt_failed(*failure)  # nothing was sent: another target may take it
        return
    if handover.backend_fd < 0:  # the dial never began
        exchange.connect()
        return
    fd, handover.backend_fd = handover.backend_fd, -1
    exchange.answered = handover.answered  # fed once attached (the first-byte deadline runs)
    exchange.connecting = connecting = target.pool.connect(exchange, fd)
    connecting.start()
