"""The worker's `RulesMaker`: each route's checks, in the order the design fixes.

    access list -> connection / WebSocket counts -> rate limits -> basic auth -> forward auth

A refused request takes nothing from the checks after the one that refused it (no rate token,
no count); `RouteChecks` gives back what the ones before it took. The limits and the
authentication are made by their own modules through the two hooks below (`limits_checks`,
`auth_checks`), each called only when the route has rules of its kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from charon.worker.access.acl import AclCheck
from charon.worker.access.checks import Check, RouteChecks
from charon.worker.limits.checks import limit_checks

if TYPE_CHECKING:
    from charon.config.model import ProxyHost
    from charon.config.rules import Rules
    from charon.worker.context import WorkerContext


def limits_checks(
    rules: Rules, host: ProxyHost, zone: str, ctx: WorkerContext | None
) -> tuple[Check, ...]:
    """The counts (max_connections[_per_ip], max_websockets[_per_ip]), then the rate limits
    (rate_limit for requests, websocket_rate_limit for handshakes) of a route."""
    checks = limit_checks(rules, host, zone)
    return (checks.admit,) if checks is not None else ()


def auth_checks(
    rules: Rules, host: ProxyHost, zone: str, ctx: WorkerContext | None
) -> tuple[Check, ...]:
    """Basic auth, then forward auth, of a route (they may leave `plan.waits`)."""
    # (Imported for routes with auth only: bcrypt and argon2 load where they are needed.)
    from charon.worker.access.basic import BasicAuthCheck
    from charon.worker.access.forward import ForwardAuthCheck

    checks: list[Check] = []
    if rules.basic_auth is not None:
        checks.append(BasicAuthCheck(rules.basic_auth))
    if rules.forward_auth is not None:
        basic = rules.basic_auth
        keeps = basic is None or basic.forward_authorization
        checks.append(ForwardAuthCheck(rules.forward_auth, keeps))
    return tuple(checks)


class AccessMaker:
    """Given to every Router the worker builds (the first config's and each reload's):
    `ctx` is the worker's (None in unit tests), for the state the checks share."""

    def __init__(self, ctx: WorkerContext | None = None) -> None:
        self.ctx = ctx

    def route_rules(self, rules: Rules, host: ProxyHost, zone: str) -> RouteChecks | None:
        checks: list[Check] = []
        access = rules.access
        if access is not None and (access.allow or access.deny):
            checks.append(AclCheck(access))
        if (
            rules.rate_limits or rules.websocket_rate_limits or rules.max_connections
            or rules.max_connections_per_ip or rules.max_websockets
            or rules.max_websockets_per_ip
        ):
            checks += limits_checks(rules, host, zone, self.ctx)
        basic = rules.basic_auth
        waits = basic is not None or rules.forward_auth is not None
        if waits:
            checks += auth_checks(rules, host, zone, self.ctx)
        keeps = basic is None or basic.forward_authorization
        if not checks and keeps and rules.bare:
            return None
        remembers = None
        if waits and rules.forward_auth is None:
            # Basic auth alone waits only for a credential it has not verified yet: the front
            # door may dial a handshake carrying a remembered one.
            from charon.worker.access.basic import BasicAuthCheck

            basic_check = checks[-1]  # (basic auth is the last check when it is the only auth)
            assert isinstance(basic_check, BasicAuthCheck)
            remembers = basic_check.remembers
        return RouteChecks(
            rules, checks, keeps_authorization=keeps, may_wait=waits, remembers=remembers
        )
