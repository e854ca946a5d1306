"""The front door serves each arrival on its own (issue #10, item 1).

A handshake head llhttp refuses (an invalid Content-Length, say) must get the HTTP path's 400
and a close, hold no fd, and never stop the handshakes accepted in the same batch after it.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from harness import HOST, wait_until
from test_websocket_handshake import Env, RawWs, client_frame, handshake_hosts, ws_env, ws_request
from test_websocket_upgrade_rules import all_until_close, answer

BAD_LENGTHS = [b"x", b"", b"1, 2", b"-1", b"+5", b"1_0", b"0x10", b"5\r\nContent-Length: 6"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with ws_env(tmp_path_factory.mktemp("front-door-arrivals"), handshake_hosts) as env:
        yield env


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _bad(length: bytes) -> bytes:
    return ws_request("/echo", extra=b"Content-Length: " + length + b"\r\n")


def test_bad_content_length_handshakes_get_400_and_hold_no_fd(env: Env) -> None:
    (worker,) = env.charon.worker_pids()
    with RawWs(env.port) as ws:  # pools and the event socket exist before counting
        ws.upgrade("/echo")
    time.sleep(0.3)
    before = _fds(worker)
    for i in range(50):
        with socket.create_connection((HOST, env.port), timeout=10) as sock:
            sock.sendall(_bad(BAD_LENGTHS[i % len(BAD_LENGTHS)]))
            answer = all_until_close(sock)
        assert answer.startswith(b"HTTP/1.1 400 "), (BAD_LENGTHS[i % len(BAD_LENGTHS)], answer)
    wait_until(lambda: _fds(worker) <= before + 2, 5, what=f"about {before} fds in the worker")
    with RawWs(env.port) as ws:  # and the worker still serves handshakes
        ws.upgrade("/echo")
        ws.send(client_frame(0x1, b"after"))
        assert ws.read_frame().payload == b"after"


def test_bad_arrival_first_in_a_batch_leaves_the_others_served(env: Env) -> None:
    """The worker is stopped while one bad and five good handshakes queue up, so that one
    accept run takes them in that order."""
    (worker,) = env.charon.worker_pids()
    socks: list[socket.socket] = []
    os.kill(worker, signal.SIGSTOP)
    try:
        for request in [_bad(b"x")] + [ws_request("/echo")] * 5:
            sock = socket.create_connection((HOST, env.port), timeout=10)
            sock.sendall(request)
            socks.append(sock)
    finally:
        os.kill(worker, signal.SIGCONT)
    try:
        assert all_until_close(socks[0]).startswith(b"HTTP/1.1 400 ")
        for sock in socks[1:]:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                assert chunk, head
                head += chunk
            assert head.startswith(b"HTTP/1.1 101 "), head
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("length", BAD_LENGTHS)
def test_bad_content_length_same_both_ways(env: Env, length: bytes) -> None:
    """The HTTP path answers the same handshake with the same 400 (a second request)."""
    answers = [answer(env, _bad(length), warm_up) for warm_up in (False, True)]
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"HTTP/1.1 400 "), answers[0]
