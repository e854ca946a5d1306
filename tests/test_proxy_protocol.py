"""PROXY protocol v1/v2 on listeners (issue 14), through `charon run` with real backends.

One Charon serves three listeners: a plain one that needs the PROXY header, a plain one beside
it that does not, and a TLS one that needs it. The header's source address becomes the client
address (X-Forwarded-For, X-Real-IP, the access log), for HTTP, for a WebSocket handshake (the
front door's fast path) and under TLS. Connections without a valid header are closed with no
answer, logged with the TCP peer, counted by reason; a silent one is closed after
`timeouts.header`. A reload in place turns the header off and on without rebinding.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import struct
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import HOST, Backend, Charon, free_port, wait_until
from test_reload import metrics, wait_reloads
from tlsca import Leaf, TestCA
from tlsenv import client_context

from charon.worker.proxyproto import V2_SIGNATURE

NAME = "pp.test"
HEADER_TIMEOUT = 1.0
GET_ECHO = f"GET /echo HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()


def v1(source: str, family: str = "TCP4", dest: str = "127.0.0.1") -> bytes:
    return f"PROXY {family} {source} {dest} 40000 80\r\n".encode()


def v2(source: str, tlvs: bytes = b"", command: int = 1) -> bytes:
    packed = socket.inet_pton(socket.AF_INET6 if ":" in source else socket.AF_INET, source)
    family = 0x21 if ":" in source else 0x11
    body = packed + packed + struct.pack("!HH", 40000, 80) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


@dataclass
class Env:
    charon: Charon
    pp_port: int  # plain, PROXY header required
    plain_port: int  # plain, no header
    tls_port: int  # TLS, PROXY header required
    access_log: Path
    ca: TestCA
    leaf: Leaf


def _config(env_ports: tuple[int, int, int], admin: int, access_log: Path, proxied: str,
            http: Backend, ws: Backend, leaf: Leaf) -> str:
    pp, plain, tls = env_ports
    return textwrap.dedent(f"""\
        [server]
        listen = ["{HOST}:{pp}", "{HOST}:{plain}"]
        tls_listen = ["{HOST}:{tls}"]
        workers = 1
        access_log = "{access_log}"
        proxy_protocol = {proxied}
        [timeouts]
        header = "{HEADER_TIMEOUT}s"
        [admin]
        listen = "{HOST}:{admin}"

        [[hosts]]
        domains = ["{NAME}"]
        upstream = "{http.url}"
        tls = {{ cert = "{leaf.cert_path}", key = "{leaf.key_path}" }}

        [[hosts]]
        domains = ["ws.test"]
        upstream = "{ws.url}"
        """)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("pp")
    http = Backend("http_backend.py")
    ws = Backend("ws_backend.py")
    charon = Charon(tmp, "")
    try:
        ca = TestCA(tmp / "ca")
        leaf = ca.issue([NAME])
        ports = (charon.port, free_port(), free_port())
        access_log = tmp / "access.log"
        proxied = f'["{HOST}:{ports[0]}", "{HOST}:{ports[2]}"]'
        charon.config_path.write_text(
            _config(ports, charon.admin_port, access_log, proxied, http, ws, leaf))
        charon.start()
        charon.ws = ws  # type: ignore[attr-defined]
        charon.http = http  # type: ignore[attr-defined]
        yield Env(charon, ports[0], ports[1], ports[2], access_log, ca, leaf)
    finally:
        charon.stop()
        http.stop()
        ws.stop()


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send `data`, read until the server closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def echoed(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response[:300]
    return json.loads(body)  # type: ignore[no-any-return]


def header(seen: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in seen["headers"] if key.lower() == name.lower()]


def access_lines(env: Env, marker: str) -> list[str]:
    text = env.access_log.read_text() if env.access_log.exists() else ""
    return [line for line in text.splitlines() if marker in line]


@pytest.mark.parametrize(
    ("prefix", "client"),
    [
        (v1("203.0.113.7"), "203.0.113.7"),
        (v1("2001:db8::7", "TCP6", "::1"), "2001:db8::7"),
        (v2("198.51.100.9", tlvs=b"\x04\x00\x03abc"), "198.51.100.9"),
        (v2("2001:db8:0:0::9"), "2001:db8::9"),
        (b"PROXY UNKNOWN\r\n", HOST),
        (v2("192.0.2.1", command=0), HOST),  # LOCAL: the balancer's own connection
    ],
    ids=["v1-ipv4", "v1-ipv6", "v2-ipv4-tlv", "v2-ipv6", "v1-unknown", "v2-local"],
)
def test_the_headers_source_is_the_client(env: Env, prefix: bytes, client: str) -> None:
    marker = f"/echo?{os.urandom(6).hex()}"
    request = GET_ECHO.replace(b"/echo", marker.encode())
    seen = echoed(exchange(env.pp_port, prefix + request))
    assert header(seen, "X-Forwarded-For") == [client]
    assert header(seen, "X-Real-IP") == [client]
    wait_until(lambda: access_lines(env, marker), 5, what="the access log line")
    assert access_lines(env, marker)[0].split()[1] == client


def test_the_header_may_come_in_pieces(env: Env) -> None:
    data = v2("203.0.113.50") + GET_ECHO
    with socket.create_connection((HOST, env.pp_port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in (data[:3], data[3:15], data[15:30], data[30:]):
            sock.sendall(piece)
            time.sleep(0.05)
        seen = echoed(read_all(sock))
    assert header(seen, "X-Forwarded-For") == ["203.0.113.50"]


def test_a_websocket_handshake_after_the_header(env: Env) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        f"GET /headers HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, env.pp_port), timeout=5) as sock:
        sock.sendall(v1("203.0.113.77") + handshake)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk
        head, _, rest = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        frame = _read_frame(sock, rest)
    seen = json.loads(frame)
    assert [v for k, v in seen if k.lower() == "x-forwarded-for"] == ["203.0.113.77"]


def _read_frame(sock: socket.socket, got: bytes) -> bytes:
    """The payload of the server's first (unmasked, unfragmented) frame."""
    def need(n: int) -> None:
        nonlocal got
        while len(got) < n:
            chunk = sock.recv(65536)
            assert chunk, got
            got += chunk

    need(2)
    length, at = got[1] & 0x7F, 2
    if length == 126:
        need(4)
        length, at = struct.unpack("!H", got[2:4])[0], 4
    elif length == 127:
        need(10)
        length, at = struct.unpack("!Q", got[2:10])[0], 10
    need(at + length)
    return got[at:at + length]


