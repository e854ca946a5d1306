"""One active health check of one target: an HTTP GET, or a WebSocket handshake then a Close.

A probe is one connection, bounded as a whole by the check's `timeout` (connect, TLS, request,
answer head); it reads the status line and header section (at most MAX_HEAD bytes), never the
body, then closes. https:// targets are checked over TLS verified as the workers verify them
(tls_verify, tls_ca: the same client contexts, worker/upstreams/tls.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
import struct
from dataclasses import dataclass

from charon.config.model import HealthCheck, Upstream
from charon.worker.upstreams.tls import client_context

MAX_HEAD = 16 * 1024  # a status line and headers longer than this fail the check
USER_AGENT = b"charon-health-check"
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    reason: str  # why it failed, or what passed ("200", "101")


def request_head(check: HealthCheck, host: str, key: bytes | None = None) -> bytes:
    """The probe's request: `key` makes it a WebSocket handshake."""
    lines = [
        b"GET " + check.path.encode("latin-1") + b" HTTP/1.1",
        b"Host: " + host.encode("idna" if not host.isascii() else "ascii"),
        b"User-Agent: " + USER_AGENT,
    ]
    if key is None:
        lines.append(b"Connection: close")
    else:
        lines += [
            b"Connection: Upgrade",
            b"Upgrade: websocket",
            b"Sec-WebSocket-Version: 13",
            b"Sec-WebSocket-Key: " + key,
        ]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def accept_value(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())  # RFC 6455 4.2.2


def parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    """The status and header fields (names lowercase; a repeated one keeps its last value) of
    a response head; ValueError if it is not HTTP/1.x."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:60]!r}")
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            raise ValueError("a header line without a colon")
        fields[name.strip().lower()] = value.strip()
    return int(code), fields


def status_ok(check: HealthCheck, status: int) -> bool:
    if check.expect_status:
        return status in check.expect_status
    return 200 <= status < 400


async def probe(target: Upstream, check: HealthCheck, host: str) -> Outcome:
    """Check `target` once; never raises (but for cancellation)."""
    try:
        async with asyncio.timeout(check.timeout):
            return await _exchange(target, check, host)
    except TimeoutError:
        return Outcome(False, f"no answer within {check.timeout:g}s")
    except ssl.SSLError as exc:
        return Outcome(False, f"tls: {exc.reason or exc}")
    except OSError as exc:
        return Outcome(False, f"connect: {exc.strerror or exc}")
    except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        return Outcome(False, _describe(exc))


async def _exchange(target: Upstream, check: HealthCheck, host: str) -> Outcome:
    context = client_context(target.tls_verify, target.tls_ca) if target.tls else None
    reader, writer = await asyncio.open_connection(
        target.host, target.port, ssl=context, limit=MAX_HEAD,
        server_hostname=target.host if context is not None else None,
    )
    try:
        key = base64.b64encode(os.urandom(16)) if check.websocket else None
        writer.write(request_head(check, host, key))
        head = await reader.readuntil(b"\r\n\r\n")
        status, fields = parse_head(head)
        if key is None:
            if status_ok(check, status):
                return Outcome(True, str(status))
            return Outcome(False, f"status {status}")
        if status != 101:
            return Outcome(False, f"status {status}, not 101")
        if b"websocket" not in fields.get(b"upgrade", b"").lower():
            return Outcome(False, "101 without Upgrade: websocket")
        if fields.get(b"sec-websocket-accept") != accept_value(key):
            return Outcome(False, "101 with a wrong Sec-WebSocket-Accept")
        # A Close (1000, masked as a client's must be) so the backend sees a clean end.
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(struct.pack("!H", 1000)))
        writer.write(b"\x88\x82" + mask + payload)
        with contextlib.suppress(OSError):
            await writer.drain()
        return Outcome(True, "101")
    finally:
        if context is None:
            writer.transport.abort()  # nothing more to say: no FIN_WAIT dance
        else:
            writer.close()  # close_notify; not waited for (the timeout bounds the probe)


def _describe(exc: Exception) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed before a whole answer head" if exc.partial else "closed without answering"
    if isinstance(exc, asyncio.LimitOverrunError):
        return f"answer head over {MAX_HEAD} bytes"
    return str(exc)
