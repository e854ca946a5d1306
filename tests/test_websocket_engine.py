"""What the tunnel engine (charon/worker/websocket/_engine.c) adds: frame headers and Pongs cut
across reads, the 101 and frames in one read, flow control that bounds the worker's memory, the
limit on flushing to a peer that never reads, and the hand-over while uvloop still holds bytes
for the client."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop
from harness import HOST, Backend, Charon, running_charon, wait_until
from test_metrics import scrape, value, wait_metrics
from test_websocket_handshake import RawWs, client_frame, ws_request
from test_websocket_tunnel import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, backend_report

MiB = 1024 * 1024
FLOOD_PAYLOAD = bytes(i % 251 for i in range(MiB))  # ws_raw_backend's
BIG_SIZE = 16 * MiB
TRICKLE_TEXT = (b"split header " * 30)[:300]
TRICKLE_BINARY = bytes(i % 256 for i in range(70000))
TCP_CLOSE = 7  # tcp_info.tcpi_state after a reset


@dataclass
class Env:
    charon: Charon
    port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    raw = Backend("ws_raw_backend.py")
    try:
        hosts = f"""
            [[hosts]]
            domains = ["{HOST}", "burst.test"]
            upstream = "{raw.url}"

            [[hosts]]
            domains = ["split.test"]
            upstream = "{raw.url}"

            [[hosts]]
            domains = ["splitin.test"]
            upstream = "{raw.url}"

            [[hosts]]
            domains = ["flood.test"]
            upstream = "{raw.url}"

            [[hosts]]
            domains = ["limit.test"]
            upstream = "{raw.url}"
            websocket_max_frame_size = 1024

            [[hosts]]
            domains = ["ping.test"]
            upstream = "{raw.url}"
            websocket_ping_interval = "1s"
            """
        with running_charon(tmp_path_factory.mktemp("ws-engine"), hosts) as charon:
            yield Env(charon, charon.port)
    finally:
        raw.stop()


def worker_pid(charon: Charon) -> int:
    pids = charon.worker_pids()
    assert len(pids) == 1, pids
    return pids[0]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def send_bytewise(ws: RawWs, data: bytes) -> None:
    """One byte per segment (TCP_NODELAY is set): each byte is its own read in the proxy."""
    for i in range(len(data)):
        ws.send(data[i : i + 1])
        time.sleep(0.02)


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


# -- frames cut across reads -----------------------------------------------------------------


def test_backend_headers_split_byte_by_byte(env: Env) -> None:
    """Each header byte of three backend frames arrives alone (16-bit and 64-bit lengths, a
    Close whose code is cut too): the client gets the frames intact and the Close's code."""
    with RawWs(env.port, timeout=10) as ws:
        ws.upgrade("/trickle-header", host="split.test")
        text, binary, close = ws.read_frame(), ws.read_frame(), ws.read_frame()
        assert (text.opcode, text.payload) == (OP_TEXT, TRICKLE_TEXT)
        assert (binary.opcode, binary.payload) == (OP_BINARY, TRICKLE_BINARY)
        assert (close.opcode, close.close_code, close.payload[2:]) == (OP_CLOSE, 4002, b"split")
        ws.send(client_frame(OP_CLOSE, close.payload))
        assert ws.read_to_end(5) == b""
    s = wait_metrics(
        env.charon,
        lambda s: value(s, "charon_websocket_closes_total", host="split.test", code="4xxx") == 1,
        "the tunnel's close with 4002 counted",
    )
    assert value(s, "charon_websocket_messages_total", host="split.test", direction="out") == 2
    assert value(s, "charon_websocket_bytes_total", host="split.test", direction="out") == 70300


