"""A route's checks, composed into its `RouteRules` (worker/access/route.py).

A check is any callable `check(plan, headers) -> None`: it raises `HttpError(..., denied=...)`
to refuse, appends awaitable work to `plan.waits` (worker/access/route.py's `Wait`), or appends
a release callback to `plan.leases` for a count it took. `RouteChecks.admit` runs them in the
order given (design: acl, counts, rate limits, basic auth, forward auth) and, when one refuses,
gives back what the earlier ones took: a refused request holds no count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from charon.worker.http.errors import HttpError

if TYPE_CHECKING:
    from charon.config.rules import Rules
    from charon.worker.http.headers import Header
    from charon.worker.http.request import RequestPlan


class Check(Protocol):
    def __call__(self, plan: RequestPlan, headers: list[Header]) -> None:
        """Let the request through, leave work or leases in `plan`, or raise HttpError."""


Admit = Callable[["RequestPlan", "list[Header]"], None]


class RouteChecks:
    """The `RouteRules` of one route: `admit` is its one check itself when it has one (an
    access list costs its own call, nothing more), else a loop over them."""

    __slots__ = ("admit", "checks", "keeps_authorization", "may_wait", "remembers", "rules")

    def __init__(
        self,
        rules: Rules,
        checks: Sequence[Check],
        keeps_authorization: bool = True,
        may_wait: bool = False,
        remembers: Callable[[bytes | None], bool] | None = None,
    ) -> None:
        self.rules = rules  # the route's rules as configured (header rules, tunnel caps)
        self.checks = tuple(checks)
        # Forward the client's Authorization field (False: basic auth consumed it).
        self.keeps_authorization = keeps_authorization
        # A check may leave `plan.waits` (basic or forward auth): the front door leaves such a
        # request to the HTTP path without admitting it (it is admitted there, once).
        self.may_wait = may_wait
        # With may_wait: whether a request's Authorization is one basic auth remembers (it
        # will not wait); None: any request may wait (forward auth).
        self.remembers = remembers
        if len(self.checks) == 1:
            self.admit: Admit = self.checks[0]
        else:  # (none: rules that change the request or the tunnel but admit every one)
            self.admit = _all(self.checks) if self.checks else _anyone


    def would_wait(self, plan: RequestPlan) -> bool:
        """`admit` may leave `plan.waits` for this request (the front door leaves it to the
        HTTP path without admitting it)."""
        if not self.may_wait:
            return False
        return self.remembers is None or not self.remembers(plan.authorization)


def _anyone(plan: RequestPlan, headers: list[Header]) -> None:
    pass


def _all(checks: tuple[Check, ...]) -> Admit:
    def admit(plan: RequestPlan, headers: list[Header]) -> None:
        try:
            for check in checks:
                check(plan, headers)
        except HttpError:
            plan.release()  # the counts the earlier checks took
            plan.waits = None
            raise

    return admit
