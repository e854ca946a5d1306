"""From a parsed client request head to what goes to the backend (decisions 3, 5-8).

`plan_request` validates the head, routes it and writes the upstream request head in one pass
over the headers. It raises HttpError for anything the proxy must answer itself: errors, and
the TLS answers (421 for a Host that is not the SNI name's host, force_https's 308, ACME HTTP-01
challenges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from charon.worker.http.acme_challenge import PREFIX as ACME_PREFIX
from charon.worker.http.acme_challenge import challenge_answer
from charon.worker.http.errors import HttpError
from charon.worker.http.headers import (
    CACHE_LIMIT,
    ForwardedPolicy,
    Header,
    host_name,
    parse_connection,
)
from charon.worker.http.target import check_target
from charon.worker.routing import Route, Router
from charon.worker.upstreams.cookie import find_cookie
from charon.worker.websocket.handshake import (
    check_request,
    check_upgrade_alone,
    is_websocket_upgrade,
)

if TYPE_CHECKING:
    from charon.worker.tlsinfo import TlsInfo
    from charon.worker.upstreams.group import TargetGroup, TargetState

BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2

_NO_BODY = (BODY_NONE, 0)
_NOTHING: frozenset[bytes] = frozenset()

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_ACME_LEN = len(ACME_PREFIX)

# What each request header is (by lowercased name): _PLAIN ones are forwarded as is, underscored
# ones only if allowed, _CLIENT_IP ones from a trusted proxy only; the rest are treated
# specially, and those from _FORWARDED_TOO on are also forwarded.
(_UNDERSCORED, _PLAIN, _HOST, _CONNECTION, _UPGRADE, _LENGTH, _TE, _XFF, _XFP, _XFH, _FORWARDED,
 _VIA, _DROP, _CLIENT_IP, _MAX_FORWARDS, _WS_KEY, _WS_VERSION) = range(-2, 15)
_FORWARDED_TOO = _WS_KEY
_SPECIAL = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _TE,
    b"connection": _CONNECTION,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"x-forwarded-host": _XFH,
    b"forwarded": _FORWARDED,
    b"via": _VIA,
    b"upgrade": _UPGRADE,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"proxy-authenticate": _DROP,
    b"proxy-authorization": _DROP,
    b"sec-websocket-key": _WS_KEY,
    b"sec-websocket-version": _WS_VERSION,
    b"max-forwards": _MAX_FORWARDS,
    # Client addresses other proxies and CDNs set: a client could claim any address with them.
    # X-Real-IP is always the proxy's own (decision 6's client IP).
    b"x-real-ip": _DROP,
    b"true-client-ip": _CLIENT_IP,
    b"cf-connecting-ip": _CLIENT_IP,
    b"x-client-ip": _CLIENT_IP,
    b"fastly-client-ip": _CLIENT_IP,
    b"x-cluster-client-ip": _CLIENT_IP,
    b"x-originating-ip": _CLIENT_IP,
    b"x-remote-ip": _CLIENT_IP,
    b"x-remote-addr": _CLIENT_IP,
    b"client-ip": _CLIENT_IP,
}
# The fields a group's lb_policy reads (header_hash's header, cookie's Cookie) get kinds of their
# own from here on when a group first needs them: set aside with the specials, and forwarded.
_KEY_FIELD_FIRST = 100
_SCAN = -1  # a key field that cannot be set aside (a client-address or underscored name)
# _SPECIAL and the kinds of the other names seen, so that a request's fields cost one lookup
# each, as before underscores were looked for (bytes' `in` is slow: it tries an int first).
_kinds = dict(_SPECIAL)


def _kind(lname: bytes) -> int:
    kind = _kinds.get(lname)
    if kind is None:
        kind = _PLAIN if lname.find(b"_") == -1 else _UNDERSCORED
        if len(_kinds) >= CACHE_LIMIT:
            _kinds.clear()
            _kinds.update(_SPECIAL)
        _kinds[lname] = kind
    return kind


@dataclass(slots=True)
class RequestPlan:
    route: Route
    method: bytes
    head: bytes  # the request head for the backend, framing and final CRLF included
    body: int  # BODY_NONE / BODY_LENGTH / BODY_CHUNKED
    length: int  # with BODY_LENGTH
    client_ip: str
    path: bytes
    websocket_key: bytes | None  # set for a valid WebSocket handshake
    hsts: bytes | None = None  # Strict-Transport-Security for the response (over TLS only)
    target: TargetState | None = None  # the target chosen (None: not chosen yet)
    lb_key: bytes | None = None  # what the policy hashes or looks up (client IP, field, cookie)
    tls: bool = False  # the client came over TLS (the sticky cookie is Secure)
    set_cookie: tuple[bytes, bytes] | None = None  # the cookie policy's field for the response


def plan_request(
    method: bytes,
    target: bytes,
    version: str,
    headers: list[Header],
    peer_ip: str,
    tls: TlsInfo | None,
    router: Router,
    policy: ForwardedPolicy,
    choose: bool = True,
) -> RequestPlan:
    """`tls`: what the client's TLS connection negotiated; None on a plain listener.
    `choose`: choose the target now (HttpError 503 if none can take it); else the plan's
    target is left to `choose_target` (what the policy needs is kept in the plan)."""
    if version[0] != "1":
        raise HttpError(505, "only HTTP/1.x is supported")
    if method == b"CONNECT":
        raise HttpError(405, "CONNECT is not supported")
    if method == b"TRACE":  # it would echo the client's cookies to a script (XST)
        raise HttpError(405, "TRACE is not supported", close=False)

    # One pass: ordinary fields go straight into the head (out[0], the request line and Host,
    # is known after it); the few the proxy treats specially are set aside.
    out: list[bytes] = [b""]
    specials: list[tuple[int, bytes]] = []
    known = _kinds.get
    underscores = policy.allow_underscores
    trusted = policy.trusts_anyone and policy.is_trusted(peer_ip)
    for name, value in headers:
        lname = name.lower()
        kind = known(lname)
        if kind is None:
            kind = _kind(lname)
        if kind == _PLAIN:
            out += (name, b": ", value, b"\r\n")
        elif kind == _UNDERSCORED:
            # `Transfer_Encoding` is Transfer-Encoding to servers that map `-` and `_` alike
            # (CGI-style environments): dropped, as nginx does by default.
            if underscores:
                out += (name, b": ", value, b"\r\n")
        elif kind == _CLIENT_IP:
            if trusted:
                out += (name, b": ", value, b"\r\n")
        else:
            specials.append((kind, value))
            if kind >= _FORWARDED_TOO:
                out += (name, b": ", value, b"\r\n")

    host_values: list[bytes] = []
    conn_values: list[bytes] = []
    upgrade = length = xfp = xfh = ws_key = ws_version = max_forwards = None
    te: list[bytes] | None = None
    xff: list[bytes] | None = None
    forwarded: list[bytes] | None = None
    via: list[bytes] | None = None
    for kind, value in specials:
        if kind == _HOST:
            host_values.append(value)
        elif kind == _CONNECTION:
            conn_values.append(value)
        elif kind == _UPGRADE:
            upgrade = value
        elif kind == _WS_KEY:
            ws_key = value
        elif kind == _WS_VERSION:
            ws_version = value
        elif kind == _LENGTH:
            length = value
        elif kind == _TE:
            te = [*te, value] if te else [value]  # several lines form one list (RFC 9110 5.3)
        elif kind == _XFF:
            xff = [*xff, value] if xff else [value]
        elif kind == _XFP:
            xfp = value
        elif kind == _XFH:
            xfh = value
        elif kind == _FORWARDED:
            forwarded = [*forwarded, value] if forwarded else [value]
        elif kind == _VIA:
            via = [*via, value] if via else [value]
        elif kind == _MAX_FORWARDS:
            max_forwards = _max_forwards(value, max_forwards)

    if len(host_values) == 1 and target[:1] == b"/":  # origin-form: the usual case
        host_value = host_values[0].strip()
        route_name = host_name(host_value)
        if route_name is None:
            raise HttpError(400, "invalid Host header")
        path = target
    else:
        host_value, route_name, path = _authority_and_path(target, method, host_values)
    check_target(path)
    if (
        router.acme_state_dir is not None  # (most configs: no ACME host, nothing to look at)
        and path[:_ACME_LEN] == ACME_PREFIX
        and (method == b"GET" or method == b"HEAD")
    ):
        answer = challenge_answer(router.acme_state_dir, path)
        if answer is not None:
            raise answer
    route = router.route(route_name, path)
    if tls is not None and tls.server_name is not None:
        # Decision 7: the connection is only authoritative for the SNI name's host.
        sni_host = router.host_for(tls.server_name.encode("ascii", "replace"))
        if sni_host is not (route.host if route is not None else None):
            raise HttpError(421, "this connection is not for that host", close=False)
    if route is None:
        raise HttpError(404, "no proxy host for this name", close=False)

    body, body_length = _body_framing(length, te) if te or length is not None else _NO_BODY
    websocket = False
    if conn_values:
        tokens, dropped = parse_connection(conn_values)
        if dropped:  # Connection names more fields to drop (rare): the ordinary fields again
            out = _ordinary(headers, dropped, underscores, trusted)
        # HTTP/1.0 has no Upgrade (RFC 9110 7.8): served as plain HTTP, the field dropped.
        websocket = b"upgrade" in tokens and version == "1.1" and is_websocket_upgrade(upgrade)
        if websocket:
            if body != BODY_NONE:
                raise HttpError(400, "a WebSocket handshake cannot carry a body")
            check_request(method, version, ws_key, ws_version)
    if upgrade is not None and not websocket and version == "1.1":
        check_upgrade_alone(upgrade)
    if tls is None:
        if route.host.force_https and path[:_ACME_LEN] != ACME_PREFIX:
            raise _to_https(route_name, router.https_port, path if path[:1] == b"/" else b"/")
        scheme = b"http"
        hsts = None
    else:
        scheme = b"https"
        hsts = route.hsts  # (RFC 6797 7.2: never over plain http)
    out[0] = b"".join((method, b" ", target, b" HTTP/1.1\r\nHost: ", host_value, b"\r\n"))

    if max_forwards is not None:
        if method == b"OPTIONS":  # RFC 9110 7.6.2: the last hop answers itself
            if max_forwards == 0:
                raise HttpError(200, close=False)
            max_forwards -= 1
        out += (b"Max-Forwards: ", b"%d" % max_forwards, b"\r\n")

    peer = peer_ip.encode("latin-1")
    joined_xff = b", ".join(xff) if xff else None
    client_ip = policy.client_ip(peer_ip, joined_xff) if trusted else peer_ip
    if trusted:
        out += (
            b"X-Forwarded-For: ", joined_xff + b", " + peer if joined_xff else peer,
            b"\r\nX-Forwarded-Proto: ", xfp or scheme,
            b"\r\nX-Forwarded-Host: ", xfh or host_value,
            b"\r\nX-Real-IP: ", client_ip.encode("latin-1"), b"\r\n",
        )
        if forwarded:
            node = b'"[' + peer + b']"' if b":" in peer else peer
            proto = b";proto=https" if tls is not None else b""
            out += (b"Forwarded: ", b", ".join(forwarded), b", for=", node, proto, b"\r\n")
    else:
        out += (
            b"X-Forwarded-For: ", peer, b"\r\nX-Forwarded-Proto: ", scheme,
            b"\r\nX-Forwarded-Host: ", host_value, b"\r\nX-Real-IP: ", peer, b"\r\n",
        )
    if via:
        out += (b"Via: ", b", ".join(via), b", 1.1 charon\r\n")
    else:
        out.append(b"Via: 1.1 charon\r\n")
    if body == BODY_LENGTH:
        out += (b"Content-Length: ", length or b"0", b"\r\n\r\n")
    elif body == BODY_CHUNKED:
        out.append(b"Transfer-Encoding: chunked\r\n\r\n")
    elif websocket:
        out.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    else:
        out.append(b"\r\n")

    plan = RequestPlan(
        route, method, b"".join(out), body, body_length, client_ip, path,
        ws_key.strip() if websocket and ws_key else None, hsts, route.group.single,
        None, tls is not None,
    )
    single = plan.target
    if single is None or not single.health.checked_up:  # several targets, or one that is down
        group = route.group
        if group.key_ip:
            plan.lb_key = client_ip.encode("latin-1")
        elif group.key_field is not None:
            plan.lb_key = _lb_key(group, specials, headers)
        plan.target = None
        if choose:
            choose_target(plan)
    return plan


def choose_target(plan: RequestPlan) -> TargetState:
    """The route's policy chooses the plan's target; HttpError 503 when none can take it."""
    group = plan.route.group
    target = group.choose(plan.lb_key)
    if target is None:
        raise HttpError(
            503, "no backend available", close=False,
            fields=b"Retry-After: %d\r\n" % group.retry_after(),
            body=b"503 Service Unavailable: no backend available\n",
        )
    use_target(plan, target)
    return target


def use_target(plan: RequestPlan, target: TargetState) -> None:
    """`target` serves the plan (chosen, or another after a failure); the cookie policy's
    response names it unless the request's cookie did."""
    plan.target = target
    group = plan.route.group
    if group.set_cookie:
        plan.set_cookie = None if plan.lb_key == target.cookie else group.cookie_field(
            target, plan.tls
        )