def test_client_headers_split_byte_by_byte(env: Env) -> None:
    """Masked client frames whose headers (8 and 14 bytes) come one byte per read, and a Close
    sent whole one byte at a time: all reach the backend unchanged, the code is seen."""
    with RawWs(env.port, timeout=10) as ws:
        ws.upgrade("/record", host="splitin.test")
        for payload in (b"a" * 300, os.urandom(70000)):
            frame = client_frame(OP_BINARY, payload)
            head = 8 if len(payload) < 65536 else 14
            send_bytewise(ws, frame[:head])
            ws.send(frame[head:])
            echo = ws.read_frame()
            assert (echo.opcode, echo.payload) == (OP_BINARY, payload)
        received = backend_report(ws)
        assert [(op, len(p)) for op, p in received] == [(2, 300), (2, 70000), (1, 6)]
        send_bytewise(ws, client_frame(OP_CLOSE, struct.pack("!H", 4003) + b"bytewise"))
        echo = ws.read_frame()
        assert (echo.opcode, echo.close_code) == (OP_CLOSE, 4003)
        assert ws.read_to_end(5) == b""
    s = wait_metrics(
        env.charon,
        lambda s: value(s, "charon_websocket_closes_total", host="splitin.test", code="4xxx") == 1,
        "the tunnel's close with 4003 counted",
    )
    assert value(s, "charon_websocket_messages_total", host="splitin.test", direction="in") == 3
    assert value(s, "charon_websocket_bytes_total", host="splitin.test", direction="in") == 70306


def test_101_and_frames_in_one_read(env: Env) -> None:
    """The backend's 101, two frames and its Close come in one write: the client gets the 101
    first, then the frames, then the Close, each once."""
    with RawWs(env.port) as ws:
        ws.send(ws_request("/burst", "burst.test"))
        head = ws.read_head()
        assert head.status == 101, head.raw
        frames = [ws.read_frame() for _ in range(3)]
        pairs = [(f.opcode, f.payload) for f in frames[:2]]
        assert pairs == [(OP_TEXT, b"one"), (OP_BINARY, b"two")]
        assert (frames[2].opcode, frames[2].close_code) == (OP_CLOSE, 4004)
        ws.send(client_frame(OP_CLOSE, frames[2].payload))
        assert ws.read_to_end(5) == b""


def test_pong_split_byte_by_byte_is_consumed(env: Env) -> None:
    """The Pong answering the proxy's Ping, sent one byte at a time: still recognised and
    taken out (the backend sees none), and the tunnel stays open past the next Ping."""
    with RawWs(env.port, timeout=5) as ws:
        ws.upgrade("/record", host="ping.test")
        for _ in range(2):
            ping = ws.read_frame()
            assert ping.opcode == OP_PING
            send_bytewise(ws, client_frame(OP_PONG, ping.payload))
        ws.send(client_frame(OP_TEXT, b"still open"))
        frame = ws.read_frame()
        while frame.opcode == OP_PING:
            ws.send(client_frame(OP_PONG, frame.payload))
            frame = ws.read_frame()
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"still open")
        received = backend_report(ws)
        assert not [f for f in received if f[0] == OP_PONG], received


# -- flow control and flushing ---------------------------------------------------------------


def test_flood_to_a_client_that_does_not_read_is_bounded(env: Env) -> None:
    """The backend sends 1 MiB frames without end to a client that reads nothing: the worker
    must stop reading the backend (its memory stays flat), and the stream stays intact."""
    pid = worker_pid(env.charon)
    with RawWs(env.port, timeout=10) as ws:
        ws.upgrade("/flood", host="flood.test")
        time.sleep(0.5)  # the buffers on the way fill up
        before = rss_kib(pid)
        time.sleep(2.0)  # unbounded buffering would take gigabytes here
        grown = rss_kib(pid) - before
        assert grown < 8 * 1024, f"the worker grew by {grown} KiB for one stalled client"
        for _ in range(3):
            frame = ws.read_frame()
            assert (frame.opcode, frame.payload) == (OP_BINARY, FLOOD_PAYLOAD)


def test_flush_to_a_peer_that_never_reads_is_cut(env: Env) -> None:
    """A tunnel ends (here: a client frame over the limit) while bytes still wait for a client
    that reads nothing: the engine gives up after its flush limit and resets the connection,
    instead of keeping the socket and the bytes for ever."""
    pid = worker_pid(env.charon)
    fds_before = open_fds(pid)
    with RawWs(env.port, timeout=10) as ws:
        ws.upgrade("/flood", host="limit.test")
        time.sleep(1.0)  # the client's buffers are full: the proxy holds bytes for it
        ws.send(client_frame(OP_BINARY, b"x" * 2000))  # over 1024: the tunnel ends
        wait_until(lambda: tcp_state(ws.sock) == TCP_CLOSE, timeout=20,
                   what="the proxy resets the client it could not flush to")
        with pytest.raises(ConnectionResetError):
            while ws.sock.recv(1 << 20):
                pass
    wait_until(lambda: open_fds(pid) <= fds_before, timeout=10, what="the worker's fds freed")


