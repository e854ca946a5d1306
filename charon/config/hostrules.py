"""The `Rules` of a proxy host or location (issue 14): access.py, limits.py and headerrules.py
put together with the inheritance of a location from its host, and `charon check`'s listing.
"""

from __future__ import annotations

import dataclasses

from charon.config import access, headerrules, limits
from charon.config.model import Config
from charon.config.rules import Rules
from charon.config.table import Table

KEYS = (*access.KEYS, *limits.KEYS, *headerrules.KEYS)
LOCATION_KEYS = tuple(key for key in KEYS if key not in limits.HOST_ONLY_KEYS)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every host starts from: the [access.NAME] lists and the [server] defaults."""

    named: access.NamedLists
    base: Rules  # Rules(max_body_size=[server] max_body_size)


@dataclasses.dataclass(frozen=True)
class HostRules:
    """A host's (or location's) rules, and what its locations inherit beside them."""

    rules: Rules
    security: headerrules.Security

    def hsts(self, table: Table, hsts: str | None) -> str | None:
        """The host's `hsts`: its own, else the preset's."""
        if "hsts" in table.data:
            raw = table.data.get("security_headers")
            if isinstance(raw, dict) and "hsts" in raw:
                raise table.error("hsts", "set either hsts or security_headers.hsts, not both")
            return hsts
        return self.security.hsts if self.security.on else None


def context(root: Table, base: Rules) -> Context:
    return Context(access.named_lists(root), base)


def host_rules(table: Table, zone: str, context: Context) -> HostRules:
    return _rules(table, zone, context, HostRules(context.base, headerrules.Security()), True)


def location_rules(table: Table, zone: str, context: Context, host: HostRules) -> HostRules:
    limits.check_host_only(table)
    return _rules(table, zone, context, host, False)


def _rules(table: Table, zone: str, context: Context, inherited: HostRules,
           is_host: bool) -> HostRules:
    base = inherited.rules
    security = headerrules.security(table, inherited.security, host=is_host)
    response = headerrules.header_ops(table, "response_headers", base.response_headers)

    def count(key: str) -> int:
        return table.get(key, limits.count, getattr(base, key))

    rules = Rules(
        access=access.access_list(table, context.named, base.access),
        basic_auth=access.basic_auth(table, base.basic_auth),
        forward_auth=access.forward_auth(table, base.forward_auth),
        rate_limits=limits.rate_limits(table, "rate_limit", zone, base.rate_limits),
        websocket_rate_limits=limits.rate_limits(
            table, "websocket_rate_limit", zone, base.websocket_rate_limits
        ),
        websocket_max_messages_per_second=count("websocket_max_messages_per_second"),
        max_connections=count("max_connections"),
        max_connections_per_ip=count("max_connections_per_ip"),
        max_websockets=count("max_websockets"),
        max_websockets_per_ip=count("max_websockets_per_ip"),
        max_body_size=table.get("max_body_size", limits.byte_size, base.max_body_size),
        request_headers=headerrules.header_ops(table, "request_headers", base.request_headers),
        response_headers=headerrules.with_preset(response, security),
        host_header=headerrules.host_header(table, base.host_header),
        security_headers=security.on,
    )
    if rules == base:  # one object for a host's locations and for bare hosts: pickles small
        rules = base
    return HostRules(rules, security)


# -- `charon check` ----------------------------------------------------------------------------


def listing_lines(config: Config) -> list[str]:
    """For `charon check`: each host or location with rules, then one line per rule."""
    lines: list[str] = []
    for host in config.hosts:
        named = [(host.name, host.rules)]
        named += [(loc.backends.name, loc.rules) for loc in host.locations]
        for name, rules in named:
            described = describe(rules)
            if described:
                lines.append(f"{name}: rules")
                lines.extend(f"  {line}" for line in described)
    return lines


def describe(rules: Rules) -> list[str]:
    """One line per rule that is not the default ("access: allow 10.0.0.0/8 (office)")."""
    lines = []
    if rules.access is not None:
        lines.append(f"access: {access.describe(rules.access)}")
    if rules.basic_auth is not None:
        lines.append(f"basic_auth: {access.describe_basic(rules.basic_auth)}")
    if rules.forward_auth is not None:
        auth = rules.forward_auth
        copy = f", copy {', '.join(auth.copy_headers)}" if auth.copy_headers else ""
        lines.append(f"forward_auth: {auth.url} (timeout {auth.timeout:g}s{copy})")
    for key, limits_list in (("rate_limit", rules.rate_limits),
                             ("websocket_rate_limit", rules.websocket_rate_limits)):
        lines.extend(f"{key}: {limits.describe_rate(limit)}" for limit in limits_list)
    for key in ("websocket_max_messages_per_second", *limits.HOST_ONLY_KEYS):
        if getattr(rules, key):
            lines.append(f"{key}: {getattr(rules, key)}")
    if rules.max_body_size != Rules().max_body_size:
        lines.append(f"max_body_size: {limits.describe_size(rules.max_body_size)}")
    for key in ("request_headers", "response_headers"):
        ops = getattr(rules, key)
        if ops:
            lines.append(f"{key}: {headerrules.describe(ops)}")
    if rules.host_header is not None:
        lines.append(f"host_header: {rules.host_header}")
    return lines
