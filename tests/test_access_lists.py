"""Access lists end to end: a real `charon run` (2 workers) in front of ws_backend.py, which
records every request it receives (/seen). A refused request gets 403 and never reaches the
backend: plain GETs, WebSocket handshakes taken by the front door (the connection's first
read) and by the HTTP path (a keep-alive connection's second request). Client addresses are
chosen by binding the client socket to 127.0.0.x (or ::1, on a second listener)."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from harness import HOST, Backend, Charon, free_port
from rawconn import RawConn
from test_websocket_handshake import client_frame, ws_request


@dataclass
class Env:
    charon: Charon
    port: int
    port6: int
    backend: Backend


def hosts_toml(backend: Backend) -> str:
    url = backend.url
    return f"""
        [access.office]
        allow = ["127.0.0.2", "::1"]

        [access.lan]
        allow = ["127.0.0.0/8"]
        deny = ["127.0.0.4/32"]

        [[hosts]]
        domains = ["deny.test"]
        upstream = "{url}"
        deny = ["127.0.0.1", "::1"]

        [[hosts.locations]]
        path = "/open/"
        upstream = "{url}"
        allow = ["127.0.0.1"]

        [[hosts]]
        domains = ["named.test"]
        upstream = "{url}"
        access = ["office", "lan"]
        deny = ["127.0.0.0/30"]

        [[hosts]]
        domains = ["proxied.test"]
        upstream = "{url}"
        allow = ["198.51.100.0/24"]

        [[hosts]]
        domains = ["bare.test"]
        upstream = "{url}"
        """


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    backend = Backend("ws_backend.py")
    try:
        charon = Charon(tmp_path_factory.mktemp("acl"), hosts_toml(backend), workers=2,
                        server_toml='trusted_proxies = ["127.0.0.9/32"]')
        port6 = free_port()
        text = charon.config_path.read_text()
        listen = f'listen = ["{HOST}:{charon.port}"]'
        assert listen in text
        charon.config_path.write_text(
            text.replace(listen, f'listen = ["{HOST}:{charon.port}", "[::1]:{port6}"]'))
        try:
            charon.start()
            yield Env(charon, charon.port, port6, backend)
        finally:
            charon.stop()
    finally:
        backend.stop()


def connect(env: Env, source: str = "127.0.0.1") -> RawConn:
    """One raw client connection from a chosen source address."""
    if ":" in source:
        return RawConn(socket.create_connection(("::1", env.port6), 5, (source, 0)))
    return RawConn(socket.create_connection((HOST, env.port), 5, (source, 0)))


def get(host: str, path: str, extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra + b"\r\n"


def tag() -> str:
    return uuid.uuid4().hex[:10]


def seen(env: Env, marker: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{env.backend.url}/seen", timeout=5) as r:
        return [entry for entry in json.loads(r.read()) if marker in entry["path"]]


def status_of(env: Env, host: str, path: str, source: str = "127.0.0.1",
              extra: bytes = b"") -> int:
    with connect(env, source) as conn:
        head, body = conn.response(get(host, path, extra))
        if head.status == 403:
            assert body == b"403 Forbidden: access denied\n"
        return head.status


def handshake(env: Env, host: str, path: str, source: str = "127.0.0.1",
              front_door: bool = True) -> int:
    """The status a WebSocket handshake gets: as its connection's first read (the front door),
    or after a keep-alive request (the HTTP path)."""
    with connect(env, source) as conn:
        if not front_door:
            first, _ = conn.response(get(host, "/plain?warm-up"))
            assert first.status in (200, 403)
        head, body = conn.response(ws_request(path, host))
        if head.status == 101:
            conn.sock.sendall(client_frame(0x8, b"\x03\xe8"))
        else:
            assert head.status == 403, head.raw
            assert body == b"403 Forbidden: access denied\n"
            assert conn.closed()  # a refused handshake ends its connection
        return head.status


def test_denied_get_is_403_and_the_backend_sees_nothing(env: Env) -> None:
    t = tag()
    assert status_of(env, "deny.test", f"/plain?{t}") == 403
    assert status_of(env, "deny.test", f"/plain?{t}", source="127.0.0.2") == 200
    assert [e["path"] for e in seen(env, t)] == [f"/plain?{t}"]


def test_a_refusal_keeps_the_connection(env: Env) -> None:
    t = tag()
    with connect(env) as conn:
        head, _ = conn.response(get("deny.test", f"/plain?{t}"))
        assert head.status == 403 and head.get("Connection") == "keep-alive"
        head, body = conn.response(get("bare.test", f"/plain?{t}-after"))
        assert (head.status, body) == (200, b"plain")
    assert [e["path"] for e in seen(env, t)] == [f"/plain?{t}-after"]


def test_denied_handshake_through_the_front_door(env: Env) -> None:
    t = tag()
    for _ in range(4):  # (both workers take some: the front door of each refuses alike)
        assert handshake(env, "deny.test", f"/echo?{t}") == 403
    assert seen(env, t) == []
    assert handshake(env, "deny.test", f"/echo?{t}-ok", source="127.0.0.3") == 101
    assert [e["upgrade"] for e in seen(env, t)] == ["websocket"]


def test_denied_handshake_through_the_http_path(env: Env) -> None:
    t = tag()
    assert handshake(env, "deny.test", f"/echo?{t}", front_door=False) == 403
    assert seen(env, t) == []
    assert handshake(env, "deny.test", f"/echo?{t}-ok", source="127.0.0.3",
                     front_door=False) == 101
    assert len(seen(env, t)) == 1


def test_a_location_list_replaces_the_hosts(env: Env) -> None:
    t = tag()
    # The location allows 127.0.0.1 (the backend has no /open/: its 404 says it was reached).
    assert status_of(env, "deny.test", f"/open/{t}") == 404
    assert status_of(env, "deny.test", f"/open/{t}", source="127.0.0.2") == 403  # not on it
    with connect(env) as conn:
        head, _ = conn.response(ws_request(f"/open/{t}-ws", "deny.test"))
        assert head.status == 404
    assert len(seen(env, t)) == 2


def test_named_lists_merge_with_the_inline_entries(env: Env) -> None:
    t = tag()
    # office allows 127.0.0.2/32, lan 127.0.0.0/8 minus 127.0.0.4, inline deny 127.0.0.0/30:
    # the longest prefix decides.
    expected = {"127.0.0.1": 403, "127.0.0.2": 200, "127.0.0.3": 403, "127.0.0.4": 403,
                "127.0.0.5": 200}
    got = {ip: status_of(env, "named.test", f"/plain?{t}", source=ip) for ip in expected}
    assert got == expected
    assert len(seen(env, t)) == 2


def test_ipv6_loopback(env: Env) -> None:
    t = tag()
    assert status_of(env, "deny.test", f"/plain?{t}", source="::1") == 403
    assert handshake(env, "deny.test", f"/echo?{t}", source="::1") == 403
    assert status_of(env, "named.test", f"/plain?{t}-named", source="::1") == 200
    assert [e["path"] for e in seen(env, t)] == [f"/plain?{t}-named"]


def test_the_trusted_proxies_client_ip_decides(env: Env) -> None:
    t = tag()
    inside = b"X-Forwarded-For: 198.51.100.20\r\n"
    outside = b"X-Forwarded-For: 198.51.100.20, 192.0.2.1\r\n"
    assert status_of(env, "proxied.test", f"/plain?{t}-1", "127.0.0.9", inside) == 200
    assert status_of(env, "proxied.test", f"/plain?{t}-2", "127.0.0.9", outside) == 403
    # From an untrusted peer the field is not believed: its own address decides.
    assert status_of(env, "proxied.test", f"/plain?{t}-3", "127.0.0.8", inside) == 403
    assert [e["path"] for e in seen(env, t)] == [f"/plain?{t}-1"]
