"""Broken, slow and absent backends, slow clients (protocol notes, decisions 4, 10 and 12).

Timeouts are short here ([timeouts] header = idle = 1s, first_byte = connect = 1s on the
hosts that need them); the deadline sweep runs every 0.5 s, so each bound allows ~1 s of slack.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from backends.raw_backend import close_delimited_body
from harness import HOST, Backend, free_port, running_charon
from httpwire import Client, Response, request

SLACK = 1.5  # the 0.5 s sweep interval, scheduling on a busy machine


@dataclass
class Setup:
    port: int
    connect_timeout_testable: bool


def _full_listener() -> tuple[socket.socket, list[socket.socket], bool]:
    """A listening socket whose accept queue is full: Linux drops further SYNs, so a connect
    to it hangs until the connector gives up (a loopback way to hit the connect timeout)."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((HOST, port))
        fillers.append(s)
    time.sleep(0.1)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect((HOST, port))
        hangs = False
    except TimeoutError:
        hangs = True
    except OSError:
        hangs = False
    finally:
        probe.close()
    return listener, fillers, hangs


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    raw = Backend("raw_backend.py")
    http = Backend("http_backend.py", "--name", "h")
    listener, fillers, hangs = _full_listener()
    hosts = f"""
        [[hosts]]
        domains = ["raw.test"]
        upstream = "{raw.url}"
        timeouts = {{ first_byte = "1s" }}

        [[hosts]]
        domains = ["closed.test"]
        upstream = "http://{HOST}:{free_port()}"

        [[hosts]]
        domains = ["full.test"]
        upstream = "http://{HOST}:{listener.getsockname()[1]}"
        timeouts = {{ connect = "1s" }}

        [[hosts]]
        domains = ["h.test"]
        upstream = "{http.url}"
        """
    extra = """
        [timeouts]
        header = "1s"
        idle = "1s"
        """
    try:
        with running_charon(
            tmp_path_factory.mktemp("failures"), hosts, workers=1, extra_toml=extra
        ) as charon:
            yield Setup(charon.port, hangs)
    finally:
        raw.stop()
        http.stop()
        for s in fillers:
            s.close()
        listener.close()


def get(port: int, host: str, target: str, version: str = "1.1") -> tuple[Response, float]:
    start = time.monotonic()
    resp = request(
        port, f"GET {target} HTTP/{version}\r\nHost: {host}\r\n\r\n".encode(), timeout=10
    )
    return resp, time.monotonic() - start


def check_proxy_error(resp: Response, status: int) -> None:
    assert resp.status == status, resp.head + resp.body
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert resp.body.startswith(b"%d " % status)
    assert len(resp.body) < 200


def test_backend_port_closed_is_502(env: Setup) -> None:
    resp, took = get(env.port, "closed.test", "/")
    check_proxy_error(resp, 502)
    assert took < 2


@pytest.mark.parametrize("target", ["/garbage", "/bad-length", "/obs-fold", "/reset"])
def test_invalid_backend_response_is_502(env: Setup, target: str) -> None:
    with Client(env.port) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: raw.test\r\n\r\n".encode())
        resp = client.read_response()
        check_proxy_error(resp, 502)
        # No backend byte leaked into the answer.
        assert b"SSH" not in resp.body and b"hello" not in resp.body
        assert b"X-Folded" not in resp.head
        assert resp.header("Connection") == "close"
        assert client.closed_within(2)


@pytest.mark.parametrize(
    ("target", "framing"),
    [
        ("/truncated", b"Content-Length: 100\r\n"),
        ("/truncated-chunked", b"Transfer-Encoding: chunked\r\n"),
    ],
)
def test_truncated_response_cuts_the_client_connection(
    env: Setup, target: str, framing: bytes
) -> None:
    start = time.monotonic()
    with Client(env.port, timeout=5) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: raw.test\r\n\r\n".encode())
        head = client.read_head()
        rest = client.read_all()  # until the proxy closes: it must, not hang
    assert time.monotonic() - start < 3
    assert head.status == 200
    assert framing in head.head
    if target == "/truncated":
        assert rest == b"0123456789"
    else:
        assert rest == b"a\r\n0123456789\r\n"  # never the last chunk: the client sees the cut


