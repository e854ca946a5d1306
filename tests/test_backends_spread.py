"""Several backends behind one proxy host, end to end (issue 13), part two: 1,000 requests
spread by weight the same way with 1 and 4 workers, ip_hash moving only the new target's share
when a reload adds one, a non-idempotent POST never sent twice
when its target dies, a hung target taken out by the active check, and 503 with Retry-After
when no target is left. Helpers: test_backends_e2e.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from harness import running_charon, wait_until
from httpwire import Client, Response
from test_backends_e2e import DOMAIN, Named, fleet, get_once, hosts_toml, http_get
from test_balance import _connections
from test_reload import wait_reloads
from test_websocket_handshake import RawWs, ws_request

WEIGHTS = {"a": 1, "b": 1, "c": 1, "d": 2}


# -- 1,000 requests, 1 and 4 workers ---------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 4])
def test_thousand_requests_spread_by_weight(tmp_path: Path, workers: int) -> None:
    with fleet(list(WEIGHTS)) as named:
        targets = list(named.values())
        hosts = (hosts_toml(targets, "round_robin", weights=WEIGHTS, domain="rr.test")
                 + hosts_toml(targets, "least_conn", weights=WEIGHTS, domain="lc.test"))
        with running_charon(tmp_path, hosts, workers=workers) as charon:
            # 64 connections held open at once: accept back-off spreads them over the workers
            # (one at a time, they could all land on one).
            idle = {pid: _connections(pid) for pid in charon.worker_pids()}
            clients = [Client(charon.port) for _ in range(64)]
            try:
                time.sleep(0.5)
                holding = [pid for pid, n in idle.items() if _connections(pid) > n]
                assert len(holding) >= min(workers, 3), holding
                for domain in ("rr.test", "lc.test"):
                    counts: Counter[str] = Counter()
                    for i in range(1000):
                        resp = http_get(clients[i % len(clients)], host=domain)
                        assert resp.status == 200, resp.head
                        counts[resp.body.decode()] += 1
                    total = sum(WEIGHTS.values())
                    for name, weight in WEIGHTS.items():
                        ideal = 1000 * weight / total
                        assert abs(counts[name] - ideal) <= 0.1 * ideal, (domain, counts)
            finally:
                for c in clients:
                    c.close()


# -- consistent hashing: a target added by a reload takes only its share --------------------


def test_ip_hash_added_target_moves_only_its_share(tmp_path: Path) -> None:
    ips = [f"10.3.{i // 250}.{i % 250 + 1}" for i in range(200)]

    def where(port: int) -> dict[str, str]:
        # A new connection per request: both workers answer, and must hash alike.
        return {ip: get_once(port, extra=f"X-Forwarded-For: {ip}\r\n").body.decode()
                for ip in ips}

    with fleet(["a", "b", "c", "d", "e"]) as named:
        four = hosts_toml([named[n] for n in "abcd"], "ip_hash")
        with running_charon(tmp_path, four, workers=2,
                            server_toml='trusted_proxies = ["127.0.0.1"]') as charon:
            before = where(charon.port)
            assert where(charon.port) == before, "the same address, another target"
            five = hosts_toml([named[n] for n in "abcde"], "ip_hash")
            charon.config_path.write_text(charon.config_path.read_text().replace(four, five))
            os.kill(charon.pid, signal.SIGHUP)
            wait_reloads(charon, 1)
            after = where(charon.port)
        moved = {ip: after[ip] for ip in ips if after[ip] != before[ip]}
        assert set(moved.values()) == {"e"}, Counter(moved.values())
        assert 20 <= len(moved) <= 60, f"{len(moved)} of 200 moved (1/5: 40)"


# -- a POST is never sent twice --------------------------------------------------------------


def _records(path: Path, key: str) -> list[str]:
    """The backends that received `key` (named_backend.py --record lines: NAME METHOD KEY)."""
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text().splitlines() if line.split()[2] == key]


def _request_in_thread(port: int, data: bytes) -> tuple[threading.Thread, list[Response]]:
    out: list[Response] = []

    def run() -> None:
        with Client(port, timeout=15) as client:
            client.send(data)
            out.append(client.read_response())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _killed_mid_request(port: int, record: Path, named: dict[str, Named], method: str,
                        key: str) -> tuple[Response, str]:
    """Send `method /count/key` (the backend waits before answering), SIGKILL the backend that
    got it, return the client's answer and who was killed."""
    framing = "Content-Length: 7\r\n\r\npayload" if method == "POST" else "\r\n"
    data = f"{method} /count/{key}?delay=3 HTTP/1.1\r\nHost: {DOMAIN}\r\n{framing}".encode()
    thread, out = _request_in_thread(port, data)
    wait_until(lambda: _records(record, key), 5, what=f"{key} to reach a backend")
    victim = _records(record, key)[0]
    named[victim].kill()
    thread.join(15)
    assert out, f"no answer to {method} {key}"
    return out[0], victim