def test_tls_after_the_header(env: Env) -> None:
    ctx = client_context(env.ca)
    with socket.create_connection((HOST, env.tls_port), timeout=5) as raw:
        raw.sendall(v2("2001:db8::44"))
        with ctx.wrap_socket(raw, server_hostname=NAME) as tls:
            tls.sendall(GET_ECHO)
            seen = echoed(read_all(tls))
    assert header(seen, "X-Forwarded-For") == ["2001:db8::44"]
    assert header(seen, "X-Forwarded-Proto") == ["https"]


def test_tls_without_the_header_is_closed(env: Env) -> None:
    ctx = client_context(env.ca)
    with socket.create_connection((HOST, env.tls_port), timeout=5) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        ctx.wrap_socket(raw, server_hostname=NAME).close()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x01garbage\r\n\r\n", "missing"),
        (GET_ECHO, "missing"),  # plain HTTP on a PROXY listener
        (b"PROXY TCP4 " + b"1" * 120, "too_long"),  # no CRLF within 107 bytes
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n" + GET_ECHO, "malformed"),
        (v2("192.0.2.5")[:20], "closed"),  # truncated v2, then the client's FIN
    ],
    ids=["garbage", "plain-http", "v1-no-crlf", "v1-malformed", "v2-truncated"],
)
def test_bad_headers_are_closed_unanswered_and_logged(env: Env, data: bytes, reason: str) -> None:
    before = _errors(env, reason)
    with socket.create_connection((HOST, env.pp_port), timeout=5) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):  # (closed already: a reset, bytes were unread)
            sock.shutdown(socket.SHUT_WR)
        assert read_all(sock) == b""  # no HTTP answer: the peer is a balancer
    wait_until(lambda: _errors(env, reason) > before, 5, what=f"the {reason} count")
    assert f"PROXY protocol: connection from {HOST} port " in env.charon.log()


def test_a_silent_client_is_closed_after_the_header_timeout(env: Env) -> None:
    before = _errors(env, "timeout")
    with socket.create_connection((HOST, env.pp_port), timeout=HEADER_TIMEOUT + 5) as sock:
        assert read_all(sock) == b""  # closed by the proxy (the read would time out first)
    wait_until(lambda: _errors(env, "timeout") > before, 5, what="the timeout count")
    assert "no whole header within" in env.charon.log()


def test_the_listener_beside_it_is_unaffected(env: Env) -> None:
    seen = echoed(exchange(env.plain_port, GET_ECHO))
    assert header(seen, "X-Forwarded-For") == [HOST]
    # A PROXY header there is no header but a bad request line.
    assert exchange(env.plain_port, v1("203.0.113.7") + GET_ECHO).startswith(b"HTTP/1.1 400")


def _errors(env: Env, reason: str) -> float:
    samples = metrics(env.charon)
    return samples.get(("charon_proxy_protocol_errors_total", (("reason", reason),)), 0.0)


def test_a_reload_in_place_turns_the_header_off_and_on(env: Env) -> None:
    charon = env.charon
    workers = sorted(charon.worker_pids())
    text = charon.config_path.read_text()
    proxied_line = next(line for line in text.splitlines() if line.startswith("proxy_protocol"))
    try:
        charon.config_path.write_text(
            text.replace(proxied_line, f'proxy_protocol = ["{HOST}:{env.plain_port}"]'))
        count = (charon.health() or {})["reloads"]["count"]
        os.kill(charon.pid, signal.SIGHUP)
        assert wait_reloads(charon, count + 1)["last_result"] == "success"
        assert sorted(charon.worker_pids()) == workers  # in place: the same worker
        seen = echoed(exchange(env.pp_port, GET_ECHO))
        assert header(seen, "X-Forwarded-For") == [HOST]
        seen = echoed(exchange(env.plain_port, v1("203.0.113.8") + GET_ECHO))
        assert header(seen, "X-Forwarded-For") == ["203.0.113.8"]
        assert exchange(env.plain_port, GET_ECHO) == b""
    finally:
        charon.config_path.write_text(text)
        count = (charon.health() or {})["reloads"]["count"]
        os.kill(charon.pid, signal.SIGHUP)
        assert wait_reloads(charon, count + 1)["last_result"] == "success"
    seen = echoed(exchange(env.pp_port, v1("203.0.113.9") + GET_ECHO))
    assert header(seen, "X-Forwarded-For") == ["203.0.113.9"]