def test_backend_stalls_mid_body(env: Setup) -> None:
    """Response idle timeout: a body that stops arriving is cut (the head is already sent)."""
    start = time.monotonic()
    with Client(env.port, timeout=5) as client:
        client.send(b"GET /stall HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        head = client.read_head()
        rest = client.read_all()
    took = time.monotonic() - start
    assert head.status == 200
    assert rest == b"0123456789"
    assert 0.9 < took < 1 + SLACK + 0.5


def test_close_delimited_backend_response_http11_client(env: Setup) -> None:
    size = 1 << 20
    with Client(env.port) as client:
        client.send(b"GET /close-delimited?size=%d HTTP/1.1\r\nHost: raw.test\r\n\r\n" % size)
        resp = client.read_response()
        assert resp.status == 200
        assert resp.framing == "chunked"  # re-framed: the client can tell a complete body
        assert resp.body == close_delimited_body(size)
        client.send(b"GET /ok HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        assert client.read_response().body.startswith(b"conn=")


def test_close_delimited_backend_response_http10_client(env: Setup) -> None:
    size = 300000
    resp, _ = get(env.port, "raw.test", f"/close-delimited?size={size}", version="1.0")
    assert resp.status == 200
    assert resp.framing == "close"
    assert resp.body == close_delimited_body(size)


@pytest.mark.parametrize("target", ["/extra-bytes", "/extra-response"])
def test_bytes_after_a_complete_response_are_not_forwarded(env: Setup, target: str) -> None:
    with Client(env.port) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: raw.test\r\n\r\n".encode())
        resp = client.read_response()
        assert resp.status == 200
        assert resp.body == b"hello"
        time.sleep(0.3)  # the junk would be on its way by now
        assert not client.closed_within(0.2), "unexpected close"
        assert client.buf == b"", f"forwarded after the response: {bytes(client.buf)!r}"
        client.send(b"GET /ok HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        nxt = client.read_response()
        assert nxt.status == 200 and nxt.body.startswith(b"conn="), nxt.head + nxt.body
        assert not nxt.has("X-Smuggled")


def test_backend_never_answers_is_504_after_first_byte_timeout(env: Setup) -> None:
    resp, took = get(env.port, "raw.test", "/no-answer")
    check_proxy_error(resp, 504)
    assert 0.9 < took < 1 + SLACK


def test_connect_timeout_is_504(env: Setup) -> None:
    if not env.connect_timeout_testable:
        pytest.skip("a connect to a full accept queue did not hang on this kernel")
    resp, took = get(env.port, "full.test", "/")
    check_proxy_error(resp, 504)
    assert 0.9 < took < 1 + SLACK


def test_connect_timeout_of_a_dialled_handshake_is_504(env: Setup) -> None:
    """The same for a WebSocket handshake, whose backend connect the engine makes
    (websocket/dialled.py): the HTTP path's 504, after the same connect timeout."""
    if not env.connect_timeout_testable:
        pytest.skip("a connect to a full accept queue did not hang on this kernel")
    start = time.monotonic()
    with Client(env.port) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: full.test\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n")
        resp = client.read_response()
    check_proxy_error(resp, 504)
    assert b"did not accept the connection in time" in resp.body, resp.body
    assert 0.9 < time.monotonic() - start < 1 + SLACK


def _wait_close_or_408(client: Client, timeout: float) -> bytes:
    client.sock.settimeout(timeout)
    try:
        return client.read_all()
    except ConnectionResetError:
        return b""


def test_slow_request_head_gets_408(env: Setup) -> None:
    start = time.monotonic()
    with Client(env.port) as client:
        client.send(b"GET /echo HTTP/1.1\r\nHost: h.te")
        data = _wait_close_or_408(client, 5)
    took = time.monotonic() - start
    assert 0.9 < took < 1 + SLACK
    assert data == b"" or data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data


def test_trickled_request_head_is_cut_at_the_header_deadline(env: Setup) -> None:
    """Slowloris: a byte every 0.2 s keeps the connection busy but the head never completes."""
    head = b"GET /echo HTTP/1.1\r\nHost: h.test\r\nX-Slow: " + b"a" * 40
    start = time.monotonic()
    closed_at = None
    with Client(env.port) as client:
        for byte in head:
            try:
                client.send(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            if client.closed_within(0.2):
                closed_at = time.monotonic()
                break
            if client.buf:
                # The 408 came (closed_within reads no further once bytes arrived): the close
                # must follow it; the next sends could race it, so wait for it here.
                closed_at = time.monotonic()
                client.buf += _wait_close_or_408(client, 2)
                break
            if time.monotonic() - start > 5:
                break
        data = bytes(client.buf)
    assert closed_at is not None, "the trickling client was never cut"
    assert closed_at - start < 1 + SLACK
    assert data == b"" or data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data


def test_idle_connection_without_request_is_closed(env: Setup) -> None:
    start = time.monotonic()
    with Client(env.port) as client:
        data = _wait_close_or_408(client, 5)
    took = time.monotonic() - start
    assert data == b""
    assert 0.9 < took < 1 + SLACK


def test_keep_alive_idle_close(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(b"GET /echo HTTP/1.1\r\nHost: h.test\r\n\r\n")
        assert client.read_response().status == 200
        start = time.monotonic()
        assert not client.closed_within(0.7)  # still open shortly after the response
        assert client.closed_within(5)
        took = time.monotonic() - start
    assert 0.9 < took < 1 + SLACK


def test_stalled_request_body_gets_408(env: Setup) -> None:
    start = time.monotonic()
    with Client(env.port) as client:
        client.send(b"POST /echo HTTP/1.1\r\nHost: h.test\r\nContent-Length: 10\r\n\r\nabc")
        data = _wait_close_or_408(client, 5)
    took = time.monotonic() - start
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), data
    assert 0.9 < took < 1 + SLACK


def test_failures_do_not_break_the_next_request(env: Setup) -> None:
    for target in ("/garbage", "/reset", "/truncated", "/extra-bytes"):
        with contextlib.suppress(EOFError, ConnectionResetError):
            get(env.port, "raw.test", target)
    resp, _ = get(env.port, "raw.test", "/ok")
    assert resp.status == 200
    resp, _ = get(env.port, "h.test", "/echo")
    assert resp.status == 200