def test_hand_over_after_a_pipelined_response(env: Env) -> None:
    """A 16 MiB response, then a WebSocket handshake pipelined behind it on the same
    connection, read slowly: the response ends whole, the 101 and the frames come after it.
    (uvloop may still hold the response's tail when the 101 comes: the hand-over waits.)"""
    with RawWs(env.port, timeout=10) as ws:
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        ws.send(f"GET /big HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode() + ws_request("/record"))
        head = ws.read_head()
        assert head.status == 200, head.raw
        expected = (FLOOD_PAYLOAD * 17)[:BIG_SIZE]
        body = bytearray()
        while len(body) < BIG_SIZE:
            body += ws.read_exact(min(65536, BIG_SIZE - len(body)))
            time.sleep(0.001)
        assert body == expected
        switching = ws.read_head()
        assert switching.status == 101, switching.raw
        ws.send(client_frame(OP_TEXT, b"after the body"))
        frame = ws.read_frame()
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"after the body")
        assert backend_report(ws) == [(OP_TEXT, "after the body"), (OP_TEXT, "report")]


class _Accepted(asyncio.Protocol):
    def __init__(self, transports: list[asyncio.Transport]) -> None:
        self.transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(transport)  # type: ignore[arg-type]


class _Events:
    def __init__(self) -> None:
        self.closes: list[dict[str, Any]] = []

    def websocket_open(self, info: object) -> None:
        pass

    def websocket_close(self, info: object, summary: dict[str, Any]) -> None:
        self.closes.append(summary)


def test_hand_over_waits_for_what_uvloop_holds() -> None:
    """In one process, on real uvloop transports: the client transport still holds bytes
    (its peer reads nothing yet) when the tunnel is handed over. The engine's first bytes (the
    101 head, then the backend's frames) must come after all of them, none lost."""
    from charon.config.model import WebSocketSettings
    from charon.worker.websocket.tunnel import TunnelEngine, TunnelInfo, open_tunnel

    pending = os.urandom(8 * MiB)
    head = b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    backend_frame = bytes((0x81, 5)) + b"hello"

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        accepted: list[asyncio.Transport] = []
        server = await loop.create_server(lambda: _Accepted(accepted), HOST, 0)
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection((HOST, port))
        backend = socket.create_connection((HOST, port))
        client.setblocking(False)
        while len(accepted) < 2:
            await asyncio.sleep(0.01)
        events = _Events()
        engine = TunnelEngine(loop)
        ctx = SimpleNamespace(loop=loop, engine=engine, tunnels=set(), telemetry=events,
                              listeners=None, closing_tunnels=False)
        client_side, backend_side = accepted
        client_side.write(pending)
        assert client_side.get_write_buffer_size() > 0, "the kernel took it all: no wait"
        info = TunnelInfo("test", HOST, "/", "")
        open_tunnel(ctx, client_side, backend_side, head, b"", backend_frame,  # type: ignore[arg-type]
                    SimpleNamespace(websocket=WebSocketSettings(),
                                    upstream=SimpleNamespace(tls=False)), info)
        assert not ctx.tunnels, "handed over while uvloop still held bytes for the client"
        got = bytearray()
        want = len(pending) + len(head) + len(backend_frame)
        deadline = loop.time() + 20
        while len(got) < want and loop.time() < deadline:
            got += await loop.sock_recv(client, 1 << 20)
        assert len(ctx.tunnels) == 1, "the tunnel did not start once the bytes were written"
        backend.close()  # the backend leaves: the client gets a Close 1011
        while loop.time() < deadline and not events.closes:
            await asyncio.sleep(0.01)
        client.close()
        engine.close()
        server.close()
        assert events.closes and events.closes[0]["closed_by"] == "backend"
        return bytes(got)

    got = uvloop.run(asyncio.wait_for(scenario(), 30))
    assert got[: len(pending)] == pending
    assert got[len(pending) :] == head + backend_frame


def test_metrics_see_no_open_tunnel_at_the_end(env: Env) -> None:
    """Every tunnel of this module ended: none is counted open, and the worker is alive."""
    wait_until(lambda: value(scrape(env.charon), "charon_websocket_tunnels_open") == 0,
               timeout=10, what="no tunnel open")
    assert env.charon.proc is not None and env.charon.proc.poll() is None
