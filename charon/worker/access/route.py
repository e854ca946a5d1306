"""The interface between planning a request and the rules of its route (issue 14).

`plan_request` calls `RouteRules.admit` once per request, after routing and before a target is
chosen. `admit` either lets the request through, raises `HttpError` (with `denied` set: 403,
401, 429, 503, 413), or leaves work the plan's user must finish before the request is sent:
`plan.waits`, awaited in order by the HTTP path (the front door leaves such a request to the
HTTP path). Counted resources (connections, WebSockets) taken by `admit` go in `plan.leases`
and are given back by `RequestPlan.release()`, once, when the request or its tunnel ends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from charon.config.model import ProxyHost
    from charon.config.rules import Rules
    from charon.worker.http.errors import HttpError
    from charon.worker.http.headers import Header
    from charon.worker.http.request import RequestPlan

# Work left by `admit`: it completes with None (go on; it may have changed plan.head) or with
# the answer the client gets instead (a relayed forward-auth answer, a 401).
Wait = Callable[["RequestPlan"], Awaitable["HttpError | None"]]


class RouteRules(Protocol):
    # Forward the client's Authorization field (False: basic auth without
    # forward_authorization consumed it).
    keeps_authorization: bool
    # `admit` may leave plan.waits: the front door leaves the request to the HTTP path
    # without admitting it, so it is admitted once, there.
    may_wait: bool
    # The route's rules as configured (what applies after admission: the tunnel's caps).
    rules: Rules

    def admit(self, plan: RequestPlan, headers: list[Header]) -> None:
        """Decide on `plan` (the client's fields in `headers`); raise HttpError to refuse."""

    def would_wait(self, plan: RequestPlan) -> bool:
        """`admit` may leave plan.waits for this one (a credential not verified yet)."""


class RulesMaker(Protocol):
    def route_rules(self, rules: Rules, host: ProxyHost, zone: str) -> RouteRules | None:
        """The checks of one route (`zone`: its Backends.name); None when nothing applies."""