def test_post_never_sent_twice(tmp_path: Path) -> None:
    record = tmp_path / "received.txt"
    dead = Named("dead")  # nothing listens there: a connect is refused
    with fleet(["p1", "p2", "p3"], record) as named, running_charon(
        tmp_path, hosts_toml([dead, *named.values()])
    ) as charon:
        # Refused connects (nothing was sent): a POST may go to the next target. Round robin
        # over four targets, one of them refusing: one of these four POSTs meets it first.
        for i in range(4):
            with Client(charon.port) as client:
                client.send(f"POST /count/refused-{i} HTTP/1.1\r\nHost: {DOMAIN}\r\n"
                            "Content-Length: 2\r\n\r\nhi".encode())
                resp = client.read_response()
            assert resp.status == 200, resp.head
            assert len(_records(record, f"refused-{i}")) == 1
        # The target dies after the POST reached it: 502, and no other target ever sees it.
        resp, victim = _killed_mid_request(charon.port, record, named, "POST", "sent-once")
        assert resp.status == 502, resp.head
        assert _records(record, "sent-once") == [victim]
        # The same for a GET: it may be sent again, and is, to a target still alive.
        resp, second = _killed_mid_request(charon.port, record, named, "GET", "sent-twice")
        assert resp.status == 200, resp.head
        (survivor,) = set(named) - {victim, second}
        assert resp.body.decode() == survivor
        assert _records(record, "sent-twice") == [second, survivor]


# -- a hung target, no target at all ---------------------------------------------------------


def test_hung_target_taken_out_by_active_check(tmp_path: Path, backend_factory) -> None:  # type: ignore[no-untyped-def]
    hung = backend_factory("hung_backend.py")
    hung_target = Named("hung")
    hung_target.port = hung.port
    extra = ("max_fails = 0\n"  # passive checks off: only the active check can see it
             'health_check = { path = "/healthz", interval = "300ms", timeout = "300ms", '
             "healthy_threshold = 1, unhealthy_threshold = 1 }\n"
             'timeouts = { first_byte = "1s" }\n')
    with fleet(["a"]) as named, running_charon(
        tmp_path, hosts_toml([hung_target, named["a"]], extra=extra), workers=2
    ) as charon:
        answers: list[int] = []

        def only_a_for_a_while() -> bool:
            resp = get_once(charon.port, timeout=5)  # a 504 after 1 s while the hung one is in
            answers.append(resp.status)
            return answers[-20:] == [200] * 20 and resp.body == b"a"

        wait_until(only_a_for_a_while, 20, interval=0, what="the hung target taken out")
        assert set(answers) <= {200, 504}, Counter(answers)
        for _ in range(40):
            resp = get_once(charon.port)
            assert (resp.status, resp.body) == (200, b"a")


def test_no_target_left_503_with_retry_after(tmp_path: Path) -> None:
    gone = [Named("gone-1"), Named("gone-2")]  # refused connects
    with running_charon(tmp_path, hosts_toml(gone, extra='fail_timeout = "30s"\n'),
                        workers=1) as charon:
        statuses: list[int] = []

        def answered_503() -> bool:
            statuses.append(get_once(charon.port).status)
            return statuses[-1] == 503

        wait_until(answered_503, 10, what="a 503 once both targets are marked down")
        assert set(statuses) <= {502, 503}, statuses
        resp = get_once(charon.port)
        assert resp.status == 503
        assert int(resp.header("Retry-After") or "0") >= 1, resp.headers
        # A WebSocket handshake (the front door's path) gets the same answer.
        with RawWs(charon.port) as ws:
            ws.send(ws_request("/ws", DOMAIN))
            head, _ = ws.read_response()
        assert head.status == 503 and int(head.get("Retry-After") or "0") >= 1, head.raw
