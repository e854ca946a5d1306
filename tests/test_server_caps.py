"""`[server] max_connections` and `max_connections_per_ip` (issue 14) through `charon run` with 2
workers: client TCP connections held open (idle keep-alive) over all workers; past a cap a
connection is answered 503 (Retry-After: 1) and closed, counted as denied "connections" for host
"-"; per connection address (two loopback addresses, and PROXY header sources on a PROXY
listener); the counts come back when connections close and after the workers are SIGKILLed."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
from pathlib import Path

import pytest
from harness import HOST, Backend, Charon, free_port, wait_until
from test_proxy_protocol import v1, v2
from test_reload import metric, metrics

pytestmark = pytest.mark.timeout(90)

APP = "app.test"
GET = f"GET /echo HTTP/1.1\r\nHost: {APP}\r\n\r\n".encode()
REFUSED = 0  # closed without an answer
HANDSHAKE_REFUSED = -1  # a TLS connection closed before its handshake completed


def hosts(url: str) -> str:
    return f'[[hosts]]\ndomains = ["{APP}"]\nupstream = "{url}"\n'


class Held:
    """One client connection that sent a keep-alive request: its status, kept open."""

    def __init__(self, port: int, source: str | None = None, header: bytes = b"") -> None:
        self.sock = socket.socket()
        self.sock.settimeout(10)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((HOST, port))
        self.sock.sendall(header + GET)
        self.retry_after: str | None = None
        response = http.client.HTTPResponse(self.sock)
        try:
            response.begin()
            response.read()
            self.status = response.status
            self.retry_after = response.getheader("Retry-After")
        except (http.client.RemoteDisconnected, ConnectionResetError):
            self.status = REFUSED

    def close(self) -> None:
        self.sock.close()


def statuses(held: list[Held]) -> list[int]:
    return [h.status for h in held]


def close_all(held: list[Held]) -> None:
    for h in held:
        h.close()


def denied(charon: Charon) -> float:
    return metric(metrics(charon), "charon_requests_denied_total", host="-",
                  reason="connections") or 0


def test_max_connections_over_all_workers(tmp_path: Path) -> None:
    backend = Backend("http_backend.py")
    charon = Charon(tmp_path, hosts(backend.url), workers=2, server_toml="max_connections = 5")
    held: list[Held] = []
    try:
        charon.start()
        held = [Held(charon.port) for _ in range(12)]
        assert statuses(held) == [200] * 5 + [503] * 7
        assert {h.retry_after for h in held[5:]} == {"1"}
        # The refused ones were closed by the proxy.
        for h in held[5:]:
            assert h.sock.recv(1) == b""
        wait_until(lambda: denied(charon) == 7, 10, what="7 denied connections counted")
        assert "past [server] max_connections" in charon.log()
        close_all(held)
        # Closing gives the places back (the workers see the closes as they come).
        wait_until(lambda: Held(charon.port).status == 200, 10, what="a place given back")
        held = []
        wait_until(lambda: _all_served(charon.port, held, 5), 10, what="5 places again")
    finally:
        close_all(held)
        charon.stop()
        backend.stop()


def _all_served(port: int, held: list[Held], count: int) -> bool:
    close_all(held)
    held.clear()
    held.extend(Held(port) for _ in range(count))
    return statuses(held) == [200] * count


def test_max_connections_per_ip_by_address(tmp_path: Path) -> None:
    backend = Backend("http_backend.py")
    charon = Charon(tmp_path, hosts(backend.url), workers=2,
                    server_toml="max_connections_per_ip = 3")
    one: list[Held] = []
    two: list[Held] = []
    try:
        charon.start()
        one = [Held(charon.port, "127.0.0.1") for _ in range(4)]
        two = [Held(charon.port, "127.0.0.2") for _ in range(3)]
        assert statuses(one) == [200, 200, 200, 503]
        assert statuses(two) == [200, 200, 200]
        assert Held(charon.port, "127.0.0.2").status == 503
        close_all(one)
        wait_until(lambda: _all_served_from(charon.port, one, "127.0.0.1", 3), 10,
                   what="127.0.0.1's places given back")
        assert Held(charon.port, "127.0.0.2").status == 503  # (its own are still held)
    finally:
        close_all(one + two)
        charon.stop()
        backend.stop()


def _all_served_from(port: int, held: list[Held], source: str, count: int) -> bool:
    close_all(held)
    held.clear()
    held.extend(Held(port, source) for _ in range(count))
    return statuses(held) == [200] * count


def test_per_ip_by_proxy_header_source(tmp_path: Path) -> None:
    backend = Backend("http_backend.py")
    charon = Charon(tmp_path, hosts(backend.url), workers=2,
                    server_toml="proxy_protocol = true\nmax_connections_per_ip = 2")
    held: list[Held] = []
    try:
        charon.start()
        # Every connection comes from 127.0.0.1 (the balancer): the header's source counts.
        held = [Held(charon.port, header=v1("192.0.2.1")) for _ in range(3)]
        held += [Held(charon.port, header=v2("192.0.2.2")) for _ in range(3)]
        assert statuses(held) == [200, 200, 503, 200, 200, 503]
        close_all(held[:2])
        wait_until(lambda: Held(charon.port, header=v2("192.0.2.1")).status == 200, 10,
                   what="192.0.2.1's places given back")
    finally:
        close_all(held)
        charon.stop()
        backend.stop()


def test_counts_given_back_after_workers_are_killed(tmp_path: Path) -> None:
    backend = Backend("http_backend.py")
    charon = Charon(tmp_path, hosts(backend.url), workers=2,
                    server_toml="max_connections = 5\nmax_connections_per_ip = 3")
    held: list[Held] = []
    try:
        charon.start()
        held = [Held(charon.port, "127.0.0.1") for _ in range(3)]
        held += [Held(charon.port, "127.0.0.2") for _ in range(2)]
        assert statuses(held) == [200] * 5
        assert Held(charon.port, "127.0.0.3").status == 503  # the total
        close_all(held[3:])
        wait_until(lambda: Held(charon.port, "127.0.0.3").status == 200, 10)
        assert Held(charon.port, "127.0.0.1").status == 503  # its 3 are held
        for pid in charon.worker_pids():  # the holders die: their counts must come back
            os.kill(pid, signal.SIGKILL)
        charon.wait_ready()
        close_all(held)
        held = []
        wait_until(lambda: _all_served_from(charon.port, held, "127.0.0.1", 3), 10,
                   what="the dead workers' seats given back")
        more = [Held(charon.port, "127.0.0.2") for _ in range(2)]
        held += more
        assert statuses(more) == [200, 200]
        assert Held(charon.port, "127.0.0.2").status == 503  # 5 open again
    finally:
        with contextlib.suppress(OSError):
            close_all(held)
        charon.stop()
        backend.stop()


def _tls_get(port: int, ctx: ssl.SSLContext) -> tuple[ssl.SSLSocket | None, int]:
    """A TLS connection that sent a keep-alive request: (the socket, kept open, and the
    status), or (None, REFUSED) when the proxy closed it unanswered."""
    raw = socket.create_connection((HOST, port), timeout=10)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=APP)
    except (ssl.SSLError, ConnectionError, OSError):
        raw.close()
        return None, HANDSHAKE_REFUSED
    try:
        tls.sendall(GET)
        response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
        response.begin()
        response.read()
        return tls, response.status
    except (ssl.SSLError, ConnectionError, http.client.RemoteDisconnected, OSError):
        raw.close()
        return None, REFUSED


def test_max_connections_on_a_tls_listener(tmp_path: Path) -> None:
    """Past the cap a TLS connection is closed unanswered where the cap is decided, at its
    first request bytes (after the handshake: not before it, HANDSHAKE_REFUSED); counted as
    denied; plain connections share the count; a place given back serves TLS again."""
    from tlsca import TestCA
    from tlsenv import client_context

    ca = TestCA(tmp_path / "ca")
    leaf = ca.issue([APP])
    ctx = client_context(ca)
    backend = Backend("http_backend.py")
    tls_port = free_port()
    host = (hosts(backend.url)
            + f'tls = {{ cert = "{leaf.cert_path}", key = "{leaf.key_path}" }}\n')
    charon = Charon(tmp_path, host, workers=2,
                    server_toml=f'tls_listen = ["{HOST}:{tls_port}"]\nmax_connections = 3')
    held: list[ssl.SSLSocket] = []
    try:
        charon.start()
        results = [_tls_get(tls_port, ctx) for _ in range(5)]
        held = [sock for sock, _ in results if sock is not None]
        assert [status for _, status in results] == [200] * 3 + [REFUSED] * 2
        wait_until(lambda: denied(charon) == 2, 10, what="2 denied TLS connections counted")
        # Plain connections share the server-wide count.
        assert Held(charon.port).status == 503
        held.pop().close()
        wait_until(lambda: _tls_served(tls_port, ctx, held), 10, what="a TLS place given back")
    finally:
        for sock in held:
            sock.close()
        charon.stop()
        backend.stop()


def _tls_served(port: int, ctx: ssl.SSLContext, held: list[ssl.SSLSocket]) -> bool:
    sock, status = _tls_get(port, ctx)
    if sock is not None:
        held.append(sock)
    return status == 200
