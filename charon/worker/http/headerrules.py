"""A route's header rules (issue 14): `request_headers`, `response_headers`, `host_header` and
the `security_headers` preset, made once per route from its `Rules` (`header_rules`).

A route without any of them has `Route.headers` None: planning and relaying its requests cost
one `is None` test more. With request rules, the fields of the upstream head are walked again
once the planner has written them (the proxy's own X-Forwarded-*, Via and X-Real-IP included,
so a user may remove or set those too); response rules rewrite the backend's fields before the
response head is written. Rule values are fixed strings: nothing of a request is substituted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from charon.worker.http.headers import Header

if TYPE_CHECKING:
    from charon.config.model import Upstream
    from charon.config.rules import HeaderOps, Rules
    from charon.worker.http.request import RequestPlan
    from charon.worker.upstreams.group import TargetState

_DEFAULT_PORTS = {False: 80, True: 443}  # by Upstream.tls
# The fields that complete a WebSocket handshake (accept, protocol, extensions): the proxy
# checked them against the client's offer, so rules neither remove nor replace them in a 101.
_HANDSHAKE_PREFIX = b"sec-websocket-"


def _field(name: str, value: str) -> Header:
    # Names are tokens and values have no CR, LF or NUL (the loader checks both).
    return name.encode("ascii"), value.encode("utf-8")


def _lower(name: str) -> bytes:
    return name.lower().encode("ascii")


def _lines(fields: tuple[Header, ...] | list[Header]) -> bytes:
    return b"".join(name + b": " + value + b"\r\n" for name, value in fields)


@dataclass(frozen=True, slots=True)
class ResponseOps:
    """One direction's rules, ready to apply to a list of (name, value) fields."""

    drop: frozenset[bytes]  # lowercase names removed first: `remove` and every `set` name
    append: tuple[Header, ...]  # `set` then `add` fields, appended in that order
    default: tuple[tuple[bytes, Header], ...]  # (lowercase name, field) added when absent

    @classmethod
    def of(cls, ops: HeaderOps, skip: bytes | None = None) -> ResponseOps | None:
        """`skip`: leave out every rule naming a field that starts with it (lowercase)."""

        def kept(name: str) -> bool:
            return skip is None or not _lower(name).startswith(skip)

        drop = frozenset(
            _lower(n) for n in (*ops.remove, *(n for n, _ in ops.set)) if kept(n)
        )
        append = tuple(_field(n, v) for n, v in (*ops.set, *ops.add) if kept(n))
        # A field the user removes stays out, the preset's default included.
        removed = {_lower(n) for n in ops.remove}
        default = tuple(
            (_lower(n), _field(n, v))
            for n, v in ops.default
            if kept(n) and _lower(n) not in removed
        )
        if not (drop or append or default):
            return None
        return cls(drop, append, default)

    def apply(self, fields: list[Header]) -> list[Header]:
        """`fields` with the rules applied: remove, set, add, then default."""
        drop = self.drop
        out = [f for f in fields if f[0].lower() not in drop] if drop else list(fields)
        out += self.append
        if self.default:
            present = {name.lower() for name, _ in out}
            out += [field for lname, field in self.default if lname not in present]
        return out


@dataclass(frozen=True, slots=True)
class RequestOps:
    drop: frozenset[bytes]  # lowercase names: `remove` and every `set` name
    tail: bytes  # the `set` then `add` fields, as header lines

    def fields(self, block: bytes) -> bytes:
        """`block` (header lines, each ending in CRLF) with the rules applied."""
        drop = self.drop
        if drop:
            kept = [
                line
                for line in block.split(b"\r\n")
                if line and line.partition(b":")[0].lower() not in drop
            ]
            block = b"\r\n".join(kept) + b"\r\n" if kept else b""
        return block + self.tail


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """What a route changes in the heads it relays, both ways."""

    request: RequestOps | None
    response: ResponseOps | None  # on proxied responses
    switching: ResponseOps | None  # on a WebSocket 101 (the handshake's own fields kept)
    host: bytes | None  # host_header's literal value
    host_upstream: bool  # host_header = "upstream": the Host follows the attempt's target
    own: bytes  # the preset's fields (as lines) for the answers the proxy writes itself

    def upstream_fields(self, out: list[bytes]) -> list[bytes]:
        """The planner's upstream head so far (out[0]: request line and Host; then the field
        lines, the framing not yet written) with the Host and request rules applied."""
        if self.host is not None:
            out[0] = with_host(out[0], self.host)
        if self.request is None:
            return out
        return [out[0], self.request.fields(b"".join(out[1:]))]


def header_rules(rules: Rules) -> HeaderRules | None:
    """A route's header rules; None when it has none (the usual case)."""
    request_ops, response_ops = rules.request_headers, rules.response_headers
    if not (request_ops or response_ops or rules.host_header is not None):
        return None
    request = None
    if request_ops:
        drop = frozenset(_lower(n) for n in (*request_ops.remove, *(n for n, _ in request_ops.set)))
        tail = _lines([_field(n, v) for n, v in (*request_ops.set, *request_ops.add)])
        request = RequestOps(drop, tail)
    host_upstream = rules.host_header == "upstream"
    host = None
    if rules.host_header is not None and not host_upstream:
        host = rules.host_header.encode("ascii")
    return HeaderRules(
        request,
        ResponseOps.of(response_ops),
        ResponseOps.of(response_ops, _HANDSHAKE_PREFIX),
        host,
        host_upstream,
        _own_fields(response_ops),
    )


def _own_fields(ops: HeaderOps) -> bytes:
    """The preset's fields (`default`) for the proxy's own answers: a `set` of the same name
    gives its value, a `remove` leaves it out; nothing else of the rules applies there."""
    removed = {n.lower() for n in ops.remove}
    values = {n.lower(): v for n, v in ops.set}
    fields = []
    for name, value in ops.default:
        lname = name.lower()
        if lname in removed and lname not in values:
            continue
        fields.append(_field(name, values.get(lname, value)))
    return _lines(fields)


def own_fields(hsts: bytes | None, rules: HeaderRules | None) -> bytes:
    """Header lines for an answer the proxy writes itself on a route: its
    Strict-Transport-Security (over TLS) and the security_headers preset's fields."""
    extra = b"Strict-Transport-Security: " + hsts + b"\r\n" if hsts else b""
    if rules is not None and rules.own:
        extra += rules.own
    return extra


def with_host(head: bytes, host: bytes) -> bytes:
    """`head` (a request line, then its Host line, then anything) with that Host value. Neither
    the request target nor a Host value can hold a CR or LF, so the lines are found by them."""
    line_end = head.index(b"\r\n") + 2
    host_end = head.index(b"\r\n", line_end)
    return b"".join((head[:line_end], b"Host: ", host, head[host_end:]))


_authorities: dict[Upstream, bytes] = {}


def upstream_authority(upstream: Upstream) -> bytes:
    """`host[:port]` of a target, the port left out when it is its scheme's default."""
    authority = _authorities.get(upstream)
    if authority is None:
        host = upstream.host.encode("ascii")
        if b":" in host:  # an IPv6 address (kept without brackets by the loader)
            host = b"[" + host + b"]"
        if upstream.port != _DEFAULT_PORTS[upstream.tls]:
            host += b":%d" % upstream.port
        if len(_authorities) >= 4096:  # (targets come from configs: a reload may add more)
            _authorities.clear()
        authority = _authorities[upstream] = host
    return authority


def follow_target(plan: RequestPlan, target: TargetState) -> None:
    """host_header = "upstream": the plan's head names `target`, the attempt's target."""
    plan.head = with_host(plan.head, upstream_authority(target.upstream))
