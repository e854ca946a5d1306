"""The WebSocket opening handshake through Charon (protocol notes, decision 2).

Real clients (`websockets`, aiohttp) where they show what users get, raw sockets where a client
library would hide the proxy's behaviour. The raw-socket helpers here are shared with
test_websocket_tunnel.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import HOST, Backend, Charon, free_port, running_charon
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

# -- raw-socket WebSocket client (shared with test_websocket_tunnel.py) ----------------------


def ws_request(
    path: str,
    host: str = HOST,
    key: bytes | None = KEY,
    version: bytes | None = b"13",
    method: bytes = b"GET",
    http: bytes = b"HTTP/1.1",
    extra: bytes = b"",
) -> bytes:
    """A client handshake's bytes; `key` / `version` None leave that header out."""
    out = [method, b" ", path.encode(), b" ", http, b"\r\nHost: ", host.encode(),
           b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"]
    if key is not None:
        out += [b"Sec-WebSocket-Key: ", key, b"\r\n"]
    if version is not None:
        out += [b"Sec-WebSocket-Version: ", version, b"\r\n"]
    out += [extra, b"\r\n"]
    return b"".join(out)


def client_frame(opcode: int, payload: bytes, fin: bool = True, masked: bool = True,
                 rsv1: bool = False) -> bytes:
    """A client frame (masked unless told otherwise)."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mask_bit | n))
    elif n < 65536:
        head = bytes((b0, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, mask_bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


@dataclass
class Head:
    status: int
    headers: list[tuple[str, str]]
    raw: bytes

    def get(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return values[0] if values else None


@dataclass
class Frame:
    fin: bool
    rsv1: bool
    opcode: int
    payload: bytes
    masked: bool

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


class RawWs:
    """One raw client connection: exact bytes out, frames and HTTP heads parsed on the way in."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def __enter__(self) -> RawWs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise EOFError("connection closed by the proxy")
        self.buf += chunk

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_head(self) -> Head:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n\r\n") + 4
        raw = bytes(self.buf[:end])
        del self.buf[:end]
        lines = raw[:-4].decode("latin-1").split("\r\n")
        headers = [(n.strip(), v.strip()) for n, _, v in (x.partition(":") for x in lines[1:])]
        return Head(int(lines[0].split(" ")[1]), headers, raw)

    def read_response(self) -> tuple[Head, bytes]:
        """An HTTP response with a Content-Length body (what Charon and the backends send)."""
        head = self.read_head()
        return head, self.read_exact(int(head.get("Content-Length") or 0))

    def read_frame(self) -> Frame:
        b0, b1 = self.read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self.read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self.read_exact(8))[0]
        mask = self.read_exact(4) if b1 & 0x80 else b""
        payload = self.read_exact(n)
        if mask:
            payload = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        return Frame(bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F, payload, bool(mask))

    def read_to_end(self, timeout: float = 5.0) -> bytes:
        """Everything until the peer closes; fails if it does not close within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self._fill()
        except (EOFError, ConnectionResetError):
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def upgrade(self, path: str, host: str = HOST, extra: bytes = b"") -> Head:
        self.send(ws_request(path, host, extra=extra))
        head = self.read_head()
        assert head.status == 101, head.raw
        return head


def run(coro: Coroutine[Any, Any, Any], timeout: float = 20.0) -> Any:
    """Run one client scenario with an overall deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def ws_connect(port: int, path: str, host: str = HOST, **kwargs: Any) -> connect:
    """A `websockets` client connection to Charon for the proxy host `host`."""
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("close_timeout", 2)
    kwargs.setdefault("proxy", None)
    if host == HOST:
        return connect(f"ws://{HOST}:{port}{path}", **kwargs)
    return connect(f"ws://{host}{path}", host=HOST, port=port, **kwargs)


