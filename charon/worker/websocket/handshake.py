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
from charon.worker.http.headerrules import ResponseOps
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


def check_upgrade_alone(upgrade: bytes) -> None:
    """An HTTP/1.1 request whose Upgrade is not named by Connection: a broken WebSocket
    handshake is refused rather than forwarded as a plain request; another protocol's
    Upgrade is dropped as hop-by-hop."""
    if is_websocket_upgrade(upgrade):
        raise HttpError(400, "a WebSocket handshake needs Connection: upgrade")


def accept_value(key: bytes) -> bytes:
    return binascii.b2a_base64(sha1(key.strip() + _GUID).digest(), newline=False)


# Backend headers the proxy does not relay with a 101: it writes Upgrade and Connection itself.
_NOT_RELAYED = frozenset(
    {b"upgrade", b"connection", b"keep-alive", b"transfer-encoding", b"content-length",
     b"proxy-connection"}
)


def switching_response(
    headers: list[Header], key: bytes, request_head: bytes, rules: ResponseOps | None = None
) -> tuple[bytes, bytes] | None:
    """A backend's 101 (its header fields) for the handshake with `key`, whose request went to
    the backend as `request_head`.

    None when it does not complete the handshake the client asked for (RFC 6455 4.1: the
    client would fail the connection: a subprotocol or an extension it did not offer
    included); else the 101 for the client, with the backend's end-to-end headers (protocol,
    extensions), and the subprotocol. `rules`: the route's response header rules (for a 101:
    none naming a Sec-WebSocket-* field), applied to the fields relayed.
    """
    upgrade = accept = None
    conn: list[bytes] = []
    subprotocol = b""
    protocols = 0
    extensions: list[bytes] | None = None
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
        elif lname == b"sec-websocket-protocol":
            protocols += 1
            subprotocol = value.strip()
        elif lname == b"sec-websocket-extensions":
            extensions = [*extensions, value] if extensions else [value]
        out += (name, b": ", value, b"\r\n")
    if not (
        is_websocket_upgrade(upgrade)
        and b"upgrade" in parse_connection(conn)[0]
        and accept == accept_value(key)
    ):
        return None
    if protocols and (
        protocols > 1
        or subprotocol not in _tokens(_values(request_head, b"sec-websocket-protocol"))
    ):
        return None
    if extensions and not _extension_names(extensions) <= _extension_names(
        _values(request_head, b"sec-websocket-extensions")
    ):
        return None
    if rules is not None:
        relayed = [(n, v) for n, v in headers if n.lower() not in _NOT_RELAYED]
        out[1:] = [b"".join(n + b": " + v + b"\r\n" for n, v in rules.apply(relayed))]
    out.append(b"\r\n")
    return b"".join(out), subprotocol


# What the client offered is read back from the request head the proxy wrote (what the backend
# saw), only when a 101 names a protocol or an extension: no cost for other handshakes.


def _values(request_head: bytes, name: bytes) -> list[bytes]:
    values = []
    for line in request_head.split(b"\r\n")[1:]:
        field, colon, value = line.partition(b":")
        if colon and field.lower() == name:
            values.append(value)
    return values


def _tokens(values: list[bytes]) -> set[bytes]:
    return {token for value in values for item in value.split(b",") if (token := item.strip())}


def _extension_names(values: list[bytes]) -> set[bytes]:
    """Extension names (before their parameters), lowercased."""
    return {
        name
        for value in values
        for item in value.split(b",")
        if (name := item.split(b";")[0].strip().lower())
    }
