"""Several backends behind one proxy host, end to end (issue 13): real Charon, real named
backends (tests/backends/named_backend.py), real clients.

least_conn with long-lived WebSockets, stickiness across 20 WebSocket reconnects (cookie and
ip_hash), a target killed under load (idempotent GETs see no error; its WebSockets get a Close
1011/1014 and reconnect elsewhere) and the same target restarted and back in rotation.
The helpers here are shared with test_backends_spread.py.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import HOST, REPO, free_port, running_charon, stop_process, wait_until
from httpwire import Client, Response
from test_websocket_handshake import RawWs, client_frame

OP_TEXT, OP_CLOSE = 0x1, 0x8
DOMAIN = "lb.test"


# -- named backends --------------------------------------------------------------------------


class Named:
    """One named_backend.py process; it can be killed (SIGKILL) and started again on its port."""

    def __init__(self, name: str, record: Path | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.record = record
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def spawn(self) -> None:
        args = [sys.executable, str(REPO / "tests" / "backends" / "named_backend.py"),
                "--port", str(self.port), "--name", self.name]
        if self.record is not None:
            args += ["--record", str(self.record)]
        self.proc = subprocess.Popen(args, cwd=REPO)

    def wait_listening(self) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"backend {self.name} exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                return bool(self.stats())
            return False

        wait_until(up, 10, what=f"backend {self.name}")

    def kill(self) -> None:
        """SIGKILL: the kernel closes its connections, nothing of it runs any more."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]


@contextlib.contextmanager
def fleet(names: list[str], record: Path | None = None) -> Iterator[dict[str, Named]]:
    """Named backends started in parallel and stopped by PID at the end."""
    backends = {name: Named(name, record) for name in names}
    try:
        for b in backends.values():
            b.spawn()
        for b in backends.values():
            b.wait_listening()
        yield backends
    finally:
        for b in backends.values():
            b.stop()


def hosts_toml(backends: list[Named], policy: str = "round_robin", extra: str = "",
               weights: dict[str, int] | None = None, domain: str = DOMAIN) -> str:
    """One [[hosts]] table with `upstreams` (the design's syntax) and `extra` keys."""
    items = []
    for b in backends:
        weight = (weights or {}).get(b.name)
        items.append(f'{{ url = "{b.url}", weight = {weight} }}' if weight else f'"{b.url}"')
    return (
        "[[hosts]]\n"
        f'domains = ["{domain}"]\n'
        f"upstreams = [{', '.join(items)}]\n"
        f'lb_policy = "{policy}"\n' + extra + "\n"
    )


# -- clients ---------------------------------------------------------------------------------


def http_get(client: Client, path: str = "/name", host: str = DOMAIN, extra: str = "") -> Response:
    client.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1"))
    return client.read_response()


def get_once(port: int, path: str = "/name", host: str = DOMAIN, extra: str = "",
             timeout: float = 5.0) -> Response:
    with Client(port, timeout) as client:
        return http_get(client, path, host, extra + "Connection: close\r\n")


