"""The WebSocket tunnel through Charon: echo, sizes, close codes, failures, limits, timeouts, pings
and many tunnels at once (protocol notes, decisions 2 and 12, and the WebSocket facts)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import time
from collections.abc import Iterator

import aiohttp
import pytest
from harness import HOST, Backend, running_charon
from test_websocket_handshake import (
    Env,
    Frame,
    RawWs,
    client_frame,
    last_close,
    run,
    ws_connect,
    ws_env,
    ws_request,
)
from websockets.exceptions import ConnectionClosed

MiB = 1024 * 1024
HALF_FRAME = bytes((0x81, 100)) + b"x" * 50  # what ws_raw_backend's /half-frame-then-die sends

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    def hosts(ws: Backend, raw: Backend) -> str:
        return f"""
            [[hosts]]
            domains = ["{HOST}"]
            upstream = "{ws.url}"

            [[hosts]]
            domains = ["big.test"]
            upstream = "{ws.url}"
            websocket_max_frame_size = "17MiB"

            [[hosts]]
            domains = ["small.test"]
            upstream = "{ws.url}"
            websocket_max_frame_size = 1024

            [[hosts]]
            domains = ["idle.test"]
            upstream = "{ws.url}"
            websocket_idle_timeout = "1s"

            [[hosts]]
            domains = ["ping.test"]
            upstream = "{ws.url}"
            websocket_ping_interval = "1s"

            [[hosts]]
            domains = ["raw.test"]
            upstream = "{raw.url}"

            [[hosts]]
            domains = ["rawping.test"]
            upstream = "{raw.url}"
            websocket_ping_interval = "1s"
            """

    with ws_env(tmp_path_factory.mktemp("ws-tunnel"), hosts) as env:
        yield env


def conn_id(tag: str) -> str:
    return f"{tag}-{os.getpid()}-{time.monotonic_ns()}"


def expect_close(ws: RawWs, code: int, timeout: float = 5.0) -> bytes:
    """The next frames end with a Close `code` (data frames before it are skipped), then EOF.

    Returns the Close frame's reason."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no Close within {timeout}s"
        ws.sock.settimeout(left)
        frame = ws.read_frame()
        if frame.opcode == OP_CLOSE:
            break
    assert not frame.masked, "frames toward the client must not be masked"
    assert frame.close_code == code, f"Close {frame.close_code} {frame.payload[2:]!r}"
    assert ws.read_to_end(timeout) == b"", "bytes after the Close"
    return frame.payload[2:]


# -- echo ------------------------------------------------------------------------------------


def test_text_and_binary_echo_websockets(env: Env) -> None:
    async def scenario() -> None:
        async with ws_connect(env.port, "/echo") as ws:
            for message in ("hello", "héllo wörld ✓", "", b"\x00\x01\xff", b"", os.urandom(70000)):
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 5) == message

    run(scenario())


def test_text_and_binary_echo_aiohttp(env: Env) -> None:
    async def scenario() -> None:
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.ws_connect(
            f"ws://{HOST}:{env.port}/echo", max_msg_size=4 * MiB
        ) as ws:
            await ws.send_str("text from aiohttp")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "text from aiohttp")
            data = os.urandom(MiB)
            await ws.send_bytes(data)
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.BINARY, data)

    run(scenario())


@pytest.mark.parametrize(
    ("host", "size", "compression"),
    [
        (HOST, MiB, None),
        (HOST, MiB, "deflate"),
        (HOST, 16 * MiB, None),  # the default limit (16 MiB) is the payload of one frame
        ("big.test", 16 * MiB, "deflate"),  # random data grows a little when deflated
    ],
)
def test_large_messages(env: Env, host: str, size: int, compression: str | None) -> None:
    data = os.urandom(size)

    async def scenario() -> None:
        async with ws_connect(env.port, "/echo", host=host, max_size=None,
                              compression=compression) as ws:
            await ws.send(data)
            assert await asyncio.wait_for(ws.recv(), 30) == data

    run(scenario(), timeout=60)


