"""WebSocket opening handshake checks, both ways (RFC 6455 section 4; protocol notes decision 2)."""

from __future__ import annotations

import base64
import binascii
import hashlib

from charon.worker.http.errors import HttpError
from charon.worker.http.headers import Header, connection_tokens

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def is_websocket_upgrade(upgrade: bytes | None) -> bool:
    return upgrade is not None and b"websocket" in (
        t.strip().lower() for t in upgrade.split(b",")
    )


def check_request(method: bytes, version: str, key: bytes | None, ws_version: bytes | None) -> None:
    """Raise HttpError unless this is a valid client handshake (Upgrade/Connection already seen)."""
    if method != b"GET" or version != "1.1":
        raise HttpError(400, "a WebSocket handshake must be an HTTP/1.1 GET")
    if ws_version is None or ws_version.strip() != b"13":
        raise HttpError(426, "unsupported WebSocket version")
    if key is None:
        raise HttpError(400, "missing Sec-WebSocket-Key")
    try:
        decoded = base64.b64decode(key.strip(), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        raise HttpError(400, "invalid Sec-WebSocket-Key")


def accept_value(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def check_response(headers: list[Header], key: bytes) -> bool:
    """True when a backend's 101 completes the handshake the client asked for."""
    upgrade = accept = None
    conn: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"upgrade":
            upgrade = value
        elif lname == b"connection":
            conn.append(value)
        elif lname == b"sec-websocket-accept":
            if accept is not None:
                return False
            accept = value.strip()
    return (
        is_websocket_upgrade(upgrade)
        and b"upgrade" in connection_tokens(conn)
        and accept == accept_value(key)
    )


def switching_head(headers: list[Header]) -> bytes:
    """The 101 for the client, with the backend's end-to-end headers (protocol, extensions)."""
    out = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"]
    for name, value in headers:
        lname = name.lower()
        if lname in (b"upgrade", b"connection", b"keep-alive", b"transfer-encoding",
                     b"content-length", b"proxy-connection"):
            continue
        out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)