def _lb_key(
    group: TargetGroup, specials: list[tuple[int, bytes]], headers: list[Header]
) -> bytes | None:
    """The value of the field the group's policy reads (the named header, or its cookie),
    from the fields set aside in the one pass; None when the request has none."""
    kind = group.key_special
    field = group.key_field
    assert field is not None
    if kind == 0:
        kind, new = _key_field_kind(field)
        group.key_special = kind
        if new:  # this request was walked before the field had a kind: found here, this once
            kind = _SCAN
    if kind == _SCAN:
        values = [value for name, value in headers if name.lower() == field]
    else:
        values = [value for k, value in specials if k == kind]
    if not values:
        return None
    if group.set_cookie:
        return find_cookie(values, group.cookie_name)
    return values[0].strip()


def _key_field_kind(lname: bytes) -> tuple[int, bool]:
    """The kind of a field an lb_policy reads, made one of the specials (forwarded as it
    was) the first time; (kind, True) when it was made now."""
    kind = _SPECIAL.get(lname)
    if kind is not None:
        return (kind, False) if kind != _CLIENT_IP else (_SCAN, False)
    if lname.find(b"_") != -1:
        return _SCAN, False
    kind = _KEY_FIELD_FIRST + sum(1 for k in _SPECIAL.values() if k >= _KEY_FIELD_FIRST)
    _SPECIAL[lname] = _kinds[lname] = kind
    return kind, True


