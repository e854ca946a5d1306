"""The targets of a proxy host or location and how one is chosen: `upstream` / `upstreams` and
the load-balancing, health and retry keys (issue 13), parsed into a `Backends`.

A location takes the same keys; the load-balancing settings it does not set are its host's
(its targets never are: a location without `upstream(s)` is an error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from charon.config import tls, values
from charon.config.model import LB_POLICIES, Backends, Config, HealthCheck, Target, Upstream
from charon.config.table import Table, boolean

# The keys besides upstream/upstreams that a location inherits from its host when it does not
# set them.
SETTING_KEYS = (
    "lb_policy",
    "lb_header",
    "lb_cookie",
    "max_fails",
    "fail_timeout",
    "fail_status",
    "health_check",
    "slow_start",
    "max_retries",
    "retry_budget",
    "resolve_interval",
)
KEYS = ("upstream", "upstreams", *SETTING_KEYS)
_TARGET_KEYS = ("url", "weight", "backup", "max_connections", "drain")
_HEALTH_KEYS = tuple(f.name for f in dataclasses.fields(HealthCheck))
DEFAULT_COOKIE = Backends("", ()).cookie_name
MAX_WEIGHT = 1000
MAX_RETRIES = 20
_MAX_THRESHOLD = 100
# RFC 9110 tchar: what a header field name or a cookie name may be made of.
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def backends(
    table: Table, name: str, backend_tls: tls.BackendTls, inherited: Backends | None = None
) -> Backends:
    """The `Backends` of a host (`inherited` None) or of a location (`inherited`: its host's).

    `backend_tls` is this table's tls_verify / tls_ca, applied to every https:// target.
    """
    targets = _targets(table, backend_tls)
    base = Backends(name, targets) if inherited is None else dataclasses.replace(
        inherited, name=name, targets=targets
    )
    policy = table.get("lb_policy", _policy, base.policy)
    return dataclasses.replace(
        base,
        policy=policy,
        hash_header=_hash_header(table, policy, base.hash_header),
        cookie_name=_cookie_name(table, policy, base.cookie_name),
        max_fails=table.get("max_fails", lambda v: values.integer(v, 0, 1000), base.max_fails),
        fail_timeout=table.get("fail_timeout", values.duration, base.fail_timeout),
        fail_status=_statuses(table, "fail_status", 500, base.fail_status),
        health_check=_health_check(table, base.health_check),
        slow_start=table.get("slow_start", values.duration, base.slow_start),
        max_retries=table.get(
            "max_retries", lambda v: values.integer(v, 0, MAX_RETRIES), base.max_retries
        ),
        retry_budget=table.get("retry_budget", _share, base.retry_budget),
        resolve_interval=table.get("resolve_interval", values.duration, base.resolve_interval),
    )


def upstreams(*groups: Backends) -> list[Upstream]:
    """Every target's address, for `tls.check_backend_tls_used`."""
    return [target.upstream for group in groups for target in group.targets]


# -- targets -----------------------------------------------------------------------------------


def _targets(table: Table, backend_tls: tls.BackendTls) -> tuple[Target, ...]:
    if "upstream" in table.data and "upstreams" in table.data:
        raise table.error("upstreams", "set either upstream (one target) or upstreams, not both")
    if isinstance(table.data.get("upstream"), list):
        raise table.error("upstream", "is one URL: write several targets as upstreams = [...]")
    if "upstreams" not in table.data:
        upstream = table.require("upstream", values.upstream)
        return (Target(tls.with_backend_tls(upstream, backend_tls)),)
    items = table.parse("upstreams", _array)
    if not items:
        raise table.error("upstreams", "must list at least one target")
    targets: list[Target] = []
    seen: dict[tuple[str, int, bool], int] = {}  # address -> line of the target that has it
    for index, item in enumerate(items):
        target = _target(table, index, item)
        address = (target.upstream.host, target.upstream.port, target.upstream.tls)
        line = table.source.lines.line_of((*table.path, "upstreams", index))
        if address in seen:
            raise table.error_at(
                (*table.path, "upstreams", index),
                f"{table.label('upstreams')}: {values.quote(target.upstream.url)} is the same "
                f"backend as the target at line {seen[address]}",
            )
        seen[address] = line
        upstream = tls.with_backend_tls(target.upstream, backend_tls)
        targets.append(dataclasses.replace(target, upstream=upstream))
    if all(target.backup for target in targets):
        raise table.error("upstreams", "every target is a backup: at least one must not be")
    return tuple(targets)


def _array(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(
            'expected an array of upstream URLs or { url = "...", ... } tables, '
            f"got {values.describe(value)}"
        )
    return value


class _TargetTable(Table):
    """One inline table of `upstreams`: named "[[hosts]] upstreams[2]" in messages."""

    def __init__(self, parent: Table, index: int, data: dict[str, Any]) -> None:
        super().__init__(parent.source, (*parent.path, "upstreams", index), data)
        self.parent_name = parent.name
        self.index = index

    @property
    def name(self) -> str:
        return f"{self.parent_name} upstreams[{self.index}]"


def _target(table: Table, index: int, item: Any) -> Target:
    where = (*table.path, "upstreams", index)
    if isinstance(item, str):
        try:
            return Target(values.upstream(item))
        except ValueError as err:
            raise table.error_at(where, f"{table.label('upstreams')}: {err}") from None
    if not isinstance(item, dict):
        raise table.error_at(
            where,
            f"{table.label('upstreams')}: expected an upstream URL or a "
            f'{{ url = "...", ... }} table, got {values.describe(item)}',
        )
    sub = _TargetTable(table, index, item)
    sub.check_keys(_TARGET_KEYS)
    return Target(
        upstream=sub.require("url", values.upstream),
        weight=sub.get("weight", lambda v: values.integer(v, 1, MAX_WEIGHT), 1),
        backup=sub.get("backup", boolean, False),
        max_connections=sub.get("max_connections", lambda v: values.integer(v, 0), 0),
        drain=sub.get("drain", boolean, False),
    )


# -- choosing a target -------------------------------------------------------------------------


def _policy(value: Any) -> str:
    text = values.string(value, "a policy name string")
    if text not in LB_POLICIES:
        choices = ", ".join(LB_POLICIES)
        raise ValueError(f"unknown policy {values.quote(text)}: use one of {choices}")
    return text


def _hash_header(table: Table, policy: str, inherited: str | None) -> str | None:
    header = table.get("lb_header", lambda v: _token(v, "a header name"), None)
    if header is not None and policy != "header_hash":
        raise table.error("lb_header", 'only applies with lb_policy = "header_hash"')
    header = (header or inherited) if policy == "header_hash" else None
    if policy == "header_hash" and header is None:
        raise table.error("lb_policy", '"header_hash" needs lb_header, the header to hash')
    return header.lower() if header is not None else None


def _cookie_name(table: Table, policy: str, inherited: str) -> str:
    name = table.get("lb_cookie", lambda v: _token(v, "a cookie name"), None)
    if name is not None and policy != "cookie":
        raise table.error("lb_cookie", 'only applies with lb_policy = "cookie"')
    if policy != "cookie":
        return DEFAULT_COOKIE
    return name or inherited


def _token(value: Any, what: str) -> str:
    text = values.string(value, f"{what} string")
    if not text or not set(text) <= _TOKEN:
        raise ValueError(
            f"{values.quote(text)} is not a valid {what.removeprefix('a ')}: "
            "letters, digits and !#$%&'*+-.^_`|~ only"
        )
    return text


# -- health ------------------------------------------------------------------------------------


def _statuses(table: Table, key: str, minimum: int, default: tuple[int, ...]) -> tuple[int, ...]:
    """An array of status codes from `minimum` to 599 (each checked at its line), sorted."""
    if key not in table.data:
        return default
    items = table.parse(key, lambda v: values.string_list(v, "status codes"))
    codes = table.elements(key, items, lambda v: values.integer(v, minimum, 599))
    return tuple(sorted(set(codes)))


def _health_check(table: Table, inherited: HealthCheck | None) -> HealthCheck | None:
    """A table (its keys not set: the host's check's, or the defaults), or false: none."""
    raw = table.table_or_false("health_check", '{ path = "/healthz" }')
    if raw is None:
        return inherited
    if raw is False:
        return None
    sub = table.table("health_check")
    sub.check_keys(_HEALTH_KEYS)
    base = inherited or HealthCheck()
    parsers: dict[str, Callable[[Any], Any]] = {
        "path": _check_path,
        "interval": values.positive_duration,
        "timeout": values.positive_duration,
        "healthy_threshold": lambda v: values.integer(v, 1, _MAX_THRESHOLD),
        "unhealthy_threshold": lambda v: values.integer(v, 1, _MAX_THRESHOLD),
        "websocket": boolean,
        "host": _check_host,
    }
    settings = {key: sub.parse(key, parse) for key, parse in parsers.items() if key in sub.data}
    if "expect_status" in sub.data:
        settings["expect_status"] = _statuses(sub, "expect_status", 100, ())
        if not settings["expect_status"]:
            raise sub.error(
                "expect_status", "must list at least one status (leave it out for any 2xx or 3xx)"
            )
    check = dataclasses.replace(base, **settings)
    if check.timeout > check.interval:
        key = "timeout" if "timeout" in sub.data else "interval"
        raise sub.error(
            key, f"the timeout ({check.timeout:g}s) must not be longer than the interval "
            f"({check.interval:g}s)"
        )
    if check.websocket and "expect_status" in sub.data:
        raise sub.error("expect_status", "a WebSocket check expects 101: leave expect_status out")
    if check.websocket and check.expect_status:  # the host's, for its GET check
        check = dataclasses.replace(check, expect_status=())
    return check


def _check_path(value: Any) -> str:
    path = values.string(value, 'a path like "/healthz"')
    if not path.startswith("/"):
        raise ValueError(f"must start with '/', got {values.quote(path)}")
    if not all("!" <= char <= "~" for char in path) or "#" in path:
        raise ValueError(
            f"must be visible ASCII without spaces or '#', got {values.quote(path)}"
        )
    return path


def _check_host(value: Any) -> str:
    """A Host header value: a DNS name or an IP address ("[v6]"), maybe with ":PORT"."""
    text = values.string(value, "a host name string").lower()
    if text.startswith("["):
        name, bracket, rest = text[1:].partition("]")
        ok = bool(bracket) and ":" in name and values.is_ip_address(name)
        colon, port = rest[:1], rest[1:]
        ok = ok and rest[:1] in ("", ":")
    else:
        name, colon, port = text.partition(":")
        ok = values.is_dns_name(name) or values.is_ip_address(name)
    if not ok or (colon and not _is_port(port)):
        raise ValueError(
            f"{values.quote(text)}: expected a host name or an IP address, maybe with a port, "
            'like "app.example.com" or "[::1]:8080"'
        )
    return text


def _is_port(text: str) -> bool:
    return text.isascii() and text.isdecimal() and 1 <= int(text) <= 65535


def _share(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number from 0 to 1, got {values.describe(value)}")
    if not 0 <= value <= 1:
        raise ValueError(f"must be between 0 and 1, got {value!r}")
    return float(value)


# -- `charon check` ----------------------------------------------------------------------------


def listing_lines(config: Config) -> list[str]:
    """For `charon check`: each host or location that is more than one upstream with the
    defaults (several targets, a policy, a health check...), then one line per target."""
    lines: list[str] = []
    for host in config.hosts:
        for group in (host.backends, *(loc.backends for loc in host.locations)):
            if group == Backends(group.name, (Target(group.upstream),)):
                continue  # one upstream and the defaults: nothing to tell
            lines.append(f"{group.name}: {_summary(group)}")
            lines.extend(f"  {_describe_target(target)}" for target in group.targets)
    return lines


def _summary(group: Backends) -> str:
    count = len(group.targets)
    policy = group.policy
    if group.hash_header is not None:
        policy += f" on {group.hash_header}"
    elif policy == "cookie":
        policy += f" {group.cookie_name}"
    return f"{count} target{'s' if count > 1 else ''}, {policy}, {_describe_check(group)}"


def _describe_check(group: Backends) -> str:
    check = group.health_check
    if check is None:
        return "no active health check"
    what = "WebSocket" if check.websocket else "GET"
    expect = "101" if check.websocket else "/".join(map(str, check.expect_status)) or "2xx/3xx"
    return (
        f"health check {what} {check.path} every {check.interval:g}s "
        f"(timeout {check.timeout:g}s, expect {expect})"
    )


def _describe_target(target: Target) -> str:
    notes = [f"weight {target.weight}"] if target.weight != 1 else []
    notes += ["backup"] if target.backup else []
    notes += [f"max_connections {target.max_connections}"] if target.max_connections else []
    notes += ["drain"] if target.drain else []
    return target.upstream.url + (f" ({', '.join(notes)})" if notes else "")
