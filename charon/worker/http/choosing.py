"""The target of a request plan (issue 13): the route's policy chooses it, with what the
planner set aside for it in its one pass over the fields; 503 when no target can take it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from charon.worker.http.errors import HttpError
from charon.worker.http.fieldkinds import SCAN, key_field_kind
from charon.worker.http.headerrules import follow_target
from charon.worker.http.headers import Header
from charon.worker.upstreams.cookie import find_cookie

if TYPE_CHECKING:
    from charon.worker.http.request import RequestPlan
    from charon.worker.upstreams.group import TargetGroup, TargetState


def choose_target(plan: RequestPlan) -> TargetState:
    """The route's policy chooses the plan's target; HttpError 503 when none can take it."""
    group = plan.route.group
    target = group.choose(plan.lb_key)
    if target is None:
        plan.release()
        raise no_target(group)
    use_target(plan, target)
    return target


def no_target(group: TargetGroup) -> HttpError:
    return HttpError(
        503, "no backend available", close=False,
        fields=b"Retry-After: %d\r\n" % group.retry_after(),
        body=b"503 Service Unavailable: no backend available\n",
    )


def use_target(plan: RequestPlan, target: TargetState) -> None:
    """`target` serves the plan (chosen, or another after a failure); the cookie policy's
    response names it unless the request's cookie did."""
    plan.target = target
    route = plan.route
    if route.group.set_cookie:
        plan.set_cookie = None if plan.lb_key == target.cookie else target.cookie_fields[plan.tls]
    if route.headers is not None and route.headers.host_upstream:
        follow_target(plan, target)  # a retry's target: the Host names it


def lb_key(
    group: TargetGroup, specials: list[tuple[int, bytes]], headers: list[Header]
) -> bytes | None:
    """The value of the field the group's policy reads (the named header, or its cookie),
    from the fields set aside in the one pass; None when the request has none."""
    kind = group.key_special
    field = group.key_field
    assert field is not None
    if kind == 0:
        kind, new = key_field_kind(field)
        group.key_special = kind
        if new:  # this request was walked before the field had a kind: found here, this once
            kind = SCAN
    if kind == SCAN:
        values = [value for name, value in headers if name.lower() == field]
    else:
        values = [value for k, value in specials if k == kind]
    if not values:
        return None
    if group.set_cookie:
        return find_cookie(values, group.cookie_name)
    return values[0].strip()
