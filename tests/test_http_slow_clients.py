"""Slow and vanishing clients (issue #10, exhaustion): `[timeouts] send`, `body` and
`body_min_rate`, and a request body cut by the client's FIN.

Small timeouts in the test config; bounds are generous (the machine is shared): each test
asserts what happens, and within a limit far from what the old behaviour would take.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOST, Backend, Charon, free_port, running_charon
from test_metrics import value, wait_metrics

BIG = 64 << 20


@pytest.fixture(scope="module")
def hosts() -> Iterator[str]:
    http = Backend("http_backend.py", "--name", "h")
    try:
        yield f'[[hosts]]\ndomains = ["h.test"]\nupstream = "{http.url}"\n'
    finally:
        http.stop()


def _charon(tmp: Path, hosts: str, timeouts: str) -> contextlib.AbstractContextManager[Charon]:
    return running_charon(tmp, hosts, extra_toml=f"[timeouts]\n{timeouts}\n")


def _small_rcvbuf_connect(port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect((HOST, port))
    return s


def _read_until_cut(
    s: socket.socket, limit: float, step: int = 1 << 20, pause: float = 0.0
) -> tuple[int, bool]:
    """Read (`step` bytes at a time, `pause` s apart) until the proxy ends the connection or
    `limit` s pass: (bytes read, whether it ended)."""
    total, deadline = 0, time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            data = s.recv(step)
        except ConnectionResetError:
            return total, True
        except TimeoutError:
            continue
        if not data:
            return total, True
        total += len(data)
        if pause:
            time.sleep(pause)
    return total, False


def test_client_that_never_reads_is_cut_after_send_timeout(tmp_path: Path, hosts: str) -> None:
    with _charon(tmp_path, hosts, 'send = "1s"\nbody_min_rate = 0') as charon:
        s = _small_rcvbuf_connect(charon.port)
        with s:
            s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: h.test\r\n\r\n" % BIG)
            time.sleep(4)  # reads nothing: 1 s of send timeout, swept every 0.5 s
            total, ended = _read_until_cut(s, 20)
        assert ended and total < BIG, (total, ended)
        assert "took 0 bytes of its response" in charon.log() or "cut off" in charon.log()


def test_client_reading_under_min_rate_is_cut(tmp_path: Path, hosts: str) -> None:
    with _charon(tmp_path, hosts, 'send = "1s"\nbody_min_rate = "64KiB"') as charon:
        s = _small_rcvbuf_connect(charon.port)
        with s:
            s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: h.test\r\n\r\n" % BIG)
            # About 10 KiB/s, a little at a time: never idle for 1 s, far under 64 KiB/s.
            start = time.monotonic()
            total, ended = _read_until_cut(s, 30, step=1024, pause=0.1)
        print(f"\nslow reader: cut after {time.monotonic() - start:.1f} s, {total} bytes read")
        assert ended and total < BIG, (total, ended)


def test_client_reading_at_min_rate_is_not_cut(tmp_path: Path, hosts: str) -> None:
    with _charon(tmp_path, hosts, 'send = "1s"\nbody_min_rate = 1024') as charon:
        s = _small_rcvbuf_connect(charon.port)
        with s:
            s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: h.test\r\n\r\n" % (4 << 20))
            total, ended = _read_until_cut(s, 6, step=65536, pause=0.05)  # ~1 MiB/s
        assert not ended or total > 4 << 20, (total, ended)


def _trickle(
    port: int, head: bytes, every: float, piece: bytes, limit: float
) -> tuple[bytes, float]:
    """Send `head`, then `piece` every `every` s until an answer comes (or `limit` s)."""
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(head)
        s.setblocking(False)
        out = b""
        while time.monotonic() - start < limit and b"\r\n\r\n" not in out:
            with contextlib.suppress(BlockingIOError):
                data = s.recv(65536)
                if not data:
                    break
                out += data
                continue
            with contextlib.suppress(OSError):
                s.send(piece)
            time.sleep(every)
        return out, time.monotonic() - start


UPLOAD = b"POST /upload HTTP/1.1\r\nHost: h.test\r\nContent-Length: 1000000\r\n\r\n"


def test_body_under_min_rate_gets_408(tmp_path: Path, hosts: str) -> None:
    # 50 bytes/s, never idle for 1 s: the idle limit alone would never fire.
    with _charon(tmp_path, hosts, 'idle = "1s"\nbody_min_rate = 1000') as charon:
        out, took = _trickle(charon.port, UPLOAD, 0.2, b"x" * 10, 20)
    print(f"\nslow body: answered after {took:.1f} s")
    assert out.startswith(b"HTTP/1.1 408 "), out[:200]


def test_body_at_min_rate_is_not_cut(tmp_path: Path, hosts: str) -> None:
    with _charon(tmp_path, hosts, 'idle = "1s"\nbody_min_rate = 100') as charon:
        body = b"POST /upload HTTP/1.1\r\nHost: h.test\r\nContent-Length: 1000\r\n\r\n"
        out, _ = _trickle(charon.port, body, 0.1, b"x" * 50, 20)  # 500 bytes/s: 2 s
    assert out.startswith(b"HTTP/1.1 200 ") and b'"length": 1000' in out, out[:300]


def test_whole_body_deadline_gets_408(tmp_path: Path, hosts: str) -> None:
    with _charon(tmp_path, hosts, 'idle = "5s"\nbody = "2s"\nbody_min_rate = 0') as charon:
        out, took = _trickle(charon.port, UPLOAD, 0.1, b"x" * 1000, 20)  # 10 KB/s: 100 s
    print(f"\nbody deadline: answered after {took:.1f} s")
    assert out.startswith(b"HTTP/1.1 408 "), out[:200]


def test_client_fin_mid_body_closes_the_backend_leg(tmp_path: Path) -> None:
    """The backend sees EOF as soon as the client half-closes inside a request body; the
    client gets a 400."""
    port = free_port()
    listener = socket.create_server((HOST, port))
    listener.settimeout(20)
    seen: dict[str, float] = {}
    received: list[bytes] = []

    def backend() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(20)
            data = b""
            while True:
                try:
                    chunk = conn.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    seen["eof"] = time.monotonic()
                    break
                data += chunk
            received.append(data)

    thread = threading.Thread(target=backend, daemon=True)
    thread.start()
    hosts = f'[[hosts]]\ndomains = ["fin.test"]\nupstream = "http://{HOST}:{port}"\n'
    timeouts = '[timeouts]\nidle = "60s"\n'
    try:
        with running_charon(tmp_path, hosts, extra_toml=timeouts) as charon:
            with socket.create_connection((HOST, charon.port), timeout=10) as s:
                s.sendall(b"POST /x HTTP/1.1\r\nHost: fin.test\r\nContent-Length: 1000\r\n\r\n")
                s.sendall(b"y" * 100)
                time.sleep(0.5)  # the head and part of the body reach the backend
                sent = time.monotonic()
                s.shutdown(socket.SHUT_WR)
                answer = b""
                with contextlib.suppress(TimeoutError, ConnectionResetError):
                    while chunk := s.recv(65536):
                        answer += chunk
            thread.join(20)
    finally:
        listener.close()
    assert "eof" in seen, "the backend never saw the connection end"
    assert seen["eof"] - sent < 10  # (the body idle limit is 60 s)
    assert received and received[0].endswith(b"y" * 100)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]


def test_client_not_reading_is_not_counted_as_a_stalled_backend(tmp_path: Path, hosts: str) -> None:
    """The response idle limit (1 s) passes while the backend waits for the client: the
    send watch cuts the client (3 s); no upstream timeout is counted against the host."""
    with _charon(tmp_path, hosts, 'idle = "1s"\nsend = "3s"\nbody_min_rate = 0') as charon:
        s = _small_rcvbuf_connect(charon.port)
        with s:
            s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: h.test\r\n\r\n" % BIG)
            time.sleep(6)
            total, ended = _read_until_cut(s, 20)
        assert ended and total < BIG, (total, ended)
        with socket.create_connection((HOST, charon.port), timeout=10) as s2:
            s2.sendall(b"GET /status/204 HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n")
            assert s2.recv(100).startswith(b"HTTP/1.1 204 ")
        samples = wait_metrics(
            charon,
            lambda m: bool(value(m, "charon_http_requests_total", host="h.test", method="GET",
                                 code="204")),
            "the 204 in the metrics",
        )
        assert not value(samples, "charon_upstream_errors_total", host="h.test", kind="timeout",
                         reason="timeout")
        assert "cut off" in charon.log()


def test_client_fin_mid_body_of_an_answered_request_closes(tmp_path: Path, hosts: str) -> None:
    """A request answered by the proxy (404: no such host) whose body is being read and
    dropped: the client's FIN before the body's end closes the connection (it stayed open)."""
    with (
        _charon(tmp_path, hosts, 'idle = "60s"') as charon,
        socket.create_connection((HOST, charon.port), timeout=10) as s,
    ):
        s.sendall(b"POST /x HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 1000\r\n\r\n")
        s.sendall(b"y" * 10)
        time.sleep(0.3)
        s.shutdown(socket.SHUT_WR)
        answer, ended = b"", False
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
            ended = True
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
    assert ended, "the connection stayed open"