def _to_https(name: bytes, port: bytes, path: bytes) -> HttpError:
    """force_https's answer: the same host (its port replaced) and target, over https. The
    name and path passed the Host and target checks: no byte of them can end a field."""
    location = b"".join((b"Location: https://", name, port, path, b"\r\n"))
    return HttpError(308, close=False, fields=location)


def _ordinary(
    headers: list[Header], dropped: frozenset[bytes], underscores: bool, trusted: bool
) -> list[bytes]:
    """The head's fields forwarded as received, without those `Connection` named (out[0], the
    request line and Host, left to fill) - the first loop of plan_request, again."""
    out = [b""]
    for name, value in headers:
        lname = name.lower()
        if lname in dropped:
            continue
        kind = _kind(lname)
        if kind == _PLAIN:
            keep = True
        elif kind == _UNDERSCORED:
            keep = underscores
        elif kind == _CLIENT_IP:
            keep = trusted
        else:
            keep = kind >= _FORWARDED_TOO
        if keep:
            out += (name, b": ", value, b"\r\n")
    return out


def _max_forwards(value: bytes, before: int | None) -> int:
    """Max-Forwards = 1*DIGIT (RFC 9110 7.6.2); several lines must agree."""
    value = value.strip()
    if not value.isdigit():
        raise HttpError(400, "invalid Max-Forwards")
    number = int(value) if len(value) < 10 else 1 << 31  # (int() refuses 4,300 digits)
    if before is not None and before != number:
        raise HttpError(400, "conflicting Max-Forwards")
    return number


