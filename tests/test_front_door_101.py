"""A backend's 101 is judged alike on the front door's dialled path and on the HTTP path
(issue #10, items 1 and 5): the dial hands the 101 to Python, which parses it with llhttp and
checks it with the HTTP path's `switching_response`. A 101 the HTTP path answers 502 (its
framing fields refused by llhttp, a subprotocol or an extension the client did not offer) gets
the same 502 both ways, and no tunnel.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_front_door import ACCEPT_LINE, OFFERS, VALID, answer_path, both_ways
from test_websocket_handshake import Env, handshake_hosts, ws_env, ws_request


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with ws_env(tmp_path_factory.mktemp("front-door-101"), handshake_hosts) as env:
        yield env


GOOD = VALID + ACCEPT_LINE


@pytest.mark.parametrize(
    "extra, status",
    [
        # framing fields llhttp refuses in any response (the HTTP path: 502)
        pytest.param(b"Content-Length: 0\r\nContent-Length: 0\r\n", 502, id="two-lengths"),
        pytest.param(b"Content-Length: 1\r\nContent-Length: 2\r\n", 502, id="lengths-differ"),
        pytest.param(b"Content-Length: x\r\n", 502, id="length-not-a-number"),
        pytest.param(b"Content-Length: \r\n", 502, id="length-empty"),
        pytest.param(b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", 502,
                     id="length-and-chunked"),
        # what the client offered: "chat, superchat" and permessage-deflate
        pytest.param(b"Sec-WebSocket-Protocol: mqtt\r\n", 502, id="protocol-not-offered"),
        pytest.param(b"Sec-WebSocket-Protocol: chat, superchat\r\n", 502, id="two-protocols"),
        pytest.param(b"Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Protocol: chat\r\n", 502,
                     id="protocol-twice"),
        pytest.param(b"Sec-WebSocket-Protocol: Chat\r\n", 502, id="protocol-other-case"),
        pytest.param(b"Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n", 502,
                     id="extension-not-offered"),
        pytest.param(b"Sec-WebSocket-Extensions: permessage-deflate, x-custom\r\n", 502,
                     id="one-extension-not-offered"),
        pytest.param(b"Sec-WebSocket-Protocol: superchat\r\n", 101, id="offered-protocol"),
        pytest.param(b"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover"
                     b"\r\n", 101, id="offered-extension"),
        pytest.param(b"Content-Length: 0\r\n", 101, id="one-length-zero"),
    ],
)
def test_101_judged_alike_both_ways(env: Env, extra: bytes, status: int) -> None:
    answer = GOOD + extra + b"\r\n"
    got, request_seen = both_ways(
        env, ws_request(answer_path(answer), host="raw.test", extra=OFFERS)
    )
    assert got.startswith(b"HTTP/1.1 %d " % status), got
    if status == 101:
        assert request_seen.startswith(b"GET /answer?"), request_seen


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 101 Switching Protocols\nUpgrade: websocket\nConnection: Upgrade"
                     b"\nSec-WebSocket-Accept: {accept}\n\n", id="bare-lf"),
        pytest.param(VALID + b"X-Lf: a\n" + ACCEPT_LINE + b"\r\n", id="one-bare-lf"),
    ],
)
def test_101_llhttp_refuses_is_502_both_ways(env: Env, answer: bytes) -> None:
    """A 101 whose head llhttp refuses (or ends elsewhere than the engine saw): 502 both ways."""
    got, _ = both_ways(env, ws_request(answer_path(answer), host="raw.test"))
    assert got.startswith(b"HTTP/1.1 502 "), got


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"Sec-WebSocket-Protocol: chat\r\n", id="protocol"),
        pytest.param(b"Sec-WebSocket-Extensions: permessage-deflate\r\n", id="extension"),
    ],
)
def test_nothing_offered_nothing_chosen(env: Env, extra: bytes) -> None:
    """A client that offers no subprotocol (or extension) gets 502 for a 101 that picks one."""
    got, _ = both_ways(env, ws_request(answer_path(GOOD + extra + b"\r\n"), host="raw.test"))
    assert got.startswith(b"HTTP/1.1 502 "), got
