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
from charon.worker.http.choosing import lb_key, no_target
from charon.worker.http.errors import HttpError
from charon.worker.http.fieldkinds import (
    AUTHORIZATION,
    CLIENT_IP,
    CONNECTION,
    FORWARDED,
    FORWARDED_TOO,
    HOST,
    KINDS,
    LENGTH,
    MAX_FORWARDS,
    PLAIN,
    TE,
    UNDERSCORED,
    UPGRADE,
    VIA,
    WS_KEY,
    WS_VERSION,
    XFF,
    XFH,
    XFP,
    kind_of,
)
from charon.worker.http.headerrules import follow_target, own_fields
from charon.worker.http.headers import (
    ForwardedPolicy,
    Header,
    host_name,
    parse_connection,
)
from charon.worker.http.target import check_target
from charon.worker.routing import Route, Router
from charon.worker.websocket.handshake import (
    check_request,
    check_upgrade_alone,
    is_websocket_upgrade,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from charon.worker.access.route import Wait
    from charon.worker.tlsinfo import TlsInfo
    from charon.worker.upstreams.group import TargetState

BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2

_NO_BODY = (BODY_NONE, 0)
_NOTHING: frozenset[bytes] = frozenset()

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_ACME_LEN = len(ACME_PREFIX)


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
    # Left by the route's rules (worker/access/route.py): work to finish before sending, and
    # counted resources to give back when the request or its tunnel ends.
    waits: list[Wait] | None = None
    leases: list[Callable[[], None]] | None = None
    authorization: bytes | None = None  # the client's Authorization field (for basic auth)

    def release(self) -> None:
        """Give back what the rules counted for this request (idempotent)."""
        leases = self.leases
        if leases:
            self.leases = None
            for lease in leases:
                lease()


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
    admit: bool = True,
) -> RequestPlan:
    """`tls`: what the client's TLS connection negotiated; None on a plain listener.
    `choose`: choose the target now (HttpError 503 if none can take it); else the plan's
    target is left to `choose_target` (what the policy needs is kept in the plan).
    `admit`: run the route's rules (False: the caller runs `route.rules.admit` itself, or the
    front door already did for this request)."""
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
    known = KINDS.get
    underscores = policy.allow_underscores
    trusted = policy.trusts_anyone and policy.is_trusted(peer_ip)
    for name, value in headers:
        lname = name.lower()
        kind = known(lname)
        if kind is None:
            kind = kind_of(lname)
        if kind == PLAIN:
            out += (name, b": ", value, b"\r\n")
        elif kind == UNDERSCORED:
            # `Transfer_Encoding` is Transfer-Encoding to servers that map `-` and `_` alike
            # (CGI-style environments): dropped, as nginx does by default.
            if underscores:
                out += (name, b": ", value, b"\r\n")
        elif kind == CLIENT_IP:
            if trusted:
                out += (name, b": ", value, b"\r\n")
        else:
            specials.append((kind, value))
            if kind >= FORWARDED_TOO:
                out += (name, b": ", value, b"\r\n")

    host_values: list[bytes] = []
    conn_values: list[bytes] = []
    upgrade = length = xfp = xfh = ws_key = ws_version = max_forwards = None
    te: list[bytes] | None = None
    xff: list[bytes] | None = None
    forwarded: list[bytes] | None = None
    via: list[bytes] | None = None
    authorization: list[bytes] | None = None
    for kind, value in specials:
        if kind == HOST:
            host_values.append(value)
        elif kind == CONNECTION:
            conn_values.append(value)
        elif kind == UPGRADE:
            upgrade = value
        elif kind == WS_KEY:
            ws_key = value
        elif kind == WS_VERSION:
            ws_version = value
        elif kind == LENGTH:
            length = value
        elif kind == TE:
            te = [*te, value] if te else [value]  # several lines form one list (RFC 9110 5.3)
        elif kind == XFF:
            xff = [*xff, value] if xff else [value]
        elif kind == XFP:
            xfp = value
        elif kind == XFH:
            xfh = value
        elif kind == FORWARDED:
            forwarded = [*forwarded, value] if forwarded else [value]
        elif kind == VIA:
            via = [*via, value] if via else [value]
        elif kind == MAX_FORWARDS:
            max_forwards = _max_forwards(value, max_forwards)
        elif kind == AUTHORIZATION:
            authorization = [*authorization, value] if authorization else [value]

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
    if body == BODY_LENGTH and route.max_body_size and body_length > route.max_body_size:
        # Before a byte of the body is read (a chunked body is cut where it passes it).
        refused = HttpError(413, "request body too large", denied="body_size")
        refused.extra = own_fields(route.hsts if tls is not None else None, route.headers)
        raise _denied(refused, route, None)
    websocket = False
    if conn_values:
        tokens, dropped = parse_connection(conn_values)
        if dropped:  # Connection names more fields to drop (rare): the ordinary fields again
            out = _ordinary(headers, dropped, underscores, trusted)
            if b"authorization" in dropped:
                authorization = None
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
    rules = route.rules
    if authorization is not None:
        if rules is not None:
            if len(authorization) > 1:  # which one would the backend believe?
                raise _denied(HttpError(400, "several Authorization fields"), route, client_ip)
            if rules.keeps_authorization:
                out += (b"Authorization: ", authorization[0], b"\r\n")
        else:
            for value in authorization:
                out += (b"Authorization: ", value, b"\r\n")
    if via:
        out += (b"Via: ", b", ".join(via), b", 1.1 charon\r\n")
    else:
        out.append(b"Via: 1.1 charon\r\n")
    header_rules = route.headers
    if header_rules is not None:  # (a route without header rules: None)
        out = header_rules.upstream_fields(out)
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
    if rules is not None:
        plan.authorization = authorization[0] if authorization else None
        if admit:
            try:
                rules.admit(plan, headers)
            except HttpError as error:
                error.extra = own_fields(hsts, header_rules)
                raise _denied(error, route, client_ip) from None
    single = plan.target
    if single is None or not single.health.checked_up:  # several targets, or one that is down
        group = route.group
        key = None
        if group.key_ip:
            key = plan.lb_key = client_ip.encode("latin-1")
        elif group.key_field is not None:
            key = plan.lb_key = lb_key(group, specials, headers)
        if not choose:
            plan.target = None
            return plan
        chosen = plan.target = group.choose(key)
        if chosen is None:
            plan.release()
            refused = no_target(group)
            refused.extra = own_fields(hsts, header_rules)
            raise refused
        if group.set_cookie and key != chosen.cookie:
            plan.set_cookie = chosen.cookie_fields[tls is not None]
    if header_rules is not None and header_rules.host_upstream and plan.target is not None:
        follow_target(plan, plan.target)
    return plan


def _denied(error: HttpError, route: Route, client_ip: str | None) -> HttpError:
    """`error` with the host (and client IP) its record and the denied metric are under."""
    error.host = route.host_name
    error.client_ip = client_ip
    return error


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
        kind = kind_of(lname)
        if kind == PLAIN:
            keep = True
        elif kind == UNDERSCORED:
            keep = underscores
        elif kind == CLIENT_IP:
            keep = trusted
        else:
            keep = kind >= FORWARDED_TOO
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
