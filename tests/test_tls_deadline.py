"""The TLS handshake deadline and clients that do not speak TLS (issue 12): a silent client or
one that stops half-way through its ClientHello is cut at `[tls] handshake_timeout`, garbage is
closed, and none of it disturbs the workers or the next client."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import HOST, Backend
from tlsca import Leaf, TestCA
from tlsenv import (
    HttpsConnection,
    TlsCharon,
    client_context,
    handshake,
    https_json,
    running_tls_charon,
    same_certificate,
    tls_table,
)

NAME = "app.example.com"
CUT_WITHIN = 8.0  # seconds: the 1 s deadline plus a generous margin for a loaded machine


@dataclass
class Env:
    ca: TestCA
    leaf: Leaf
    charon: TlsCharon
    ctx: ssl.SSLContext


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("tls-deadline")
    ca = TestCA(tmp / "ca")
    leaf = ca.issue([NAME])
    backend = Backend("http_backend.py")
    hosts = f"""
        [[hosts]]
        domains = ["{NAME}"]
        upstream = "{backend.url}"
        tls = {tls_table(leaf)}
        """
    try:
        with running_tls_charon(tmp, hosts, workers=2, tls_toml='handshake_timeout = "1s"'
                                ) as charon:
            yield Env(ca, leaf, charon, client_context(ca))
    finally:
        backend.stop()


def client_hello(ctx: ssl.SSLContext, name: str = NAME) -> bytes:
    """The bytes of a real ClientHello, as Python's ssl would send them first."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def closed_by_server(sock: socket.socket, within: float = CUT_WITHIN) -> bytes:
    """Wait (bounded) for the server to end the connection; returns what it sent before.
    Fails if the connection is still open after `within` seconds."""
    sock.settimeout(within)
    received = bytearray()
    deadline = time.monotonic() + within
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received)
        except TimeoutError:
            raise AssertionError(f"still open after {within}s; got {bytes(received)!r}") from None
        if not chunk:
            return bytes(received)
        received += chunk


def served(env: Env) -> None:
    """A normal client right after: handshake, the right certificate, a proxied request."""
    done = handshake(env.charon.tls_port, NAME, env.ctx, request_host=NAME)
    assert same_certificate(done.certificate, env.leaf)
    conn = HttpsConnection(NAME, env.charon.tls_port, env.ctx)
    try:
        status, echo = https_json(conn, "GET", "/echo/after")
        assert (status, echo["raw_path"]) == (200, "/echo/after")
    finally:
        conn.close()


def connect(env: Env) -> socket.socket:
    return socket.create_connection((HOST, env.charon.tls_port), timeout=5)


def test_silent_client_cut_at_handshake_timeout(env: Env) -> None:
    with connect(env) as s:
        closed_by_server(s)  # an alert may come before the close; the close is what counts
    served(env)


def test_half_a_client_hello_cut_at_handshake_timeout(env: Env) -> None:
    hello = client_hello(env.ctx)
    assert hello[0] == 0x16 and len(hello) > 100
    with connect(env) as s:
        s.sendall(hello[: len(hello) // 2])
        closed_by_server(s)
    served(env)


def test_client_stalling_after_the_hello_cut(env: Env) -> None:
    """A whole ClientHello, then silence: the server's flight goes out, the client never
    finishes, and the deadline covers that half of the handshake too."""
    with connect(env) as s:
        s.sendall(client_hello(env.ctx))
        answer = closed_by_server(s)
        assert answer[:1] == b"\x16", answer[:16]  # the ServerHello's handshake record
    served(env)


def test_many_silent_clients_all_cut(env: Env) -> None:
    socks = [connect(env) for _ in range(40)]
    try:
        for s in socks:
            closed_by_server(s)
    finally:
        for s in socks:
            s.close()
    served(env)


def test_finished_handshake_is_not_cut_by_its_deadline(env: Env) -> None:
    """The deadline ends with the handshake: a request sent 2 s after it is served."""
    conn = HttpsConnection(NAME, env.charon.tls_port, env.ctx)
    try:
        conn.connect()
        time.sleep(2.0)  # past the 1 s handshake deadline, well inside the 10 s header one
        status, _ = https_json(conn, "GET", "/echo/late")
        assert status == 200
    finally:
        conn.close()


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n",  # plain HTTP to the TLS port
    b"\x16\x03\x01\xff\xff" + b"\x00" * 200,  # a handshake record header, nonsense after it
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a ClientHello far too short
    b"\x17\x03\x03\x00\x10" + b"\x00" * 16,  # application data before any handshake
    struct.pack("!BHH", 0x80, 0x0301, 0) * 4,  # SSLv2-style
    bytes(range(256)) * 4,
])
def test_garbage_is_closed_and_next_client_served(env: Env, garbage: bytes) -> None:
    workers = sorted(env.charon.worker_pids())
    with connect(env) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed already
            s.sendall(garbage)
        answer = closed_by_server(s)
    assert b"HTTP/" not in answer, "the TLS port answered in plaintext"
    served(env)
    assert sorted(env.charon.worker_pids()) == workers, "a worker died"


def test_random_bytes_flood_then_served(env: Env) -> None:
    workers = sorted(env.charon.worker_pids())
    for _ in range(20):
        with connect(env) as s:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(os.urandom(4096))
            closed_by_server(s)
    served(env)
    assert sorted(env.charon.worker_pids()) == workers, "a worker died"
    health = env.charon.health() or {}
    assert health.get("workers_ready") == 2, health
