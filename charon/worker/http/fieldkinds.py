"""What each request header is to the request planner (request.py), by lowercased name.

PLAIN fields are forwarded as they are, UNDERSCORED ones only if allowed, CLIENT_IP ones from a
trusted proxy only; the rest are treated specially (set aside in the planner's one pass over
the fields), and those from FORWARDED_TOO on are forwarded too. The fields a route's
lb_policy reads (header_hash's header, the cookie policy's Cookie) become specials the first
time a group needs them (`key_field_kind`), so the policy finds them without a second pass.
"""

from __future__ import annotations

from charon.worker.http.headers import CACHE_LIMIT

(UNDERSCORED, PLAIN, HOST, CONNECTION, UPGRADE, LENGTH, TE, XFF, XFP, XFH, FORWARDED,
 VIA, DROP, CLIENT_IP, MAX_FORWARDS, WS_KEY, WS_VERSION) = range(-2, 15)
FORWARDED_TOO = WS_KEY
# Set aside, and forwarded unless the route's basic auth consumes it (request.py).
AUTHORIZATION = -3
SPECIAL = {
    b"host": HOST,
    b"content-length": LENGTH,
    b"transfer-encoding": TE,
    b"connection": CONNECTION,
    b"x-forwarded-for": XFF,
    b"x-forwarded-proto": XFP,
    b"x-forwarded-host": XFH,
    b"forwarded": FORWARDED,
    b"via": VIA,
    b"upgrade": UPGRADE,
    b"keep-alive": DROP,
    b"proxy-connection": DROP,
    b"te": DROP,
    b"trailer": DROP,
    b"proxy-authenticate": DROP,
    b"proxy-authorization": DROP,
    b"sec-websocket-key": WS_KEY,
    b"sec-websocket-version": WS_VERSION,
    b"max-forwards": MAX_FORWARDS,
    b"authorization": AUTHORIZATION,
    # Client addresses other proxies and CDNs set: a client could claim any address with them.
    # X-Real-IP is always the proxy's own (decision 6's client IP).
    b"x-real-ip": DROP,
    b"true-client-ip": CLIENT_IP,
    b"cf-connecting-ip": CLIENT_IP,
    b"x-client-ip": CLIENT_IP,
    b"fastly-client-ip": CLIENT_IP,
    b"x-cluster-client-ip": CLIENT_IP,
    b"x-originating-ip": CLIENT_IP,
    b"x-remote-ip": CLIENT_IP,
    b"x-remote-addr": CLIENT_IP,
    b"client-ip": CLIENT_IP,
}
# The fields a group's lb_policy reads (header_hash's header, cookie's Cookie) get kinds of their
# own from here on when a group first needs them: set aside with the specials, and forwarded.
KEY_FIELD_FIRST = 100
SCAN = -1  # a key field that cannot be set aside (a client-address or underscored name)
# SPECIAL and the kinds of the other names seen, so that a request's fields cost one lookup
# each, as before underscores were looked for (bytes' `in` is slow: it tries an int first).
KINDS = dict(SPECIAL)


def kind_of(lname: bytes) -> int:
    kind = KINDS.get(lname)
    if kind is None:
        kind = PLAIN if lname.find(b"_") == -1 else UNDERSCORED
        if len(KINDS) >= CACHE_LIMIT:
            KINDS.clear()
            KINDS.update(SPECIAL)
        KINDS[lname] = kind
    return kind


def key_field_kind(lname: bytes) -> tuple[int, bool]:
    """The kind of a field an lb_policy reads, made one of the specials (forwarded as it
    was) the first time; (kind, True) when it was made now."""
    kind = SPECIAL.get(lname)
    if kind is not None:
        return (kind, False) if kind != CLIENT_IP else (SCAN, False)
    if lname.find(b"_") != -1:
        return SCAN, False
    kind = KEY_FIELD_FIRST + sum(1 for k in SPECIAL.values() if k >= KEY_FIELD_FIRST)
    SPECIAL[lname] = KINDS[lname] = kind
    return kind, True
