"""Header rules (issue 14), config side: `request_headers` / `response_headers` ({set, add,
remove}), `host_header` and the `security_headers` preset of a host or location, parsed into
the `HeaderOps` of rules.py.

The preset's fields become `response_headers.default` (added only when the response lacks
them, so a backend's own value wins); its HSTS becomes the host's `hsts` (sent over TLS only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from charon.config import backends, tls, values
from charon.config.rules import HeaderOps
from charon.config.table import InlineTable, Table

KEYS = ("request_headers", "response_headers", "host_header", "security_headers")
_OPS_KEYS = ("set", "add", "remove")
# Fields the proxy writes itself per connection or per message: a rule must not touch them.
_FRAMING = "the proxy writes the body framing itself"
_HOP = "a hop-by-hop field: the proxy manages it per connection"
_REFUSED = {
    "connection": _HOP,
    "keep-alive": _HOP,
    "proxy-connection": _HOP,
    "te": _HOP,
    "trailer": _HOP,
    "upgrade": _HOP + " (WebSocket upgrades pass as they are)",
    "transfer-encoding": _FRAMING,
    "content-length": _FRAMING,
    "host": "use host_header to change the Host sent upstream",
}
HSTS = "max-age=31536000"
# The security_headers preset: its table key -> (field, default value).
PRESET = {
    "x_content_type_options": ("X-Content-Type-Options", "nosniff"),
    "referrer_policy": ("Referrer-Policy", "strict-origin-when-cross-origin"),
    "x_frame_options": ("X-Frame-Options", "SAMEORIGIN"),
}
_PRESET_KEYS = ("hsts", *PRESET)


@dataclasses.dataclass(frozen=True)
class Security:
    """The preset as a host or location has it (a location inherits its host's)."""

    on: bool = False
    fields: tuple[tuple[str, str], ...] = ()  # what goes into response_headers.default
    hsts: str | None = None  # for the host's `hsts` (None: none)


def header_ops(table: Table, key: str, inherited: HeaderOps) -> HeaderOps:
    """`{ set = {...}, add = {...}, remove = [...] }` (set, add and remove of a location replace
    its host's; the preset's `default` is decided by security_headers)."""
    raw = table.data.get(key)
    if raw is None:
        return inherited
    if not isinstance(raw, dict):
        raise table.error(
            key,
            f'expected a table like {{ set = {{ "X-App" = "1" }}, remove = ["X-Debug"] }}, '
            f"got {values.describe(raw)}",
        )
    sub = InlineTable(table, key, raw)
    sub.check_keys(_OPS_KEYS)
    remove: list[Any] = sub.get("remove", lambda v: values.string_list(v, "header names"), [])
    names = sub.elements("remove", remove, lambda v: _allowed(field_name(v)).lower())
    return HeaderOps(
        set=_fields(sub, "set"),
        add=_fields(sub, "add"),
        remove=tuple(dict.fromkeys(names)),
        default=inherited.default,
    )


def _fields(sub: Table, key: str) -> tuple[tuple[str, str], ...]:
    if key not in sub.data:
        return ()
    raw = sub.data[key]
    if not isinstance(raw, dict):
        raise sub.error(
            key, f'expected a table of fields like {{ "X-App" = "1" }}, got {values.describe(raw)}'
        )
    fields = InlineTable(sub, key, raw)
    seen: dict[str, str] = {}
    result: list[tuple[str, str]] = []
    for name, value in raw.items():
        try:
            _allowed(field_name(name))
            if name.lower() in seen:
                raise ValueError(f"the same field as {values.quote(seen[name.lower()])}")
            seen[name.lower()] = name
            result.append((name, field_value(value)))
        except ValueError as err:
            raise fields.error(name, str(err)) from None
    return tuple(result)


def field_name(value: Any) -> str:
    return backends._token(value, "a header name")


def _allowed(name: str) -> str:
    reason = _REFUSED.get(name.lower())
    if reason is not None:
        raise ValueError(f"{name} cannot be changed: {reason}")
    return name


def field_value(value: Any) -> str:
    """Visible ASCII, spaces and tabs inside; never CR, LF, NUL or another control."""
    text = values.string(value, "a header value string")
    if not all(" " <= char <= "~" or char == "\t" for char in text):
        raise ValueError(
            f"{values.quote(text)}: a header value must be printable ASCII "
            "(no CR, LF, NUL or other control characters)"
        )
    if text != text.strip(" \t"):
        raise ValueError(f"{values.quote(text)}: no spaces at the start or end of a value")
    return text


def host_header(table: Table, inherited: str | None) -> str | None:
    """"upstream" (the chosen target's host[:port]) or a literal Host value."""
    raw = table.data.get("host_header")
    if raw is None:
        return inherited
    if raw == "upstream":
        return raw
    return table.parse("host_header", backends._check_host)


def security(table: Table, inherited: Security, *, host: bool) -> Security:
    """security_headers = true | false | { field = "value" | false, ... }."""
    raw = table.data.get("security_headers")
    if raw is None:
        return inherited
    if isinstance(raw, bool):
        if not raw:
            return Security()
        return Security(True, tuple(PRESET.values()), HSTS)
    if not isinstance(raw, dict):
        raise table.error(
            "security_headers",
            f'expected true, false or a table like {{ x_frame_options = "DENY" }}, '
            f"got {values.describe(raw)}",
        )
    sub = InlineTable(table, "security_headers", raw)
    sub.check_keys(_PRESET_KEYS)
    fields = []
    for key, (name, default) in PRESET.items():
        value = sub.parse(key, _preset_value) if key in sub.data else default
        if value is not None:
            fields.append((name, value))
    hsts: str | None = HSTS
    if "hsts" in sub.data:
        if not host:
            raise sub.error("hsts", "is set per host (a location cannot change it)")
        hsts = sub.parse("hsts", _hsts)
    return Security(True, tuple(fields), hsts)


def _preset_value(value: Any) -> str | None:
    if value is False:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"expected a header value string or false (no field), got {values.describe(value)}"
        )
    return field_value(value)


def _hsts(value: Any) -> str | None:
    return None if value is False else tls._hsts(value)


def with_preset(ops: HeaderOps, preset: Security) -> HeaderOps:
    return dataclasses.replace(ops, default=preset.fields)


def describe(ops: HeaderOps) -> str:
    """For `charon check`: "set X-App: 1; add X-Tag: a; remove x-debug; default ..."."""
    parts = []
    for verb, fields in (("set", ops.set), ("add", ops.add)):
        if fields:
            parts.append(f"{verb} " + ", ".join(f"{name}: {value}" for name, value in fields))
    if ops.remove:
        parts.append("remove " + ", ".join(ops.remove))
    if ops.default:
        parts.append("default " + ", ".join(f"{name}: {value}" for name, value in ops.default))
    return "; ".join(parts)
