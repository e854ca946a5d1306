"""The front door (door.c, dial.c, http/adopted.py): connections the engine accepts itself.

A handshake whose first read holds its whole head takes the engine's path: the engine dials the
backend and hands the 101 to Python, which judges it as the HTTP path does. The same handshake
sent as the second request of a keep-alive connection takes the HTTP path (llhttp,
`switching_response`). Each test here sends one handshake both ways and requires the same bytes
on the wire: to the client (the 101, the relayed refusal, the 502) and to the backend (the
forwarded request). Then the cases only the front door has: a client silent at first, a head
cut in two, a connection closed unheard.
"""

from __future__ import annotations

import base64
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOST, Backend, running_charon, wait_until
from test_websocket_handshake import (
    KEY,
    Env,
    Head,
    RawWs,
    client_frame,
    handshake_hosts,
    ws_env,
    ws_request,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with ws_env(tmp_path_factory.mktemp("front-door"), handshake_hosts) as env:
        yield env


def answer_path(*parts: bytes) -> str:
    query = "&".join(
        f"{name}={base64.urlsafe_b64encode(part).decode()}"
        for name, part in zip("ab", parts, strict=False)
    )
    return f"/answer?{query}"


def exchange(env: Env, request: bytes, warm_up: bool) -> tuple[bytes, bytes]:
    """(what the client got before the backend's first frame or the close, the backend's
    report of the request head it read (b"" if it sent none)) for one handshake."""
    with RawWs(env.port) as ws:
        if warm_up:  # a keep-alive request first: the handshake is the connection's second
            ws.send(f"GET /plain HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head, body = ws.read_response()
            assert (head.status, body) == (200, b"plain"), head.raw
        ws.send(request)
        head = ws.read_head()
        if head.status != 101:
            return head.raw + _body(ws, head), b""
        frame = ws.read_frame()
        ws.send(client_frame(0x8, b"\x03\xe8"))
        return head.raw, frame.payload


def _body(ws: RawWs, head: Head) -> bytes:
    """A response body as Charon frames it: Content-Length, or chunked (a body the backend
    ended by closing; this test's chunks are small, so the last one ends the body)."""
    if head.get("Transfer-Encoding") == "chunked":
        while not ws.buf.endswith(b"0\r\n\r\n"):
            ws._fill()
        body = bytes(ws.buf)
        ws.buf.clear()
        return body
    return ws.read_exact(int(head.get("Content-Length") or 0))


def both_ways(env: Env, request: bytes) -> tuple[bytes, bytes]:
    front = exchange(env, request, warm_up=False)
    http = exchange(env, request, warm_up=True)
    assert front == http, f"front door:\n{front!r}\nHTTP path:\n{http!r}"
    return front


ACCEPT_LINE = b"Sec-WebSocket-Accept: {accept}\r\n"
VALID = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
# What the client offers (a 101 may only choose among them: RFC 6455 4.1)
OFFERS = (b"Sec-WebSocket-Protocol: chat, superchat\r\n"
          b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n")


@pytest.mark.parametrize(
    "answer, status",
    [
        pytest.param(VALID + ACCEPT_LINE + b"\r\n", 101, id="plain-101"),
        pytest.param(
            b"HTTP/1.1 101 Go\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n"
            + ACCEPT_LINE + b"Sec-WebSocket-Protocol: chat\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate\r\nX-Extra:  spaced value \t\r\n"
            b"Content-Length: 0\r\nKeep-Alive: timeout=5\r\nSet-Cookie: a=1\r\n\r\n",
            101, id="101-with-extras",
        ),
        pytest.param(b"HTTP/1.1 101\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
                     b"sec-websocket-accept:{accept}\r\n\r\n", 101, id="101-terse"),
        pytest.param(VALID + ACCEPT_LINE + ACCEPT_LINE + b"\r\n", 502, id="two-accepts"),
        pytest.param(VALID + b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n", 502,
                     id="wrong-accept"),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     + ACCEPT_LINE + b"\r\n", 502, id="no-connection-upgrade"),
        pytest.param(VALID + ACCEPT_LINE + b"X-Folded: a\r\n b\r\n\r\n", 502, id="obs-fold"),
        # (Connection: close: the test backend answers one request per connection)
        pytest.param(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\nX-Why: token\r\n"
                     b"Connection: close\r\n\r\ndenied", 401, id="refused"),
        pytest.param(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\nnah", 404,
                     id="not-found-until-close"),
    ],
)
def test_answer_same_both_ways(env: Env, answer: bytes, status: int) -> None:
    got, request_seen = both_ways(
        env, ws_request(answer_path(answer), host="raw.test", extra=OFFERS)
    )
    assert got.startswith(b"HTTP/1.1 %d " % status), got
    if status == 101:
        assert request_seen.startswith(b"GET /answer?"), request_seen
        assert b"Sec-WebSocket-Key: " + KEY in request_seen


def test_101_in_two_writes_same_both_ways(env: Env) -> None:
    """The backend's 101 head split over two writes 50 ms apart: the dial reads on."""
    answer = VALID + ACCEPT_LINE + b"\r\n"
    got, _ = both_ways(env, ws_request(answer_path(answer[:30], answer[30:]), host="raw.test"))
    assert got.startswith(b"HTTP/1.1 101 "), got


def test_request_forwarded_same_both_ways(env: Env) -> None:
    """Odd but valid client fields (spaces around values, a tab, repeated names, obs-text)."""
    extra = (b"X-Spaced:   value with spaces   \r\nX-Tab:\tx\t\r\nX-Twice: 1\r\nX-Twice: 2\r\n"
             b"X-Forwarded-For: 6.6.6.6\r\nConnection: X-Secret\r\nX-Secret: no\r\n"
             b"X-Latin: caf\xe9\r\n")
    got, seen = both_ways(env, ws_request(answer_path(VALID + ACCEPT_LINE + b"\r\n"),
                                          host="raw.test", extra=extra))
    assert got.startswith(b"HTTP/1.1 101 "), got
    assert b"X-Spaced: value with spaces   \r\n" in seen, seen  # llhttp keeps trailing OWS
    assert b"X-Secret" not in seen and b"6.6.6.6" not in seen, seen


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        pytest.param(ws_request("/echo", extra=b"X-Folded: a\r\n b\r\n"), 400, id="obs-fold"),
        pytest.param(ws_request("/echo", extra=b"X-Bad : a\r\n"), 400, id="space-before-colon"),
        pytest.param(ws_request("/echo", key=b"short"), 400, id="bad-key"),
        pytest.param(ws_request("/echo", version=b"8"), 426, id="version-8"),
        pytest.param(ws_request("/echo", method=b"POST"), 400, id="post"),
        pytest.param(ws_request("/echo", host="nowhere.test"), 404, id="unknown-host"),
    ],
)
def test_bad_handshake_same_both_ways(env: Env, request_bytes: bytes, status: int) -> None:
    """Refused by the proxy on either path, with the same answer."""
    front = _refusal(env, request_bytes, warm_up=False)
    http = _refusal(env, request_bytes, warm_up=True)
    assert front == http
    assert front.startswith(b"HTTP/1.1 %d " % status), front