def http_get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def last_close(backend: Backend, conn_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """How the backend saw the connection opened with ?id=conn_id end (polls until it did)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get_json(f"{backend.url}/last-close?id={conn_id}")  # type: ignore[no-any-return]
        except urllib.error.HTTPError as exc:
            if exc.code != 404 or time.monotonic() > deadline:
                raise AssertionError(f"the backend saw no end of connection {conn_id}") from exc
        time.sleep(0.05)


# -- fixtures --------------------------------------------------------------------------------


@dataclass
class Env:
    charon: Charon
    port: int
    ws: Backend
    raw: Backend


@contextmanager
def ws_env(tmp: Path, hosts: Callable[[Backend, Backend], str]) -> Iterator[Env]:
    """Charon in front of ws_backend.py and ws_raw_backend.py; `hosts(ws, raw)` gives its
    [[hosts]] tables. Every process is stopped at the end."""
    started: list[Backend] = []
    try:
        ws = Backend("ws_backend.py")
        started.append(ws)
        raw = Backend("ws_raw_backend.py")
        started.append(raw)
        with running_charon(tmp, hosts(ws, raw)) as charon:
            yield Env(charon, charon.port, ws, raw)
    finally:
        for backend in started:
            backend.stop()


def handshake_hosts(ws: Backend, raw: Backend) -> str:
    """The proxy hosts of the handshake tests (and test_front_door.py's)."""
    return f"""
        [[hosts]]
        domains = ["{HOST}"]
        upstream = "{ws.url}"

        [[hosts]]
        domains = ["raw.test"]
        upstream = "{raw.url}"
        timeouts = {{ first_byte = "1s" }}

        [[hosts]]
        domains = ["dead.test"]
        upstream = "http://{HOST}:{free_port()}"
        """


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with ws_env(tmp_path_factory.mktemp("ws-handshake"), handshake_hosts) as env:
        yield env


def seen_upgrades(env: Env, path: str) -> list[dict[str, Any]]:
    """Requests for `path` that reached the WebSocket backend."""
    return [r for r in http_get_json(f"{env.ws.url}/seen") if r["path"] == path]


# -- valid handshakes ------------------------------------------------------------------------


def test_valid_handshake_raw(env: Env) -> None:
    """The RFC's sample handshake: 101 with the accept value computed from the client's key."""
    with RawWs(env.port) as ws:
        head = ws.upgrade("/echo")
        assert head.raw.startswith(b"HTTP/1.1 101 ")
        assert head.get("Sec-WebSocket-Accept") == ACCEPT.decode()
        assert (head.get("Upgrade") or "").lower() == "websocket"
        assert "upgrade" in (head.get("Connection") or "").lower()
        ws.send(client_frame(0x1, b"hello"))
        frame = ws.read_frame()
        assert (frame.opcode, frame.payload, frame.masked) == (0x1, b"hello", False)


def test_valid_handshake_websockets_client(env: Env) -> None:
    async def scenario() -> None:
        async with ws_connect(env.port, "/echo") as ws:
            await ws.send("hello websockets")
            assert await asyncio.wait_for(ws.recv(), 5) == "hello websockets"

    run(scenario())


def test_valid_handshake_aiohttp_client(env: Env) -> None:
    async def scenario() -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.ws_connect(
            f"ws://{HOST}:{env.port}/echo", autoping=True
        ) as ws:
            await ws.send_str("hello aiohttp")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "hello aiohttp")

    run(scenario())


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (["v3.chat", "v1.chat", "v2.chat"], "v1.chat"),
        (["v2.chat", "v1.chat"], "v2.chat"),
        (["v1.chat", "v2.chat"], "v1.chat"),
        (["v9.chat"], None),
    ],
)
def test_subprotocol_negotiated_end_to_end(env: Env, offered: list[str], chosen: str) -> None:
    """The backend picks among the client's offers; the proxy neither picks nor drops one."""

    async def scenario() -> None:
        async with ws_connect(env.port, "/headers", subprotocols=offered) as ws:
            assert ws.subprotocol == chosen
            received = dict(json.loads(await asyncio.wait_for(ws.recv(), 5)))
            assert [p.strip() for p in received["Sec-WebSocket-Protocol"].split(",")] == offered

    run(scenario())


def test_permessage_deflate_negotiated_end_to_end_websockets(env: Env) -> None:
    async def scenario() -> None:
        async with ws_connect(env.port, "/echo") as ws:  # websockets offers deflate by default
            assert ws.response is not None
            ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert "permessage-deflate" in ext
            text = "compress me " * 20000
            for _ in range(3):
                await ws.send(text)
                assert await asyncio.wait_for(ws.recv(), 5) == text
            await ws.send(os.urandom(100000))
            assert len(await asyncio.wait_for(ws.recv(), 5)) == 100000

    run(scenario())


