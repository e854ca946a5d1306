"""Several targets behind one proxy host (issue 13), through a real Charon and real backends:
each lb_policy's spread over 1,000 requests (weights 1:1:2), retries on a dead target, a
non-idempotent request never sent twice, 503 + Retry-After when no target is up, sticky
cookies, and a WebSocket handshake whose target refuses it landing on the next.

Every backend names itself (http_backend.py --name), so the client sees which target served.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOST, Backend, free_port, running_charon

WEIGHTS = {"a": 1, "b": 1, "c": 2}
N = 1000


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Backend]]:
    backends = {name: Backend("http_backend.py", "--name", name) for name in WEIGHTS}
    try:
        yield backends
    finally:
        for backend in backends.values():
            backend.stop()


def _targets(named: dict[str, Backend]) -> str:
    return ", ".join(
        f'{{ url = "{named[name].url}", weight = {weight} }}' for name, weight in WEIGHTS.items()
    )


def _request(
    conn: http.client.HTTPConnection, host: str, path: str = "/echo", method: str = "GET",
    headers: dict[str, str] | None = None, body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def _served_by(body: bytes) -> str:
    return str(json.loads(body)["backend"])


def _within(counts: Counter[str], n: int) -> None:
    total = sum(WEIGHTS.values())
    for name, weight in WEIGHTS.items():
        ideal = n * weight / total
        assert abs(counts[name] - ideal) <= 0.1 * ideal, counts


POLICIES = {
    "round-robin": "",
    "least-conn": 'lb_policy = "least_conn"',
    "random-two": 'lb_policy = "random_two"',
    "ip-hash": 'lb_policy = "ip_hash"',
    "header-hash": 'lb_policy = "header_hash"\nlb_header = "X-User"',
    "cookie": 'lb_policy = "cookie"',
}


def test_each_policy_spreads_by_weight(tmp_path: Path, named: dict[str, Backend]) -> None:
    hosts = "".join(
        f'\n[[hosts]]\ndomains = ["{name}.test"]\nupstreams = [{_targets(named)}]\n{policy}\n'
        for name, policy in POLICIES.items()
    )
    # The hash policies need many clients: from a trusted proxy, X-Forwarded-For names them.
    server = 'trusted_proxies = ["127.0.0.1/32"]'
    with running_charon(tmp_path, hosts, workers=1, server_toml=server) as charon:
        conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
        for name in POLICIES:
            counts: Counter[str] = Counter()
            for i in range(N):
                key = f"10.{i // 250}.{i % 250}.7"
                status, headers, body = _request(
                    conn, f"{name}.test", headers={"X-Forwarded-For": key, "X-User": key}
                )
                assert status == 200, body
                counts[_served_by(body)] += 1
                if name == "cookie":  # no cookie sent: each answer gives one
                    assert headers["set-cookie"].startswith("charon_target=")
            _within(counts, N)
        # The hash policies keep a client on its target.
        for name in ("ip-hash", "header-hash"):
            served = {
                _served_by(_request(conn, f"{name}.test",
                                    headers={"X-Forwarded-For": "10.9.9.9", "X-User": "u"})[2])
                for _ in range(20)
            }
            assert len(served) == 1
        conn.close()


def test_cookie_sticks_and_moves_when_its_target_is_gone(tmp_path: Path) -> None:
    backends = [Backend("http_backend.py", "--name", name) for name in "xyz"]
    try:
        upstreams = ", ".join(f'"{b.url}"' for b in backends)
        hosts = f"""
        [[hosts]]
        domains = ["sticky.test"]
        upstreams = [{upstreams}]
        lb_policy = "cookie"
        lb_cookie = "srv"
        """
        with running_charon(tmp_path, hosts) as charon:
            conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
            status, headers, body = _request(conn, "sticky.test")
            assert status == 200
            cookie = headers["set-cookie"]
            assert cookie.endswith("; Path=/; HttpOnly; SameSite=Lax")
            pair = cookie.split(";")[0]
            first = _served_by(body)
            for _ in range(30):
                status, headers, body = _request(conn, "sticky.test",
                                                 headers={"Cookie": f"a=1; {pair}"})
                assert (status, _served_by(body)) == (200, first)
                assert "set-cookie" not in headers
            backends["xyz".index(first)].stop()
            # Its target is gone: the request goes to another, which the new cookie names.
            status, headers, body = _request(conn, "sticky.test", headers={"Cookie": pair})
            assert status == 200 and _served_by(body) != first
            moved = _served_by(body)
            new_pair = headers["set-cookie"].split(";")[0]
            assert new_pair != pair
            for _ in range(10):
                _, _, body = _request(conn, "sticky.test", headers={"Cookie": new_pair})
                assert _served_by(body) == moved
            conn.close()
    finally:
        for backend in backends:
            backend.stop()


def test_retries_on_a_dead_target_and_never_send_a_post_twice(
    tmp_path: Path, named: dict[str, Backend], backend_factory
) -> None:  # type: ignore[no-untyped-def]
    """`reset` closes every connection once it read a request head, unanswered: a request it
    got must not go to `a` as well unless it may be sent again (decision 11)."""
    reset = backend_factory("raw_backend.py")
    dead = free_port()  # nothing listens: connect refused
    hosts = f"""
    [[hosts]]
    domains = ["dead.test"]
    upstreams = ["http://{HOST}:{dead}", "{named["a"].url}"]
    max_fails = 0
    retry_budget = 1.0

    [[hosts]]
    domains = ["reset.test"]
    upstreams = ["http://{HOST}:{reset.port}", "{named["a"].url}"]
    max_fails = 0
    retry_budget = 1.0
    """
    with running_charon(tmp_path, hosts) as charon:
        conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
        # A refused connect sent nothing: any request goes on to the next target.
        for method in ("GET", "POST", "PATCH"):
            for _ in range(5):
                status, _, body = _request(conn, "dead.test", "/echo", method, body=b"x" * 100)
                assert status == 200 and _served_by(body) == "a"
        # The reset target keeps its turn (passive checks off): every other request reaches it.
        outcomes: dict[str, Counter[int]] = {}
        for method, body in (("GET", None), ("PUT", None), ("POST", None), ("POST", b"data"),
                             ("PUT", b"data")):
            outcomes[f"{method} {'body' if body else 'none'}"] = Counter(
                _request(conn, "reset.test", "/reset", method, body=body)[0] for _ in range(10)
            )
            conn.close()  # (a 502 closes the connection)
        # Idempotent and bodiless: sent again to `a`. Otherwise the 502 of the one attempt.
        assert outcomes["GET none"] == Counter({200: 10})
        assert outcomes["PUT none"] == Counter({200: 10})
        assert outcomes["POST none"] == Counter({200: 5, 502: 5})
        assert outcomes["POST body"] == Counter({200: 5, 502: 5})
        assert outcomes["PUT body"] == Counter({200: 5, 502: 5})


def test_no_target_up_is_503_with_retry_after(tmp_path: Path) -> None:
    hosts = f"""
    [[hosts]]
    domains = ["down.test"]
    upstreams = ["http://{HOST}:{free_port()}", "http://{HOST}:{free_port()}"]
    fail_timeout = "20s"
    """
    with running_charon(tmp_path, hosts) as charon:
        conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
        status, _, _ = _request(conn, "down.test")
        assert status == 502  # both tried, both refused: both marked down for 20 s
        conn.close()
        for _ in range(3):
            status, headers, body = _request(conn, "down.test")
            assert status == 503, body
            assert 1 <= int(headers["retry-after"]) <= 20
            assert headers["connection"] == "keep-alive"


def _handshake(port: int, host: str) -> bytes:
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(
            f"GET /echo HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        got = b""
        deadline = time.monotonic() + 10
        while b"\r\n\r\n" not in got and time.monotonic() < deadline:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        return got


def test_a_refused_websocket_handshake_goes_to_the_next_target(
    tmp_path: Path, backend_factory
) -> None:  # type: ignore[no-untyped-def]
    """The front door dials the chosen target; refused, the HTTP path tries the next one."""
    ws = backend_factory("ws_backend.py")
    hosts = f"""
    [[hosts]]
    domains = ["ws.test"]
    upstreams = ["http://{HOST}:{free_port()}", "{ws.url}"]
    max_fails = 0
    """
    with running_charon(tmp_path, hosts) as charon:
        for _ in range(6):
            assert _handshake(charon.port, "ws.test").startswith(b"HTTP/1.1 101 ")
