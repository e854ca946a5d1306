"""WebSocket opening handshake checks, both ways (RFC 6455 section 4; protocol notes decision 2)."""

from __future__ import annotations

import binascii

try:
    # CPython's own SHA-1: a quarter fewer instructions per short digest than OpenSSL's
    # (EVP context set-up), and no security question here (RFC 6455 accept value).
    from _sha1 import sha1
except ImportError:  # a Python built without it
    from hashlib import sha1

from charon.worker.http.errors import HttpError
from charon.worker.http.headers import Header, parse_connection

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def is_websocket_upgrade(upgrade: bytes | None) -> bool:
    if upgrade is None:
        return False
    if upgrade.lower() == b"websocket":  # the usual value: no list to split
        return True
    return b"websocket" in [t.strip().lower() for t in upgrade.split(b",")]


def check_request(method: bytes, version: str, key: bytes | None, ws_version: bytes | None) -> None:
    """Raise HttpError unless this is a valid client handshake (Upgrade/Connection already seen)."""
    if method != b"GET" or version != "1.1":
        raise HttpError(400, "a WebSocket handshake must be an HTTP/1.1 GET")
    if ws_version is None or ws_version.strip() != b"13":
        raise HttpError(426, "unsupported WebSocket version")
    if key is None:
        raise HttpError(400, "missing Sec-WebSocket-Key")
    try:
        # strict_mode: only the base64 alphabet, padding at the end (b64decode's validate=True)
        decoded = binascii.a2b_base64(key.strip(), strict_mode=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        raise HttpError(400, "invalid Sec-WebSocket-Key")


def accept_value(key: bytes) -> bytes:
    return binascii.b2a_base64(sha1(key.strip() + _GUID).digest(), newline=False)


# Backend headers the proxy does not relay with a 101: it writes Upgrade and Connection itself.
_NOT_RELAYED = frozenset(
    {b"upgrade", b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
     b"proxy-connection"}
)


def switching_response(headers: list[Header], key: bytes) -> tuple[bytes, bytes] | None:
    """A backend's 101 (its header fields) for the handshake with `key`.

    None when it does not complete the handshake the client asked for; else the 101 for the
    client, with the backend's end-to-end headers (protocol, extensions), and the subprotocol.
    """
    upgrade = accept = None
    conn: list[bytes] = []
    subprotocol = b""
    out = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"]
    for name, value in headers:  # one pass, one lower() per field
        lname = name.lower()
        if lname in _NOT_RELAYED:
            if lname == b"upgrade":
                upgrade = value
            elif lname == b"connection":
                conn.append(value)
            continue
        if lname == b"sec-websocket-accept":
            if accept is not None:
                return None
            accept = value.strip()
        elif lname == b"sec-websocket-protocol" and not subprotocol:
            subprotocol = value
        out += (name, b": ", value, b"\r\n")
    if not (
        is_websocket_upgrade(upgrade)
        and b"upgrade" in parse_connection(conn)[0]
        and accept == accept_value(key)
    ):
        return None
    out.append(b"\r\n")
    return b"".join(out), subprotocol