def test_fragmented_message_reassembled_by_backend(env: Env) -> None:
    """Three masked fragments go through as they are; the backend echoes one whole message."""
    with RawWs(env.port) as ws:
        ws.upgrade("/echo")
        ws.send(client_frame(OP_TEXT, b"frag-", fin=False))
        ws.send(client_frame(0x0, b"ment-", fin=False))
        ws.send(client_frame(OP_PING, b"between fragments"))
        ws.send(client_frame(0x0, b"ed"))
        frames = [ws.read_frame(), ws.read_frame()]
        pong = next(f for f in frames if f.opcode == OP_PONG)
        assert pong.payload == b"between fragments"
        text = next(f for f in frames if f.opcode != OP_PONG)
        assert (text.fin, text.opcode, text.payload) == (True, OP_TEXT, b"frag-ment-ed")


def test_first_frame_pipelined_behind_handshake(env: Env) -> None:
    """Handshake and a first frame in one send: the frame waits for the 101, then is tunnelled."""
    with RawWs(env.port) as ws:
        ws.send(ws_request("/echo") + client_frame(OP_TEXT, b"right behind the handshake"))
        head = ws.read_head()
        assert head.status == 101, head.raw
        frame = ws.read_frame()
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"right behind the handshake")


def test_backend_bytes_right_after_101_reach_client(env: Env) -> None:
    async def scenario() -> None:
        async with ws_connect(env.port, "/push-after-101", host="raw.test") as ws:
            assert await asyncio.wait_for(ws.recv(), 5) == "pushed by the backend"
            await ws.send("then echo")
            assert await asyncio.wait_for(ws.recv(), 5) == "then echo"

    run(scenario())


def test_backend_bytes_right_after_101_raw(env: Env) -> None:
    with RawWs(env.port) as ws:
        ws.upgrade("/push-after-101", host="raw.test")
        frame = ws.read_frame()
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"pushed by the backend")


# -- closing ---------------------------------------------------------------------------------


def test_client_close_code_reaches_backend(env: Env) -> None:
    cid = conn_id("client-close")

    async def scenario() -> None:
        async with ws_connect(env.port, f"/echo?id={cid}") as ws:
            await ws.send("before closing")
            await asyncio.wait_for(ws.recv(), 5)
            await ws.close(4000, "client says bye")
            # The backend answered with a Close of its own (aiohttp answers 1000), not a cut.
            assert ws.close_code not in (None, 1006)

    run(scenario())
    seen = last_close(env.ws, cid)
    assert (seen["code"], seen["reason"]) == (4000, "client says bye")


def test_backend_close_code_reaches_client(env: Env) -> None:
    async def scenario() -> None:
        async with ws_connect(env.port, "/close/4001") as ws:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye 4001")

    run(scenario())


def test_backend_close_code_raw(env: Env) -> None:
    with RawWs(env.port) as ws:
        ws.upgrade("/close/4001")
        frame = ws.read_frame()
        assert (frame.opcode, frame.close_code, frame.payload[2:]) == (OP_CLOSE, 4001, b"bye 4001")
        ws.send(client_frame(OP_CLOSE, frame.payload))
        assert ws.read_to_end(5) == b""


def test_backend_killed_mid_stream_client_gets_1011(env: Env) -> None:
    async def scenario() -> None:
        async with ws_connect(env.port, "/die") as ws:
            await ws.send("first")
            assert await asyncio.wait_for(ws.recv(), 5) == "first"
            await ws.send("second")  # the backend resets the connection on this one
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None, "no Close frame from the proxy"
            assert info.value.rcvd.code == 1011

    run(scenario())


def test_backend_killed_mid_stream_raw(env: Env) -> None:
    with RawWs(env.port) as ws:
        ws.upgrade("/die")
        ws.send(client_frame(OP_TEXT, b"first"))
        assert ws.read_frame().payload == b"first"
        ws.send(client_frame(OP_TEXT, b"second"))
        expect_close(ws, 1011)


def test_backend_dies_mid_frame_connection_just_ends(env: Env) -> None:
    """A backend that dies inside a frame: the client gets that frame's start and then the end
    of the connection; no Close may be spliced into the middle of a frame."""
    with RawWs(env.port) as ws:
        ws.upgrade("/half-frame-then-die", host="raw.test")
        assert ws.read_to_end(5) == HALF_FRAME


def test_client_vanishes_backend_sees_1001(env: Env) -> None:
    cid = conn_id("vanish")
    with RawWs(env.port) as ws:
        ws.upgrade(f"/echo?id={cid}")
        ws.send(client_frame(OP_TEXT, b"then I vanish"))
        assert ws.read_frame().payload == b"then I vanish"
    seen = last_close(env.ws, cid)
    assert seen["code"] == 1001