def test_permessage_deflate_frames_pass_compressed(env: Env) -> None:
    """Compressed frames (RSV1) go through untouched both ways: the proxy does not inflate."""
    text = b"the same words again and again " * 200
    with RawWs(env.port) as ws:
        head = ws.upgrade("/echo", extra=b"Sec-WebSocket-Extensions: permessage-deflate\r\n")
        assert "permessage-deflate" in (head.get("Sec-WebSocket-Extensions") or "")
        deflater = zlib.compressobj(wbits=-15)
        compressed = deflater.compress(text) + deflater.flush(zlib.Z_SYNC_FLUSH)
        assert compressed.endswith(b"\x00\x00\xff\xff")
        ws.send(client_frame(0x1, compressed[:-4], rsv1=True))
        frame = ws.read_frame()
        assert frame.opcode == 0x1 and frame.rsv1, "the echo should come back compressed"
        assert len(frame.payload) < len(text) // 4
        inflater = zlib.decompressobj(wbits=-15)
        assert inflater.decompress(frame.payload + b"\x00\x00\xff\xff") == text


@pytest.mark.parametrize(
    "head",
    [
        # Firefox: Connection names keep-alive too
        b"Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n",
        # Chrome-like, with caching headers and an Origin
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nPragma: no-cache\r\n"
        b"Cache-Control: no-cache\r\nOrigin: http://app.test\r\n",
        # tokens and names in other cases, Connection split over two fields
        b"connection: keep-alive\r\nCONNECTION: UPGRADE\r\nupgrade: WebSocket\r\n",
    ],
    ids=["firefox", "chrome", "mixed-case-split-connection"],
)
def test_browser_style_handshakes(env: Env, head: bytes) -> None:
    request = (
        b"GET /echo HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n" + head
        + b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with RawWs(env.port) as ws:
        ws.send(request)
        response = ws.read_head()
        assert response.status == 101, response.raw
        assert response.get("Sec-WebSocket-Accept") == ACCEPT.decode()
        ws.send(client_frame(0x2, b"\x00binary\xff"))
        frame = ws.read_frame()
        assert (frame.opcode, frame.payload) == (0x2, b"\x00binary\xff")


# -- invalid client handshakes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("key-not-base64", {"key": b"!!not*base64!!in*this*key"}),
        ("key-15-bytes", {"key": base64.b64encode(b"x" * 15)}),
        ("key-17-bytes", {"key": base64.b64encode(b"x" * 17)}),
        ("key-empty", {"key": b""}),
        ("key-missing", {"key": None}),
        ("post", {"method": b"POST"}),
        ("http10", {"http": b"HTTP/1.0"}),
    ],
)
def test_invalid_handshake_400_never_upgraded(env: Env, name: str, kwargs: dict[str, Any]) -> None:
    path = f"/echo?probe={name}"
    with RawWs(env.port) as ws:
        ws.send(ws_request(path, **kwargs))
        head, _body = ws.read_response()
        assert head.status == 400, head.raw
        assert ws.read_to_end(5) == b"", "the connection should close after the 400"
    assert not [r for r in seen_upgrades(env, path) if r["upgrade"]], (
        "an invalid handshake reached the backend as an upgrade"
    )


def test_websocket_version_8_gets_426(env: Env) -> None:
    path = "/echo?probe=version8"
    with RawWs(env.port) as ws:
        ws.send(ws_request(path, version=b"8"))
        head, _body = ws.read_response()
        assert head.status == 426, head.raw
        assert head.get("Sec-WebSocket-Version") == "13"
    assert not [r for r in seen_upgrades(env, path) if r["upgrade"]]


def test_missing_version_is_refused(env: Env) -> None:
    path = "/echo?probe=no-version"
    with RawWs(env.port) as ws:
        ws.send(ws_request(path, version=None))
        head, _body = ws.read_response()
        assert head.status in (400, 426), head.raw
    assert not [r for r in seen_upgrades(env, path) if r["upgrade"]]


# -- the backend refuses the upgrade ---------------------------------------------------------


@pytest.mark.parametrize("status", [401, 302, 503])
def test_non_101_answer_relayed(env: Env, status: int) -> None:
    with RawWs(env.port) as ws:
        ws.send(ws_request(f"/reject/{status}"))
        head, body = ws.read_response()
        assert head.status == status, head.raw
        assert body == b"denied"
        if status == 302:
            assert head.get("Location") == "/elsewhere"


