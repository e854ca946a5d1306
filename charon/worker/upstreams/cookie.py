"""The sticky cookie of the `cookie` policy: a signed value naming one target of a group.

The value is the first 16 bytes, base64url, of HMAC-SHA256(key, backends name NUL target URL),
keyed by a secret every worker of a supervisor derives alike (from the secret the supervisor
passes its workers for TLS tickets), so any worker maps a cookie to the same target and a
client cannot name a target the proxy did not give it. It says nothing readable about the
backend (no address leaks to the client).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

_LABEL = b"charon sticky cookie key"


def cookie_key(secret: bytes) -> bytes:
    """The signing key, derived with a label so it is never a TLS ticket key."""
    return hmac.new(secret, _LABEL, hashlib.sha256).digest()


def cookie_value(key: bytes, backends_name: str, url: str) -> bytes:
    mac = hmac.new(key, f"{backends_name}\0{url}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:16]).rstrip(b"=")


def set_cookie_field(name: str, value: bytes, secure: bool) -> tuple[bytes, bytes]:
    """The response field that gives the client the cookie."""
    attributes = b"; Path=/; HttpOnly; SameSite=Lax" + (b"; Secure" if secure else b"")
    return b"Set-Cookie", name.encode("latin-1") + b"=" + value + attributes


def find_cookie(values: list[bytes], name: bytes) -> bytes | None:
    """The value of cookie `name` in the request's Cookie field(s) (RFC 6265 5.4: `; `
    separated pairs); the first one wins, as browsers send the most specific path first."""
    for value in values:
        at = value.find(name)
        if at == -1:
            continue
        for pair in value.split(b";"):
            cookie_name, eq, cookie = pair.partition(b"=")
            if eq and cookie_name.strip() == name:
                return cookie.strip().strip(b'"')
    return None
