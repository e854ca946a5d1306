"""A backend socket the front door's dial hands to the HTTP path is closed once, by uvloop.

`UpstreamPool.connect(exchange, fd)` gives uvloop the dialled socket as a Python socket object.
uvloop attaches that object to the transport only when `create_connection` resumes, a loop turn
after `connection_made`; an exchange that ends there (the handed-back answer read at once: a
refused 101's 502, a relayed 401 with Connection: close) closes the transport before the
attach, so the object stayed attached to a closed transport and its finalizer closed the fd
number a second time when the transport was freed. By then the number could be a new
connection's: under load its client saw the connection closed without a byte, or libuv aborted
the worker (epoll_ctl on a closed fd; test_front_door.py's flake, SIGABRT in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import gc
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from harness import HOST
from test_front_door import ACCEPT_LINE, OFFERS, VALID, answer_path, exchange
from test_websocket_handshake import Env, handshake_hosts, ws_env, ws_request

from charon.config.model import Upstream
from charon.worker.upstreams.connection import UpstreamConnection
from charon.worker.upstreams.pool import UpstreamPool


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as exc:
        assert exc.errno == errno.EBADF, exc
        return False
    return True


class _AnsweredAtOnce:
    """The exchange side of a taken-over connection that ends in `connection_made`, as
    Exchange does when the handed-back answer is all it needs (Exchange._fail aborts it)."""

    def __init__(self) -> None:
        self.conn: UpstreamConnection | None = None
        self.transport: asyncio.BaseTransport | None = None  # kept: freed when the test says
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def upstream_connected(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.transport = conn.transport
        conn.abort()

    def connect_done(self, _connecting: Any, conn: Any, exc: BaseException | None) -> None:
        self.done.set_result(None) if exc is None else self.done.set_exception(exc)


def test_taken_over_fd_is_not_closed_again_when_its_transport_is_freed() -> None:
    """In one process, on real uvloop transports: the fd number of a taken-over connection
    that ended in connection_made, given to a new connection, stays that connection's."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, HOST, 0)  # accepts, says nothing
        port = server.sockets[0].getsockname()[1]
        try:
            upstream = Upstream(f"http://{HOST}:{port}", HOST, port)
            pool = UpstreamPool(loop, upstream, idle_timeout=60.0)
            dialled = socket.create_connection((HOST, port))
            fd = dialled.detach()
            exchange = _AnsweredAtOnce()
            pool.connect(exchange, fd).start()  # type: ignore[arg-type]
            await asyncio.wait_for(exchange.done, 10)
            for _ in range(100):  # uvloop closes the fd at the transport's connection_lost
                if not _is_open(fd):
                    break
                await asyncio.sleep(0.01)
            assert not _is_open(fd), "the aborted transport's fd is still open"
            # The number goes to a new connection, as the worker's next accept would take it.
            newcomer = socket.create_connection((HOST, port))
            if newcomer.fileno() != fd:  # (a lower number was free: it is moved there)
                os.dup2(newcomer.fileno(), fd)
                newcomer.close()
                newcomer = socket.socket(fileno=fd)
            try:
                exchange.conn = exchange.transport = None  # the transport can be freed now
                for _ in range(5):
                    await asyncio.sleep(0)
                    gc.collect()
                assert _is_open(fd), "freeing the old transport closed the new connection's fd"
                assert newcomer.getpeername()[1] == port
            finally:
                with contextlib.suppress(OSError):  # (EBADF if it was closed under it)
                    newcomer.close()
        finally:
            server.close()

    uvloop.run(asyncio.wait_for(scenario(), 30))


# -- the whole path: the front door's dial handed back, Charon's own worker -------------------


@pytest.fixture()
def warned_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    # A socket object finalized while it still holds an fd says so (ResourceWarning, shown
    # only when asked): the worker's log tells whether a taken-over socket was closed twice.
    monkeypatch.setenv("PYTHONWARNINGS", "always::ResourceWarning")
    with ws_env(tmp_path, handshake_hosts) as env:
        yield env


def test_handed_back_answers_leave_no_socket_to_close_twice(warned_env: Env) -> None:
    env = warned_env
    answers = [
        VALID + ACCEPT_LINE + b"Sec-WebSocket-Protocol: Chat\r\n\r\n",  # refused 101: 502
        VALID + ACCEPT_LINE + b"X-Folded: a\r\n b\r\n\r\n",  # llhttp refuses it: 502
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndenied",
    ]
    for answer in answers:
        request = ws_request(answer_path(answer), host="raw.test", extra=OFFERS)
        got, _ = exchange(env, request, warm_up=False)  # the front door dials it
        assert got.startswith((b"HTTP/1.1 502 ", b"HTTP/1.1 401 ")), got
        got, _ = exchange(env, request, warm_up=True)  # the HTTP path, for contrast
        assert got.startswith((b"HTTP/1.1 502 ", b"HTTP/1.1 401 ")), got
    env.charon.stop()  # the worker's stderr is complete once it exited
    log = env.charon.log()
    assert "Traceback" not in log and "SIGABRT" not in log, log
    assert "unclosed <socket.socket" not in log, log