def test_non_101_answer_seen_by_websockets_client(env: Env) -> None:
    async def scenario() -> None:
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(env.port, "/reject/401"):
                pass
        assert info.value.response.status_code == 401
        assert info.value.response.body == b"denied"

    run(scenario())


def test_refused_upgrade_connection_stays_http(env: Env) -> None:
    """A handshake answered 401 and a request pipelined behind it in the same send: two HTTP
    responses in order; the bytes after the handshake are parsed as HTTP, never tunnelled."""
    with RawWs(env.port) as ws:
        ws.send(ws_request("/reject/401?pipelined=1")
                + f"GET /plain?pipelined=1 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        first, body1 = ws.read_response()
        assert (first.status, body1) == (401, b"denied"), first.raw
        second, body2 = ws.read_response()
        assert (second.status, body2) == (200, b"plain"), second.raw
    plain = seen_upgrades(env, "/plain?pipelined=1")
    assert len(plain) == 1 and plain[0]["method"] == "GET" and not plain[0]["upgrade"]


# -- the backend's 101 is not valid ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/bad-accept", "/no-upgrade"])
def test_invalid_101_gets_502(env: Env, path: str) -> None:
    with RawWs(env.port) as ws:
        ws.send(ws_request(path, host="raw.test"))
        head, _body = ws.read_response()
        assert head.status == 502, head.raw


def test_invalid_101_seen_by_websockets_client(env: Env) -> None:
    async def scenario() -> None:
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(env.port, "/bad-accept", host="raw.test"):
                pass
        assert info.value.response.status_code == 502

    run(scenario())


def test_backend_down_gets_502(env: Env) -> None:
    with RawWs(env.port) as ws:
        ws.send(ws_request("/echo", host="dead.test"))
        head, _body = ws.read_response()
        assert head.status == 502, head.raw


def test_backend_silent_after_handshake_gets_504(env: Env) -> None:
    start = time.monotonic()
    with RawWs(env.port) as ws:
        ws.send(ws_request("/hang", host="raw.test"))
        head, _body = ws.read_response()
        assert head.status == 504, head.raw
    assert time.monotonic() - start < 3, "a 1 s first-byte timeout"


# -- headers on the way to the backend -------------------------------------------------------


def test_handshake_headers_forwarded(env: Env) -> None:
    """X-Forwarded-For replaced (untrusted peer), hop-by-hop dropped, end-to-end ones kept."""
    extra = (
        b"Connection: X-Secret\r\n"
        b"X-Secret: drop me\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n"
        b"Origin: http://app.test\r\n"
        b"Sec-WebSocket-Protocol: v1.chat\r\n"
        b"Cookie: a=1\r\n"
    )
    with RawWs(env.port) as ws:
        head = ws.upgrade("/headers", extra=extra)
        assert head.get("Sec-WebSocket-Protocol") == "v1.chat"
        frame = ws.read_frame()
    received = json.loads(frame.payload)
    names = [n.lower() for n, _ in received]
    got = {n.lower(): v for n, v in received}
    assert got["x-forwarded-for"] == "127.0.0.1"
    assert names.count("x-forwarded-for") == 1
    for hop in ("x-secret", "keep-alive", "proxy-connection", "te"):
        assert hop not in names, f"{hop} reached the backend"
    assert names.count("upgrade") == 1 and got["upgrade"].lower() == "websocket"
    assert names.count("connection") == 1 and got["connection"].lower() == "upgrade"
    assert got["sec-websocket-key"] == KEY.decode()
    assert got["sec-websocket-version"] == "13"
    assert got["sec-websocket-protocol"] == "v1.chat"
    assert got["origin"] == "http://app.test"
    assert got["cookie"] == "a=1"
    assert got["host"] == HOST
    assert "charon" in got["via"]


def test_handshake_headers_from_real_client(env: Env) -> None:
    async def scenario() -> None:
        conn: ClientConnection
        async with ws_connect(env.port, "/headers",
                              additional_headers={"X-Forwarded-For": "10.9.9.9"}) as conn:
            received = json.loads(await asyncio.wait_for(conn.recv(), 5))
        got = {n.lower(): v for n, v in received}
        assert got["x-forwarded-for"] == "127.0.0.1"
        assert got["x-forwarded-proto"] == "http"
        assert got["x-forwarded-host"] == f"{HOST}:{env.port}"

    run(scenario())