def test_client_vanishes_websockets_transport_abort(env: Env) -> None:
    cid = conn_id("abort")

    async def scenario() -> None:
        async with ws_connect(env.port, f"/echo?id={cid}") as ws:
            await ws.send("hello")
            await asyncio.wait_for(ws.recv(), 5)
            ws.transport.abort()

    run(scenario())
    assert last_close(env.ws, cid)["code"] == 1001


# -- rules the proxy enforces ----------------------------------------------------------------


def test_unmasked_client_frame_closed_1002(env: Env) -> None:
    cid = conn_id("unmasked")
    with RawWs(env.port) as ws:
        ws.upgrade(f"/echo?id={cid}")
        ws.send(client_frame(OP_TEXT, b"masked is fine"))
        assert ws.read_frame().payload == b"masked is fine"
        ws.send(client_frame(OP_TEXT, b"not masked", masked=False))
        expect_close(ws, 1002)
    assert last_close(env.ws, cid)["code"] == 1002, "the backend should hear 1002 as well"


def test_64bit_length_with_top_bit_closed_1002(env: Env) -> None:
    """A 64-bit payload length must have its top bit clear (RFC 6455 5.2): a protocol error
    (1002), whatever the frame size limit says."""
    with RawWs(env.port) as ws:
        ws.upgrade("/echo")
        ws.send(bytes((0x82, 0xFF)) + struct.pack("!Q", (1 << 63) | 5) + b"\0\0\0\0" + b"12345")
        expect_close(ws, 1002)


def test_frame_at_the_limit_passes(env: Env) -> None:
    with RawWs(env.port) as ws:
        ws.upgrade("/echo", host="small.test")
        payload = os.urandom(1024)
        ws.send(client_frame(OP_BINARY, payload))
        assert ws.read_frame().payload == payload


def test_frame_over_the_limit_closed_1009(env: Env) -> None:
    cid = conn_id("too-big")
    with RawWs(env.port) as ws:
        ws.upgrade(f"/echo?id={cid}", host="small.test")
        ws.send(client_frame(OP_BINARY, b"x" * 1025))
        expect_close(ws, 1009)
    assert last_close(env.ws, cid)["code"] == 1009


def test_frame_over_the_limit_websockets_client(env: Env) -> None:
    async def scenario() -> None:
        async with ws_connect(env.port, "/echo", host="small.test", compression=None) as ws:
            await ws.send("x" * 100)
            assert await asyncio.wait_for(ws.recv(), 5) == "x" * 100
            await ws.send("y" * 5000)
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009

    run(scenario())


def test_backpressure_bounds_what_the_proxy_buffers(env: Env) -> None:
    """A client that sends without reading: the echo backs up to the backend, the backend stops
    reading, and the proxy must stop reading from the client in turn (flow control both ways),
    so the client's sends block after some MiB instead of the proxy buffering without bound."""
    chunk = MiB
    frame = bytes((0x82, 0xFF)) + struct.pack("!Q", chunk) + b"\0\0\0\0" + os.urandom(chunk)
    sent = 0
    with RawWs(env.port) as ws:
        ws.upgrade("/echo")
        ws.sock.settimeout(2.0)
        try:
            while sent < 256 * MiB:
                ws.sock.sendall(frame)
                sent += chunk
        except TimeoutError:
            pass
    assert sent < 128 * MiB, f"the proxy took {sent // MiB} MiB from a client that never reads"


# -- timeouts and pings ----------------------------------------------------------------------


def test_idle_tunnel_closed_1001(env: Env) -> None:
    async def scenario() -> float:
        async with ws_connect(env.port, "/silent", host="idle.test", ping_interval=None) as ws:
            start = time.monotonic()
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            return time.monotonic() - start

    elapsed = run(scenario())
    assert 0.8 <= elapsed <= 2.2, f"closed after {elapsed:.2f}s with a 1s idle timeout"


def test_busy_tunnel_not_closed_by_idle_timeout(env: Env) -> None:
    async def scenario() -> None:
        async with ws_connect(env.port, "/echo", host="idle.test", ping_interval=None) as ws:
            for i in range(8):  # 2.8 s of traffic on a 1 s idle timeout
                await ws.send(f"keep {i}")
                assert await asyncio.wait_for(ws.recv(), 5) == f"keep {i}"
                await asyncio.sleep(0.35)

    run(scenario())


