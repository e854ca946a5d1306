"""Upgrade: websocket outside a complete HTTP/1.1 handshake (issue #10, item 5), the same on
the front door's first read and on the HTTP path (a second request on a connection).

- HTTP/1.0 has no Upgrade (RFC 9110 7.8): the request is served as plain HTTP, the Upgrade
  ignored (not forwarded), never answered 101 or 400.
- HTTP/1.1 with `Upgrade: websocket` that `Connection` does not name is a broken handshake:
  400, not a plain request forwarded with the upgrade silently dropped.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from harness import HOST
from test_websocket_handshake import (
    KEY,
    Env,
    handshake_hosts,
    http_get_json,
    ws_env,
    ws_request,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with ws_env(tmp_path_factory.mktemp("upgrade-rules"), handshake_hosts) as env:
        yield env


def all_until_close(sock: socket.socket) -> bytes:
    """All the proxy sends until it closes (bounded: 10 s, each recv by the socket's timeout)."""
    got = bytearray()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(got)
        got += chunk
    raise AssertionError(f"no close after {bytes(got)!r}")


def answer(env: Env, request: bytes, warm_up: bool) -> bytes:
    """What the proxy sends for `request` until it closes the connection (the request ends
    with Connection: close or is HTTP/1.0, or the proxy closes after its error)."""
    with socket.create_connection((HOST, env.port), timeout=10) as sock:
        if warm_up:
            sock.sendall(f"GET /plain HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            got = b""
            while not got.endswith(b"plain"):
                chunk = sock.recv(4096)
                assert chunk, got
                got += chunk
        sock.sendall(request)
        return all_until_close(sock)


def _both_ways(env: Env, request: bytes) -> bytes:
    front = answer(env, request, warm_up=False)
    http = answer(env, request, warm_up=True)
    assert front == http, f"front door:\n{front!r}\nHTTP path:\n{http!r}"
    return front


def test_http10_upgrade_is_served_as_plain_http(env: Env) -> None:
    request = ws_request("/plain", http=b"HTTP/1.0")
    got = _both_ways(env, request)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), got
    assert body == b"plain", got
    seen = [r for r in http_get_json(f"{env.ws.url}/seen") if r["path"] == "/plain"]
    assert seen and all(r["upgrade"] == "" for r in seen), seen  # Upgrade not forwarded


@pytest.mark.parametrize(
    "connection",
    [
        pytest.param(b"", id="no-connection"),
        pytest.param(b"Connection: keep-alive\r\n", id="connection-keep-alive"),
        pytest.param(b"Connection: close\r\n", id="connection-close"),
    ],
)
def test_http11_websocket_upgrade_without_connection_upgrade_is_400(
    env: Env, connection: bytes
) -> None:
    request = (
        b"GET /plain HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\nUpgrade: websocket\r\n"
        + connection + b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    got = _both_ways(env, request)
    assert got.startswith(b"HTTP/1.1 400 "), got


def test_other_protocol_upgrade_alone_is_still_forwarded(env: Env) -> None:
    """Only a WebSocket upgrade is refused: `Upgrade: h2c` alone is dropped as hop-by-hop."""
    request = (
        b"GET /plain HTTP/1.1\r\nHost: " + HOST.encode()
        + b"\r\nUpgrade: h2c\r\nConnection: close\r\n\r\n"
    )
    got = _both_ways(env, request)
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"plain"), got