class Tunnel:
    """A WebSocket to the named backend's /ws through Charon; `name` is who answered."""

    def __init__(self, port: int, host: str = DOMAIN, extra: bytes = b"") -> None:
        self.ws = RawWs(port)
        self.head = self.ws.upgrade("/ws", host, extra)
        first = self.ws.read_frame()
        assert first.opcode == OP_TEXT, first
        self.name = first.payload.decode()

    def echo(self, text: str) -> str:
        self.ws.send(client_frame(OP_TEXT, text.encode()))
        return self.ws.read_frame().payload.decode()

    def close_code(self) -> int | None:
        """The code of the Close the proxy sends next (data frames skipped); the connection
        must then end."""
        while True:
            frame = self.ws.read_frame()
            if frame.opcode == OP_CLOSE:
                break
        assert self.ws.read_to_end(5) == b"", "bytes after the Close"
        return frame.close_code

    def close(self) -> None:
        """A clean closing handshake from the client's side."""
        with contextlib.suppress(OSError, EOFError):
            self.ws.send(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self.ws.read_to_end(5)
        self.ws.sock.close()


class GetLoop:
    """Threads sending keep-alive `GET /name` as fast as they can; every answer other than a
    200 from a named backend, and every broken connection, is kept as an error."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.seen: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> GetLoop:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def total(self) -> int:
        with self._lock:
            return sum(self.seen.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with Client(self.port) as client:
                    while not self._stop.is_set():
                        resp = http_get(client)
                        with self._lock:
                            if resp.status == 200:
                                self.seen[resp.body.decode()] += 1
                            else:
                                self.errors.append(f"{resp.status} {resp.body[:80]!r}")
            except (OSError, EOFError, AssertionError) as exc:
                with self._lock:
                    self.errors.append(repr(exc))


# -- least_conn ------------------------------------------------------------------------------


def test_least_conn_new_tunnels_go_to_the_fewest_open(tmp_path: Path) -> None:
    with fleet(["a", "b", "c"]) as named, running_charon(
        tmp_path, hosts_toml(list(named.values()), "least_conn")
    ) as charon:
        tunnels = [Tunnel(charon.port) for _ in range(6)]
        try:
            assert Counter(t.name for t in tunnels) == {"a": 2, "b": 2, "c": 2}
            # Empty a and leave one on b: a round robin would now give each one more.
            emptied = [t for t in tunnels if t.name == "a"] + [next(t for t in tunnels
                                                                    if t.name == "b")]
            for t in emptied:
                t.close()
                tunnels.remove(t)
            wait_until(lambda: (named["a"].stats()["ws_open"], named["b"].stats()["ws_open"])
                       == (0, 1), 5, what="the backends to see the closes")
            # HTTP requests in between end at once: they leave no count behind.
            for _ in range(5):
                assert get_once(charon.port).status == 200
            new = [Tunnel(charon.port) for _ in range(3)]
            tunnels += new
            assert new[0].name == "a", [t.name for t in new]
            assert Counter(t.name for t in new) == {"a": 2, "b": 1}
            assert Counter(t.name for t in tunnels) == {"a": 2, "b": 2, "c": 2}
            assert {n: b.stats()["ws_open"] for n, b in named.items()} == {"a": 2, "b": 2, "c": 2}
        finally:
            for t in tunnels:
                t.close()


# -- stickiness ------------------------------------------------------------------------------


def test_cookie_sticks_across_20_websocket_reconnects(tmp_path: Path) -> None:
    with fleet(["a", "b", "c", "d"]) as named, running_charon(
        tmp_path, hosts_toml(list(named.values()), "cookie"), workers=2
    ) as charon:
        first = get_once(charon.port)
        assert first.status == 200
        set_cookie = first.header("Set-Cookie")
        assert set_cookie and set_cookie.startswith("charon_target="), first.headers
        assert "HttpOnly" in set_cookie, set_cookie
        cookie, home = set_cookie.split(";")[0], first.body.decode()
        landed = []
        for _ in range(20):  # new connections: both workers take some of them
            t = Tunnel(charon.port, extra=f"Cookie: theme=dark; {cookie}\r\n".encode())
            landed.append(t.name)
            assert t.echo("still here") == "still here"
            t.close()
        assert landed == [home] * 20
        # Without the cookie the same handshakes spread: the stickiness above is the cookie's.
        spread = set()
        for _ in range(8):
            t = Tunnel(charon.port)
            spread.add(t.name)
            t.close()
        assert len(spread) >= 3, spread
        # Its backend gone, the cookie's handshake lands on another one instead of failing.
        named[home].kill()
        t = Tunnel(charon.port, extra=f"Cookie: {cookie}\r\n".encode())
        assert t.name != home
        t.close()


def test_ip_hash_sticks_across_20_websocket_reconnects(tmp_path: Path) -> None:
    with fleet(["a", "b", "c", "d"]) as named, running_charon(
        tmp_path, hosts_toml(list(named.values()), "ip_hash"), workers=2,
        server_toml='trusted_proxies = ["127.0.0.1"]',
    ) as charon:
        for ip in ("10.1.0.7", "192.0.2.44"):
            xff = f"X-Forwarded-For: {ip}\r\n".encode()
            landed = set()
            for _ in range(20):
                t = Tunnel(charon.port, extra=xff)
                landed.add(t.name)
                t.close()
            assert len(landed) == 1, f"{ip}: {landed}"


def test_ip_hash_spreads_client_addresses(tmp_path: Path) -> None:
    """The hashed address is the client's as Charon sees it (decision 6: the rightmost
    untrusted one), so clients behind a trusted proxy spread over the targets."""
    with fleet(["a", "b", "c", "d"]) as named, running_charon(
        tmp_path, hosts_toml(list(named.values()), "ip_hash"),
        server_toml='trusted_proxies = ["127.0.0.1"]',
    ) as charon:
        per_ip = {}
        for i in range(32):
            ip = f"10.2.{i}.{i * 7 % 250 + 1}"
            t = Tunnel(charon.port, extra=f"X-Forwarded-For: {ip}\r\n".encode())
            per_ip[ip] = t.name
            t.close()
            resp = get_once(charon.port, extra=f"X-Forwarded-For: {ip}\r\n")
            assert resp.body.decode() == per_ip[ip], "HTTP and WebSocket hash alike"
        counts = Counter(per_ip.values())
        assert len(counts) == 4 and min(counts.values()) >= 2, counts


# -- a target killed under load, then back -----------------------------------------------------


@pytest.mark.parametrize("revival", ["active_check", "fail_timeout"])
def test_target_killed_under_load_then_back(tmp_path: Path, revival: str) -> None:
    extra = 'max_fails = 1\nfail_timeout = "2s"\n'
    if revival == "active_check":
        extra += ('health_check = { path = "/healthz", interval = "300ms", timeout = "300ms", '
                  "healthy_threshold = 1, unhealthy_threshold = 1 }\n")
    with fleet(["a", "b", "c"]) as named, running_charon(
        tmp_path, hosts_toml(list(named.values()), extra=extra), workers=2
    ) as charon:
        tunnels = [Tunnel(charon.port) for _ in range(6)]
        victim = named[tunnels[0].name]
        held = [t for t in tunnels if t.name == victim.name]
        others = [t for t in tunnels if t.name != victim.name]
        assert others, [t.name for t in tunnels]
        try:
            with GetLoop(charon.port) as load:
                wait_until(lambda: load.total() >= 200, 10, what="load before the kill")
                victim.kill()
                for t in held:
                    assert t.close_code() in (1011, 1014)
                for t in others:
                    assert t.echo("after the kill") == "after the kill"
                for i in range(len(held)):
                    again = Tunnel(charon.port)
                    assert again.name != victim.name
                    held[i] = again
                after_kill = load.total()
                wait_until(lambda: load.total() >= after_kill + 300, 15, what="load after")
                victim.spawn()
                victim.wait_listening()
                # Back in rotation: the active check (300 ms) or the end of fail_timeout (2 s)
                # lets requests reach it again.
                wait_until(lambda: victim.stats()["requests"] >= 40, 15,
                           what=f"{victim.name} back in rotation")
            assert load.errors == [], load.errors[:5]
            assert set(load.seen) == set(named), load.seen
        finally:
            for t in held + others:
                t.close()
        # The two survivors stayed reachable for WebSockets too, and the revived one takes new
        # tunnels again.
        names = set()
        for _ in range(6):
            t = Tunnel(charon.port)
            names.add(t.name)
            t.close()
        assert names == set(named)
