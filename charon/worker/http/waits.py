"""The work a route's rules leave in `plan.waits` (basic auth's verification, forward auth's
request), done before the request goes to its backend (worker/access/route.py).

One asyncio task per exchange that has waits runs them in order; the first that answers (an
HttpError, returned or raised) is the client's answer, sent by the proxy with its `denied`
kept. Meanwhile the request body is held as while a backend connection opens (bounded by the
same pause). A client that leaves cancels the task; the route's first-byte timeout bounds the
whole wait (504), in case a wait's own deadline (forward auth's `timeout`) fails to.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TYPE_CHECKING

from charon.worker.deadlines import FIRST_BYTE
from charon.worker.http.errors import HttpError

if TYPE_CHECKING:
    from charon.worker.http.exchange import Exchange
    from charon.worker.http.request import RequestPlan

log = logging.getLogger("charon.worker")


def begin(exchange: Exchange, plan: RequestPlan) -> None:
    client = exchange.client
    client.set_deadline(FIRST_BYTE, plan.route.timeouts.first_byte)
    task = exchange.waiting = client.ctx.loop.create_task(_run(plan))
    task.add_done_callback(partial(_done, exchange))


async def _run(plan: RequestPlan) -> HttpError | None:
    waits = plan.waits or ()
    try:
        for wait in waits:
            answer = await wait(plan)
            if answer is not None:
                return answer
    except HttpError as error:
        return error
    finally:
        plan.waits = None
    return None


def _done(exchange: Exchange, task: asyncio.Task[HttpError | None]) -> None:
    if exchange.waiting is not task:
        return  # cancelled (the client left, the exchange failed): nothing more to do
    exchange.waiting = None
    if exchange.finished or task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("a request's access check failed", exc_info=error)
        answer: HttpError | None = HttpError(500, "internal error")
    else:
        answer = task.result()
    if answer is None:
        exchange.send()
        return
    exchange.pending = []  # (body read while waiting: dropped, and the rest read and dropped)
    exchange.pending_size = 0
    exchange.client.resume_reading_for_body()
    exchange._answer_locally(answer)
    if not exchange.request_done:
        # The body still coming is read and dropped, as for a request refused at once; its end
        # finishes the exchange (Exchange.request_complete).
        exchange.plan = None


def cancel(exchange: Exchange) -> None:
    task, exchange.waiting = exchange.waiting, None
    if task is not None:
        task.cancel()


def timed_out(exchange: Exchange) -> None:
    """The route's first-byte timeout passed while the checks still ran."""
    cancel(exchange)
    exchange._fail(504, "the access checks did not finish in time")