def test_tunnel_not_cut_by_http_keepalive_timeout(tmp_path, backend_factory) -> None:  # type: ignore[no-untyped-def]
    ws_backend = backend_factory("ws_backend.py")
    hosts = f"""
        [[hosts]]
        domains = ["{HOST}"]
        upstream = "{ws_backend.url}"
        """
    with running_charon(tmp_path, hosts, extra_toml='[timeouts]\nidle = "1s"\n') as charon:
        # The 1 s keep-alive idle timeout is in force for HTTP...
        with RawWs(charon.port) as http:
            http.send(f"GET /plain HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            head, body = http.read_response()
            assert (head.status, body) == (200, b"plain")
            start = time.monotonic()
            assert http.read_to_end(5) == b""
            assert time.monotonic() - start < 2.5

        # ...and does not touch a quiet tunnel.
        async def scenario() -> None:
            async with ws_connect(charon.port, "/echo", ping_interval=None) as ws:
                await ws.send("before")
                assert await asyncio.wait_for(ws.recv(), 5) == "before"
                await asyncio.sleep(3)
                await ws.send("after 3 quiet seconds")
                assert await asyncio.wait_for(ws.recv(), 5) == "after 3 quiet seconds"

        run(scenario())


def answer_pings(ws: RawWs, seconds: float) -> int:
    """Read for `seconds`, answering every Ping with its Pong; the number of Pings."""
    pings = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ws.sock.settimeout(left)
        try:
            frame = ws.read_frame()
        except TimeoutError:
            break
        assert frame.opcode == OP_PING, f"unexpected frame {frame}"
        assert not frame.masked
        pings += 1
        ws.send(client_frame(OP_PONG, frame.payload))
    return pings


def test_ping_answered_keeps_tunnel_open(env: Env) -> None:
    with RawWs(env.port) as ws:
        ws.upgrade("/echo", host="ping.test")
        pings = answer_pings(ws, 3.5)
        assert pings >= 2, f"{pings} pings from the proxy in 3.5 s at a 1 s interval"
        ws.sock.settimeout(5)
        ws.send(client_frame(OP_TEXT, b"still here"))
        frame = ws.read_frame()
        while frame.opcode == OP_PING:
            ws.send(client_frame(OP_PONG, frame.payload))
            frame = ws.read_frame()
        assert (frame.opcode, frame.payload) == (OP_TEXT, b"still here")


def read_skipping_pings(ws: RawWs) -> Frame:
    """The next frame that is not a proxy Ping (those are answered)."""
    while True:
        frame = ws.read_frame()
        if frame.opcode != OP_PING or frame.payload == b"backend":
            return frame
        ws.send(client_frame(OP_PONG, frame.payload))


def backend_report(ws: RawWs) -> list[tuple[int, str]]:
    """What /record on ws_raw_backend received, as (opcode, payload) pairs."""
    ws.send(client_frame(OP_TEXT, b"report"))
    frame = read_skipping_pings(ws)
    assert frame.opcode == OP_TEXT, frame
    return [(op, payload) for op, payload in json.loads(frame.payload)]


def test_pong_to_proxy_ping_not_forwarded(env: Env) -> None:
    """The Pong answering the proxy's Ping is consumed (decision 12): the backend sees none,
    while the client's own Ping still reaches it."""
    with RawWs(env.port) as ws:
        ws.upgrade("/record", host="rawping.test")
        assert answer_pings(ws, 2.4) >= 1
        ws.sock.settimeout(5)
        ws.send(client_frame(OP_PING, b"mine"))
        pong = read_skipping_pings(ws)
        assert (pong.opcode, pong.payload) == (OP_PONG, b"mine")
        received = backend_report(ws)
        assert not [f for f in received if f[0] == OP_PONG], f"the backend got a Pong: {received}"
        assert received[-2:] == [(OP_PING, "mine"), (OP_TEXT, "report")]


def test_pong_to_backend_ping_forwarded_while_proxy_ping_pending(env: Env) -> None:
    """Both the proxy and the backend pinged the client; the client answers the backend first.
    Only the Pong whose payload answers the proxy's Ping may be consumed; the backend's Pong
    must reach the backend (a backend that pings, like `websockets` and aiohttp heartbeats do,
    closes a connection whose Pong never comes)."""
    with RawWs(env.port) as ws:
        ws.upgrade("/record", host="rawping.test")
        ws.sock.settimeout(5)
        proxy_ping = ws.read_frame()  # not answered yet
        assert proxy_ping.opcode == OP_PING
        ws.send(client_frame(OP_TEXT, b"ping me"))
        backend_ping = read_skipping_pings(ws)
        assert (backend_ping.opcode, backend_ping.payload) == (OP_PING, b"backend")
        ws.send(client_frame(OP_PONG, b"backend") + client_frame(OP_PONG, proxy_ping.payload))
        received = backend_report(ws)
    pongs = [payload for op, payload in received if op == OP_PONG]
    assert pongs == ["backend"], f"Pongs the backend received: {pongs}"


def test_ping_waits_for_a_frame_boundary(env: Env) -> None:
    """The backend trickles one frame out over 2 s on a host that pings every second: the
    proxy's Ping must wait until that frame has ended, never split it."""
    slow_payload = (b"0123456789abcdef" * 6250)[:100000]  # ws_raw_backend's SLOW_PAYLOAD
    with RawWs(env.port) as ws:
        ws.upgrade("/slow-frame", host="rawping.test")
        ws.sock.settimeout(5)
        frames = []
        while not frames or frames[-1].payload != b"done":
            frame = ws.read_frame()
            if frame.opcode == OP_PING:
                ws.send(client_frame(OP_PONG, frame.payload))
            frames.append(frame)
        data = [f for f in frames if f.opcode != OP_PING]
        assert [(f.opcode, len(f.payload)) for f in data] == [(OP_BINARY, 100000), (OP_TEXT, 4)]
        assert data[0].payload == slow_payload
        kinds = [f.opcode for f in frames]
        assert OP_PING in kinds[kinds.index(OP_BINARY):], "no Ping once the long frame ended"


def test_pings_only_at_frame_boundaries_under_load(env: Env) -> None:
    """Large messages both ways on a host that pings every second: the proxy's Pings must go
    between frames, and the client's Pongs must be taken out without breaking the stream."""
    data = os.urandom(4 * MiB)

    async def scenario() -> int:
        rounds = 0
        async with ws_connect(env.port, "/echo", host="ping.test", max_size=None,
                              compression=None, ping_interval=None) as ws:
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                await ws.send(data)
                assert await asyncio.wait_for(ws.recv(), 10) == data
                rounds += 1
        return rounds

    assert run(scenario(), timeout=30) >= 2


def test_ping_unanswered_closed_1011(env: Env) -> None:
    cid = conn_id("no-pong")
    with RawWs(env.port) as ws:
        ws.upgrade(f"/echo?id={cid}", host="ping.test")
        start = time.monotonic()
        ws.sock.settimeout(5)
        frame = ws.read_frame()
        assert frame.opcode == OP_PING
        expect_close(ws, 1011)
        elapsed = time.monotonic() - start
        assert elapsed <= 3.2, f"closed {elapsed:.2f}s after the tunnel opened"
    assert last_close(env.ws, cid)["code"] == 1011


# -- load ------------------------------------------------------------------------------------


def test_many_concurrent_tunnels(env: Env) -> None:
    tunnels, messages = 200, 20

    async def one(i: int) -> int:
        async with ws_connect(env.port, "/echo", open_timeout=20, ping_interval=None) as ws:
            for j in range(messages):
                text = f"tunnel {i} message {j}"
                await ws.send(text)
                assert await asyncio.wait_for(ws.recv(), 20) == text
        return i

    async def scenario() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(tunnels)))

    assert sorted(run(scenario(), timeout=90)) == list(range(tunnels))


def test_charon_stopping_closes_tunnels_1001(tmp_path, backend_factory) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM: each tunnel gets a Close 1001 both ways at a frame boundary (decision 2)."""
    ws_backend = backend_factory("ws_backend.py")
    hosts = f"""
        [[hosts]]
        domains = ["{HOST}"]
        upstream = "{ws_backend.url}"
        """
    cid = conn_id("shutdown")
    with running_charon(tmp_path, hosts) as charon:

        async def scenario() -> None:
            async with ws_connect(charon.port, f"/echo?id={cid}", ping_interval=None) as ws:
                await ws.send("before the stop")
                assert await asyncio.wait_for(ws.recv(), 5) == "before the stop"
                assert charon.proc is not None
                charon.proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1001

        run(scenario())
    assert last_close(ws_backend, cid)["code"] == 1001
