"""Counts shared by all workers (issue 14), through `charon run` with 2 workers: a host's
max_connections and max_connections_per_ip under a burst of slow requests (503 + Retry-After: 1
past them), max_websockets, and the counts back to zero once the clients leave and after a
worker holding counts is SIGKILLed (the supervisor gives its ledger back)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from harness import HOST, Backend, Charon, wait_until
from test_rate_limits import APP, get, handshake, hosts

pytestmark = pytest.mark.timeout(90)


def burst(port: int, count: int, path: str, ips: list[str] | None = None) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        status = get(port, path, ip=ips[i % len(ips)] if ips else None)[0]
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return sorted(statuses)


def test_host_max_connections_under_a_burst(tmp_path: Path) -> None:
    backend = Backend("http_backend.py")
    charon = Charon(tmp_path, hosts(backend.url, "max_connections = 4"), workers=2)
    try:
        charon.start()
        statuses = burst(charon.port, 10, "/sleep/1.5")
        assert statuses == [200] * 4 + [503] * 6
        # All given back: the same burst again gets the same answer.
        assert burst(charon.port, 6, "/sleep/0.5") == [200] * 4 + [503] * 2
        conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
        conn.request("GET", "/echo", headers={"Host": APP})
        assert conn.getresponse().status == 200
    finally:
        charon.stop()
        backend.stop()


def test_per_ip_count_and_retry_after(tmp_path: Path) -> None:
    backend = Backend("http_backend.py")
    charon = Charon(tmp_path, hosts(backend.url, "max_connections_per_ip = 2"), workers=2,
                    server_toml='trusted_proxies = ["127.0.0.1/32"]')
    try:
        charon.start()
        statuses = burst(charon.port, 8, "/sleep/1.5", ["192.0.2.1", "192.0.2.2"])
        assert statuses == [200] * 4 + [503] * 4
        conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
        threads = [threading.Thread(target=get, args=(charon.port, "/sleep/3", "192.0.2.9"))
                   for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # (both in progress at the backend)
        conn.request("GET", "/echo", headers={"Host": APP, "X-Forwarded-For": "192.0.2.9"})
        response = conn.getresponse()
        assert response.status == 503 and response.getheader("Retry-After") == "1"
        for t in threads:
            t.join(10)
    finally:
        charon.stop()
        backend.stop()


def open_websocket(port: int) -> socket.socket:
    import base64
    key = base64.b64encode(os.urandom(16)).decode()
    s = socket.create_connection((HOST, port), timeout=10)
    s.sendall(
        f"GET /echo HTTP/1.1\r\nHost: {APP}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def test_websockets_counted_until_closed_and_after_a_worker_is_killed(tmp_path: Path) -> None:
    backend = Backend("ws_backend.py")
    charon = Charon(tmp_path, hosts(backend.url, "max_websockets = 3"), workers=2)
    try:
        charon.start()
        held = [open_websocket(charon.port) for _ in range(3)]
        assert handshake(charon.port) == 503
        held.pop().close()
        wait_until(lambda: handshake(charon.port) == 101, 5, what="a place given back")
        # handshake() closed its socket: free again once the tunnel ended.
        wait_until(lambda: handshake(charon.port) == 101, 5)
        for s in held:
            s.close()
        # The places come back once each tunnel has seen its client close (not at once).
        wait_until(lambda: handshake(charon.port) == 101, 5, what="the places given back")
        held = [open_websocket(charon.port) for _ in range(3)]
        assert handshake(charon.port) == 503
        for pid in charon.worker_pids():  # every holder dies: their counts come back
            os.kill(pid, signal.SIGKILL)
        charon.wait_ready()
        wait_until(lambda: handshake(charon.port) == 101, 10, what="the dead workers' counts")
        for s in held:
            s.close()
        assert [handshake(charon.port) for _ in range(3)] == [101] * 3
    finally:
        charon.stop()
        backend.stop()