def _refusal(env: Env, request_bytes: bytes, warm_up: bool) -> bytes:
    with RawWs(env.port) as ws:
        if warm_up:
            ws.send(f"GET /plain HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            ws.read_response()
        ws.send(request_bytes)
        head, body = ws.read_response()
        return head.raw + body


# -- what only the front door sees -----------------------------------------------------------


@pytest.mark.parametrize("pause", [0.1, 0.8])
def test_client_silent_at_first(env: Env, pause: float) -> None:
    """A client that connects and sends later: read by the engine once it speaks (0.1 s), or
    handed to the HTTP path after 0.5 s of silence (0.8 s). Both a handshake and a plain
    request then work."""
    with RawWs(env.port) as ws:
        time.sleep(pause)
        head = ws.upgrade("/echo")
        assert head.get("Sec-WebSocket-Accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        ws.send(client_frame(0x1, b"late"))
        assert ws.read_frame().payload == b"late"
    with RawWs(env.port) as ws:
        time.sleep(pause)
        ws.send(f"GET /plain HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        head, body = ws.read_response()
        assert (head.status, body) == (200, b"plain")


def test_head_in_two_pieces(env: Env) -> None:
    """A handshake whose first read is not a whole head goes the HTTP way, and works."""
    request = ws_request("/echo")
    with RawWs(env.port) as ws:
        ws.send(request[:20])
        time.sleep(0.1)
        ws.send(request[20:])
        head = ws.read_head()
        assert head.status == 101, head.raw
        ws.send(client_frame(0x1, b"pieces"))
        assert ws.read_frame().payload == b"pieces"


def test_connections_closed_unheard_leave_nothing(env: Env) -> None:
    """Connections closed without a word, or reset, before or after the engine reads them:
    the worker goes on serving and keeps no socket of theirs."""
    (worker,) = env.charon.worker_pids()
    with RawWs(env.port) as ws:  # a first exchange: the pools and the event socket exist
        ws.upgrade("/echo")
    time.sleep(0.3)
    before = _sockets(worker)
    for _ in range(20):
        sock = socket.create_connection((HOST, env.port), timeout=5)
        sock.close()
        sock = socket.create_connection((HOST, env.port), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # an RST
        sock = socket.create_connection((HOST, env.port), timeout=5)
        sock.sendall(ws_request("/echo"))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # gone while its handshake is dialled
    with RawWs(env.port) as ws:
        ws.upgrade("/echo")
    wait_until(lambda: _sockets(worker) <= before, 5, what=f"at most {before} sockets held")


def _sockets(pid: int) -> int:
    fd_dir = f"/proc/{pid}/fd"
    return sum(1 for fd in os.listdir(fd_dir) if _is_socket(f"{fd_dir}/{fd}"))


def _is_socket(path: str) -> bool:
    try:
        return os.readlink(path).startswith("socket:")
    except OSError:
        return False


def test_out_of_fds_accepting_pauses_then_resumes(tmp_path: Path) -> None:
    """accept() failing with EMFILE takes the listening socket out of the engine's set (else
    it would be reported again at once, a busy loop), and it comes back within a second or
    two; connections that waited in the queue meanwhile are served, none is lost."""
    env_ws = Backend("ws_backend.py")
    try:
        hosts = f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{env_ws.url}"\n'
        with running_charon(tmp_path, hosts) as charon:
            (worker,) = charon.worker_pids()
            with RawWs(charon.port) as ws:  # pools, event socket: made before the squeeze
                ws.send(f"GET /plain HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                ws.read_response()
            limits = resource.prlimit(worker, resource.RLIMIT_NOFILE)
            in_use = len(os.listdir(f"/proc/{worker}/fd"))
            resource.prlimit(worker, resource.RLIMIT_NOFILE, (in_use + 3, limits[1]))
            try:
                held = [socket.create_connection((HOST, charon.port), timeout=5)
                        for _ in range(10)]
                wait_until(lambda: "accepting paused" in charon.log(), 5,
                           what="the worker to log its pause")
                for sock in held:
                    sock.close()
            finally:
                resource.prlimit(worker, resource.RLIMIT_NOFILE, limits)
            queued = [socket.create_connection((HOST, charon.port), timeout=5) for _ in range(3)]
            for sock in queued:
                sock.sendall(f"GET /plain HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            for sock in queued:
                sock.settimeout(5)
                reply = sock.recv(4096)
                sock.close()
                assert reply.startswith(b"HTTP/1.1 200 "), reply
            assert charon.worker_pids() == [worker], "the worker was replaced"
    finally:
        env_ws.stop()

