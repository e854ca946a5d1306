"""Draining targets (issue 13) through a real Charon: an in-place reload that marks a target
`drain = true` or removes it sends it nothing new, keeps its open WebSockets for
`drain_timeout` and then closes them with 1001; the tunnels of the targets that stay are kept.
The open tunnels of each target follow (charon_upstream_tunnels_open).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import time
import urllib.request
from pathlib import Path

from harness import HOST, Backend, Charon, running_charon, wait_until

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


class Ws:
    """A WebSocket client on a raw socket: enough to see the proxy's Close."""

    def __init__(self, port: int, host: str, path: str) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "closed before the 101"
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101 "), head

    def send_text(self, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes((0x81, 0x80 | len(payload))) + mask + masked)

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_frame(self) -> tuple[int, bytes]:
        first, second = self._exact(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._exact(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._exact(8))[0]
        return first & 0x0F, self._exact(length)

    def echo(self, payload: bytes) -> bool:
        self.send_text(payload)
        return self.read_frame() == (1, payload)

    def close(self) -> None:
        self.sock.close()


def _seen_ids(backend: Backend) -> set[str]:
    with urllib.request.urlopen(f"{backend.url}/seen", timeout=5) as r:
        seen = json.loads(r.read())
    return {e["path"].split("id=")[1] for e in seen if e["upgrade"] and "id=" in e["path"]}


def _config(charon: Charon, upstreams: str) -> str:
    return (
        f'[server]\nlisten = ["{HOST}:{charon.port}"]\nworkers = 1\ndrain_timeout = "1s"\n'
        f'[admin]\nlisten = "{HOST}:{charon.admin_port}"\n\n'
        f'[[hosts]]\ndomains = ["ws.test"]\nupstreams = [{upstreams}]\n'
    )


def _tunnels_open(charon: Charon) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{HOST}:{charon.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("charon_upstream_tunnels_open{"):
            labels, value = line.rsplit(" ", 1)
            target = labels.split('target="')[1].split('"')[0]
            out[target] = float(value)
    return out


def test_drained_and_removed_targets_close_their_tunnels_after_drain_timeout(
    tmp_path: Path, backend_factory
) -> None:  # type: ignore[no-untyped-def]
    kept, drained, removed = (backend_factory("ws_backend.py") for _ in range(3))
    hosts = (
        f'[[hosts]]\ndomains = ["ws.test"]\n'
        f'upstreams = ["{kept.url}", "{drained.url}", "{removed.url}"]\n'
    )
    with running_charon(tmp_path, hosts, server_toml='drain_timeout = "1s"') as charon:
        tunnels = {str(i): Ws(charon.port, "ws.test", f"/echo?id={i}") for i in range(6)}
        try:
            where = {b.url: _seen_ids(b) for b in (kept, drained, removed)}
            assert [len(ids) for ids in where.values()] == [2, 2, 2]  # round robin
            want = {kept.url: 2.0, drained.url: 2.0, removed.url: 2.0}
            wait_until(lambda: _tunnels_open(charon) == want, 5, what="tunnel gauges")
            charon.config_path.write_text(
                _config(charon, f'"{kept.url}", {{ url = "{drained.url}", drain = true }}')
            )
            hup = time.monotonic()
            os.kill(charon.pid, signal.SIGHUP)
            wait_until(
                lambda: (charon.health() or {}).get("reloads", {}).get("count", 0) >= 1, 20,
                what="the reload",
            )
            assert charon.health()["reloads"]["last_result"] == "success"  # type: ignore[index]
            # Nothing new for the drained target (nor the removed one).
            fresh = [Ws(charon.port, "ws.test", f"/echo?id=n{i}") for i in range(4)]
            assert {f"n{i}" for i in range(4)} <= _seen_ids(kept)
            # Every tunnel still serves within drain_timeout...
            assert all(t.echo(b"during") for t in tunnels.values())
            # ... then those of the drained and removed targets get 1001, the others stay.
            going = [tunnels[i] for i in where[drained.url] | where[removed.url]]
            for tunnel in going:
                opcode, payload = tunnel.read_frame()
                assert opcode == 8 and payload[:2] == struct.pack("!H", 1001), payload
            assert time.monotonic() - hup >= 0.9
            assert all(tunnels[i].echo(b"after") for i in where[kept.url])
            assert all(t.echo(b"fresh") for t in fresh)
            # The gauges follow: the kept target has its 2 + 4, the others none.
            wait_until(lambda: {k: v for k, v in _tunnels_open(charon).items() if v} == {
                kept.url: 6.0}, 5, what="tunnel gauges after the drain")
            for t in fresh:
                t.close()
        finally:
            for tunnel in tunnels.values():
                tunnel.close()