def _authority_and_path(
    target: bytes, method: bytes, host_values: list[bytes]
) -> tuple[bytes, bytes, bytes]:
    """(Host value to forward, lowercased host name to route by, path) - decision 7."""
    if len(host_values) != 1:
        raise HttpError(400, "exactly one Host header is required")
    host_value = host_values[0].strip()
    if target[:1] == b"/":
        path = target
    elif target == b"*" and method == b"OPTIONS":
        path = b"*"
    elif target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        rest = target[target.index(b"//") + 2 :]
        end = len(rest)
        for stop in (b"/", b"?", b"#"):
            at = rest.find(stop)
            if at != -1 and at < end:
                end = at
        # For absolute-form the target's authority wins over the Host header (RFC 9112 3.2.2).
        host_value, path = rest[:end], rest[end:] or b"/"
        if b"@" in host_value:
            raise HttpError(400, "userinfo is not allowed in the request target")
    else:
        raise HttpError(400, "invalid request target")
    name = host_name(host_value)
    if name is None:
        raise HttpError(400, "invalid Host header")
    return host_value, name, path


def _body_framing(length: bytes | None, te: list[bytes] | None) -> tuple[int, int]:
    # llhttp already refused CL with TE, repeated or invalid CL. It reports a Transfer-Encoding
    # not ending in chunked only after on_headers_complete, i.e. after this ran.
    if te:
        codings = [c.strip().lower() for value in te for c in value.split(b",")]
        if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            raise HttpError(400, "Transfer-Encoding must end in a single chunked")
        if len(codings) > 1:
            raise HttpError(501, "only the chunked transfer coding is supported")
        return BODY_CHUNKED, 0
    if length is not None:
        digits = length.strip()
        if not digits.isdigit():  # int() would also take "+1", "1_0", "-0" (and raise on "x")
            raise HttpError(400, "invalid Content-Length")
        return BODY_LENGTH, int(digits)
    return BODY_NONE, 0
