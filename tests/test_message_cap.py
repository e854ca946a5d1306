"""`websocket_max_messages_per_second` (issue 14) through `charon run` with 2 workers and the
aiohttp WebSocket backend: a client sending ten times the cap gets Close 1008 and the backend
sees 1008 too; a client under the cap keeps its tunnel. Both kinds of tunnel: the front door's
dialled one (a plain host, the handshake in one read) and the HTTP path's (a host with basic
auth, whose handshakes the front door leaves to the HTTP path)."""

from __future__ import annotations

import base64
import os
import select
import time
from collections.abc import Iterator

import bcrypt
import pytest
from harness import Backend, Charon
from test_websocket_handshake import RawWs, client_frame, last_close, ws_request

pytestmark = pytest.mark.timeout(90)

CAP = 20
OP_TEXT, OP_CLOSE = 0x1, 0x8
AUTH = b"Authorization: Basic " + base64.b64encode(b"alice:pw") + b"\r\n"
HOSTS = {"dialled.test": b"", "httppath.test": AUTH}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Charon, Backend]]:
    tmp = tmp_path_factory.mktemp("msgcap")
    ws = Backend("ws_backend.py")
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    hosts = f"""
        [[hosts]]
        domains = ["dialled.test"]
        upstream = "{ws.url}"
        websocket_max_messages_per_second = {CAP}

        [[hosts]]
        domains = ["httppath.test"]
        upstream = "{ws.url}"
        websocket_max_messages_per_second = {CAP}
        basic_auth = {{ realm = "App", users = {{ alice = "{hashed}" }} }}
        """
    charon = Charon(tmp, hosts, workers=2)
    try:
        charon.start()
        yield charon, ws
    finally:
        charon.stop()
        ws.stop()


def open_tunnel(charon: Charon, host: str, conn_id: str) -> RawWs:
    ws = RawWs(charon.port)
    ws.send(ws_request(f"/echo?id={conn_id}", host=host, extra=HOSTS[host]))
    head = ws.read_head()
    assert head.status == 101, head.raw
    return ws


def conn_id(tag: str) -> str:
    return f"{tag}-{os.getpid()}-{time.monotonic_ns()}"


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_ten_times_the_cap_is_closed_1008(env: tuple[Charon, Backend], host: str) -> None:
    charon, backend = env
    tag = conn_id("over")
    ws = open_tunnel(charon, host, tag)
    with ws:
        close = None
        deadline = time.monotonic() + 5
        # 10 x CAP per second, in steps of 0.05 s, until the proxy's Close comes.
        while close is None and time.monotonic() < deadline:
            try:
                for _ in range(CAP // 2):
                    ws.send(client_frame(OP_TEXT, b"m"))
            except OSError:
                pass  # closed meanwhile: the Close is read below
            time.sleep(0.05)
            while select.select([ws.sock], [], [], 0)[0] or ws.buf:
                frame = ws.read_frame()
                if frame.opcode == OP_CLOSE:
                    close = frame
                    break
        assert close is not None, "no Close within 5 s"
        assert close.close_code == 1008, close.payload
        assert close.payload[2:] == b"message rate limit"
    seen = last_close(backend, tag)
    assert seen["code"] == 1008


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_under_the_cap_stays_open(env: tuple[Charon, Backend], host: str) -> None:
    charon, _ = env
    ws = open_tunnel(charon, host, conn_id("under"))
    with ws:
        ws.sock.settimeout(5)
        end = time.monotonic() + 3
        sent = 0
        while time.monotonic() < end:  # half the cap, for 3 s
            ws.send(client_frame(OP_TEXT, b"n%d" % sent))
            frame = ws.read_frame()
            assert frame.opcode == OP_TEXT and frame.payload == b"n%d" % sent
            sent += 1
            time.sleep(1 / (CAP / 2))
        ws.send(client_frame(OP_TEXT, b"still"))
        assert ws.read_frame().payload == b"still"
        assert sent >= 3 * CAP / 2 * 0.5
