"""How often, how many, how big (issue 14), config side: `rate_limit`, `websocket_rate_limit`,
the connection and WebSocket counts and `max_body_size` of a host or location, and the
[server] keys `proxy_protocol`, `max_connections`, `max_connections_per_ip`, `max_body_size`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from charon.config import values
from charon.config.model import ListenAddress
from charon.config.rules import DEFAULT_MAX_BODY_SIZE, RateLimit
from charon.config.table import InlineTable, Table, address_list

SERVER_KEYS = ("proxy_protocol", "max_connections", "max_connections_per_ip", "max_body_size")
# Counted per host over all workers: a location shares its host's counts.
HOST_ONLY_KEYS = ("max_connections", "max_connections_per_ip", "max_websockets",
                  "max_websockets_per_ip")
KEYS = ("rate_limit", "websocket_rate_limit", "websocket_max_messages_per_second",
        "max_body_size", *HOST_ONLY_KEYS)
_RATE_KEYS = ("requests", "per", "burst", "by")
_BY = ("ip", "host")
MAX_COUNT = 10_000_000
MAX_REQUESTS = 1_000_000_000
_SIZE = re.compile(r"(\d+)\s*(k|m|g|K|M|G|KiB|MiB|GiB|B)?")
_SIZE_UNITS = {None: 1, "B": 1}
for _letter, _power in (("k", 1), ("m", 2), ("g", 3)):
    _SIZE_UNITS[_letter] = _SIZE_UNITS[_letter.upper()] = 1024**_power
    _SIZE_UNITS[_letter.upper() + "iB"] = 1024**_power


def byte_size(value: Any) -> int:
    """A number of bytes, or a string like "10m", "1g", "512k" (powers of 1024; "10MiB" too)."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError(
                f'invalid size {values.quote(value)}: use a number of bytes or e.g. "512k", '
                '"10m", "1g"'
            )
        return int(match[1]) * _SIZE_UNITS[match[2]]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'expected a size like "10m" or a number of bytes, got '
                         f"{values.describe(value)}")
    if value < 0:
        raise ValueError(f"must not be negative, got {value}")
    return value


def count(value: Any) -> int:
    return values.integer(value, 0, MAX_COUNT)


# -- [server] ----------------------------------------------------------------------------------


def server_settings(table: Table, listen: Sequence[ListenAddress],
                    tls_listen: Sequence[ListenAddress]) -> dict[str, Any]:
    """ServerConfig's proxy_protocol, max_connections and max_connections_per_ip."""
    return {
        "proxy_protocol": _proxy_protocol(table, (*listen, *tls_listen)),
        "max_connections": table.get("max_connections", count, 0),
        "max_connections_per_ip": table.get("max_connections_per_ip", count, 0),
    }


def default_body_size(table: Table) -> int:
    """[server] max_body_size: every host's unless it sets its own."""
    return table.get("max_body_size", byte_size, DEFAULT_MAX_BODY_SIZE)


def _proxy_protocol(table: Table, every: Sequence[ListenAddress]) -> tuple[ListenAddress, ...]:
    raw = table.data.get("proxy_protocol", False)
    if isinstance(raw, bool):
        return tuple(every) if raw else ()
    if not isinstance(raw, str | list):
        raise table.error(
            "proxy_protocol",
            f'expected true, false or listen addresses like ["0.0.0.0:80"], '
            f"got {values.describe(raw)}",
        )
    addresses = address_list(table, "proxy_protocol")
    for index, address in enumerate(addresses):
        if address not in every:
            where = (*table.path, "proxy_protocol") + ((index,) if isinstance(raw, list) else ())
            raise table.error_at(
                where,
                f"{table.label('proxy_protocol')}: {address} is not one of the listen or "
                "tls_listen addresses",
            )
    return addresses


# -- hosts and locations -----------------------------------------------------------------------


def check_host_only(table: Table) -> None:
    """A location cannot set the counts: they are its host's."""
    for key in HOST_ONLY_KEYS:
        if key in table.data:
            raise table.error(
                key, "can only be set on a [[hosts]] table: a location shares its host's counts"
            )


def rate_limits(
    table: Table, key: str, zone: str, inherited: tuple[RateLimit, ...]
) -> tuple[RateLimit, ...]:
    """A table or an array of tables (false or [] : none, e.g. a location lifting its host's
    limit). `zone` is the configuring host's or location's name: buckets key on it, so a
    location that inherits its host's limit shares the host's buckets."""
    raw = table.data.get(key)
    if raw is None:
        return inherited
    if raw is False:
        return ()
    if isinstance(raw, dict):
        return (_rate_limit(InlineTable(table, key, raw), zone),)
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise table.error(
            key,
            f'expected a table like {{ requests = 100, per = "1s" }}, an array of them or '
            f"false, got {values.describe(raw)}",
        )
    return tuple(
        _rate_limit(InlineTable(table, key, item, index), zone) for index, item in enumerate(raw)
    )


def _rate_limit(sub: Table, zone: str) -> RateLimit:
    sub.check_keys(_RATE_KEYS)
    requests = sub.require("requests", lambda v: values.integer(v, 1, MAX_REQUESTS))
    return RateLimit(
        requests=requests,
        per=sub.get("per", values.positive_duration, 1.0),
        burst=sub.get("burst", lambda v: values.integer(v, 1, MAX_REQUESTS), requests),
        by=sub.get("by", _by, "ip"),
        zone=zone,
    )


def _by(value: Any) -> str:
    by = values.string(value, '"ip" or "host"')
    if by not in _BY:
        raise ValueError(f'expected "ip" (a bucket per client) or "host" (one for all), got '
                         f"{values.quote(by)}")
    return by


# -- `charon check` ----------------------------------------------------------------------------


def describe_rate(limit: RateLimit) -> str:
    """ "100/1s burst 50 by ip"."""
    return f"{limit.requests}/{_seconds(limit.per)} burst {limit.burst} by {limit.by}"


def describe_size(size: int) -> str:
    """ "10 MiB", "1 GiB", "1500 bytes", "no limit"."""
    if size == 0:
        return "no limit"
    for unit, name in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def _seconds(seconds: float) -> str:
    for unit, name in ((3600.0, "h"), (60.0, "m")):
        if seconds >= unit and seconds % unit == 0:
            return f"{seconds / unit:g}{name}"
    return f"{seconds:g}s"
