"""Rate limits shared by all workers (issue 14), through a real supervisor (`charon run`) with 2
and 4 workers and a real backend: a client hammering over several connections for ~3 s gets
burst + rate x time requests through (within 10%), whatever worker each lands on; 429 with
Retry-After; per-IP buckets versus one per host; WebSocket handshakes on their own limit; and a
flood of distinct client addresses (X-Forwarded-For from a trusted proxy) that cannot grow the
workers' memory, the table being fixed."""

from __future__ import annotations

import base64
import http.client
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from harness import HOST, Backend, Charon

pytestmark = pytest.mark.timeout(90)

APP = "app.test"


def hosts(url: str, rules: str) -> str:
    return f'[[hosts]]\ndomains = ["{APP}"]\nupstream = "{url}"\n{rules}\n'


def get(port: int, path: str = "/echo", ip: str | None = None) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        headers = {"Host": APP}
        if ip is not None:
            headers["X-Forwarded-For"] = ip
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("Retry-After")
    finally:
        conn.close()


def hammer(port: int, seconds: float, threads: int = 6) -> tuple[int, int, float]:
    """(admitted, refused, seconds from the first request sent to the last answer)."""
    statuses: list[int] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop = start + seconds

    def run() -> None:
        while time.monotonic() < stop:
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
            try:
                for _ in range(20):  # new connections now and then: they spread over workers
                    if time.monotonic() >= stop:
                        break
                    conn.request("GET", "/echo", headers={"Host": APP})
                    response = conn.getresponse()
                    response.read()
                    with lock:
                        statuses.append(response.status)
            finally:
                conn.close()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 30)
    elapsed = time.monotonic() - start
    assert set(statuses) <= {200, 429}, set(statuses)
    return statuses.count(200), statuses.count(429), elapsed


@pytest.mark.parametrize("workers", [2, 4])
def test_rate_holds_across_workers(tmp_path: Path, workers: int) -> None:
    backend = Backend("http_backend.py")
    charon = Charon(tmp_path, hosts(backend.url, 'rate_limit = { requests = 50, per = "1s", '
                                    "burst = 20 }"), workers=workers)
    try:
        charon.start()
        admitted, refused, elapsed = hammer(charon.port, 3.0)
        expected = 20 + 50 * elapsed
        assert refused > admitted  # the client asked much more than the limit
        assert abs(admitted - expected) <= 0.1 * expected, (admitted, expected, elapsed)
    finally:
        charon.stop()
        backend.stop()


def test_429_says_when_to_come_back_per_ip_and_per_host(tmp_path: Path) -> None:
    backend = Backend("http_backend.py")
    rules = ('[[hosts.locations]]\npath = "/echo/host"\nupstream = "' + backend.url + '"\n'
             'rate_limit = { requests = 1, per = "1m", burst = 2, by = "host" }\n')
    charon = Charon(
        tmp_path,
        hosts(backend.url, 'rate_limit = { requests = 1, per = "1m", burst = 2 }\n' + rules),
        workers=2, server_toml='trusted_proxies = ["127.0.0.1/32"]',
    )
    try:
        charon.start()
        # Per IP: each client address has its own bucket.
        assert [get(charon.port, ip="192.0.2.1")[0] for _ in range(2)] == [200, 200]
        status, retry = get(charon.port, ip="192.0.2.1")
        assert status == 429 and retry is not None and 1 <= int(retry) <= 60
        assert get(charon.port, ip="192.0.2.2")[0] == 200
        # Per host: one bucket whoever asks.
        assert get(charon.port, "/echo/host", ip="192.0.2.3")[0] == 200
        assert get(charon.port, "/echo/host", ip="192.0.2.4")[0] == 200
        status, retry = get(charon.port, "/echo/host", ip="192.0.2.5")
        assert status == 429 and retry is not None and int(retry) >= 1
    finally:
        charon.stop()
        backend.stop()


def handshake(port: int) -> int:
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(
            f"GET /echo HTTP/1.1\r\nHost: {APP}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        return int(head.split()[1])


def test_handshakes_take_the_websocket_limit_only(tmp_path: Path) -> None:
    backend = Backend("ws_backend.py")
    charon = Charon(tmp_path, hosts(
        backend.url,
        'rate_limit = { requests = 1, per = "1m", burst = 1 }\n'
        'websocket_rate_limit = { requests = 1, per = "1m", burst = 2 }',
    ), workers=2)
    try:
        charon.start()
        assert [handshake(charon.port) for _ in range(3)] == [101, 101, 429]
        assert [get(charon.port, "/plain")[0] for _ in range(2)] == [200, 429]
    finally:
        charon.stop()
        backend.stop()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_address_spraying_does_not_grow_memory(tmp_path: Path) -> None:
    backend = Backend("http_backend.py")
    charon = Charon(tmp_path, hosts(backend.url, 'rate_limit = { requests = 1, per = "1m", '
                                    "burst = 1 }"), workers=1,
                    server_toml='trusted_proxies = ["127.0.0.1/32"]')
    try:
        charon.start()
        [worker] = charon.worker_pids()

        def spray(first: int, count: int) -> None:
            conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
            for i in range(first, first + count):
                ip = f"2001:db8::{i >> 16:x}:{i & 0xFFFF:x}"
                conn.request("GET", "/echo", headers={"Host": APP, "X-Forwarded-For": ip})
                response = conn.getresponse()
                response.read()
                assert response.status == 200  # a new address: a bucket of its own
            conn.close()

        spray(0, 3000)  # the table's pages and the worker's caches warm
        before = rss_kib(worker)
        spray(3000, 12000)
        grown = rss_kib(worker) - before
        # 12,000 more keys than sets' ways could hold by key: the rate table is 1 MiB, fixed.
        assert grown < 4096, grown
    finally:
        charon.stop()
        backend.stop()
