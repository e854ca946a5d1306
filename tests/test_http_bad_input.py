"""Malformed and hostile requests (protocol notes, decisions 3 and 10), over raw sockets.

Each case checks the exact status line, that the error body is short plain text that does not
echo the input, that nothing reached the backend as a request, and (where decision 3 says so)
that the connection is closed after the answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import Backend, running_charon
from httpwire import Client, Response

H = b"Host: h.test\r\n"


@dataclass
class Setup:
    port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    backend = Backend("http_backend.py", "--name", "h")
    hosts = f"""
        [[hosts]]
        domains = ["h.test"]
        upstream = "{backend.url}"
        """
    try:
        with running_charon(tmp_path_factory.mktemp("bad"), hosts, workers=1) as charon:
            yield Setup(charon.port)
    finally:
        backend.stop()


STATUS_LINES = {
    400: b"HTTP/1.1 400 Bad Request",
    405: b"HTTP/1.1 405 Method Not Allowed",
    414: b"HTTP/1.1 414 Request-URI Too Long",
    431: b"HTTP/1.1 431 Request Header Fields Too Large",
    501: b"HTTP/1.1 501 Not Implemented",
    505: b"HTTP/1.1 505 HTTP Version Not Supported",
}


def exchange(port: int, data: bytes) -> tuple[Response, bool]:
    """Send `data`; the response and whether the proxy then closed the connection."""
    with Client(port, timeout=5) as client:
        client.send(data)
        resp = client.read_response()
        closed = client.closed_within(2)
    return resp, closed


def check_error(resp: Response, status: int) -> None:
    assert resp.head.split(b"\r\n", 1)[0] == STATUS_LINES[status], resp.head
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert resp.framing == "length"
    assert 0 < len(resp.body) < 200
    assert resp.body.startswith(b"%d " % status)
    assert b"backend" not in resp.body  # the backend (JSON echo) never saw it as a request


def many(n: int, size: int) -> bytes:
    return b"".join(b"X-Field-%d: %s\r\n" % (i, b"v" * size) for i in range(n))


BAD_REQUESTS = [
    # Request framing (decision 3): all 400 (or 501) and close.
    ("cl-and-te", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /echo/smuggled HTTP/1.1\r\n" + H + b"\r\n"),
    ("te-and-cl", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
     b"0\r\n\r\n"),
    ("te-gzip", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc"),
    ("te-chunked-gzip", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\nabc"),
    ("te-gzip-chunked", 501,
     b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
    ("te-two-lines", 501,
     b"POST /echo HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te-chunked-twice", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
    ("te-chunked-two-lines", 400,
     b"POST /echo HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("te-empty", 400, b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: \r\n\r\n"),
    ("te-chunked-with-param", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked;x=1\r\n\r\n0\r\n\r\n"),
    ("te-http10", 400,
     b"POST /echo HTTP/1.0\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nabc"),
    ("cl-duplicate-different", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    ("cl-list-different", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 3, 4\r\n\r\nabcd"),
    ("cl-letters", 400, b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n"),
    ("cl-negative", 400, b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n"),
    ("cl-plus", 400, b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc"),
    ("cl-hex", 400, b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc"),
    ("cl-huge", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n"),
    # Header syntax (decision 3): 400.
    ("obs-fold", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\r\n  folded\r\n\r\n"),
    ("obs-fold-tab", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\r\n\tfolded\r\n\r\n"),
    ("bare-cr-in-value", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n"),
    ("bare-lf-line-end", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\nX-B: b\r\n\r\n"),
    ("bare-lf-everywhere", 400, b"GET /echo HTTP/1.1\nHost: h.test\n\n"),
    ("space-before-colon", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n"),
    ("space-before-colon-host", 400, b"GET /echo HTTP/1.1\r\nHost : h.test\r\n\r\n"),
    ("tab-before-colon", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X-A\t: b\r\n\r\n"),
    ("nul-in-value", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n"),
    ("nul-in-name", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X-\x00A: b\r\n\r\n"),
    ("no-colon", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X-A\r\n\r\n"),
    ("space-in-name", 400, b"GET /echo HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n"),
    ("leading-whitespace-first-field", 400, b"GET /echo HTTP/1.1\r\n Host: h.test\r\n\r\n"),
    # Request line.
    ("target-too-long", 414, b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\n" + H + b"\r\n"),
    ("http2-request-line", 505, b"GET /echo HTTP/2.0\r\n" + H + b"\r\n"),
    ("http09-request-line", 505, b"GET /echo\r\n\r\n"),
    ("bad-version", 400, b"GET /echo HTTP/1.x\r\n" + H + b"\r\n"),
    ("connect", 405, b"CONNECT h.test:443 HTTP/1.1\r\nHost: h.test:443\r\n\r\n"),
    ("bad-method", 400, b"G<E>T /echo HTTP/1.1\r\n" + H + b"\r\n"),
    ("space-in-target", 400, b"GET /a b HTTP/1.1\r\n" + H + b"\r\n"),
    ("garbage", 400, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n"),
    # Header section limits: 431.
    ("header-bytes", 431, b"GET /echo HTTP/1.1\r\n" + H + many(40, 1000) + b"\r\n"),
    ("one-huge-header", 431, b"GET /echo HTTP/1.1\r\n" + H + b"X-Big: " + b"v" * 33000
     + b"\r\n\r\n"),
    ("too-many-fields", 431, b"GET /echo HTTP/1.1\r\n" + H + many(100, 1) + b"\r\n"),
    # Bodies.
    ("bad-chunk-size", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    ("chunk-missing-crlf", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n"),
    ("chunk-size-overflow", 400,
     b"POST /echo HTTP/1.1\r\n" + H
     + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\na\r\n"),
    ("chunk-bare-lf", 400,
     b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize(
    ("status", "data"), [pytest.param(s, d, id=i) for i, s, d in BAD_REQUESTS]
)
def test_bad_request_is_refused_and_closed(env: Setup, status: int, data: bytes) -> None:
    resp, closed = exchange(env.port, data)
    check_error(resp, status)
    assert resp.header("Connection") == "close"
    assert closed, "the connection stayed open after a framing error"


def test_limits_are_not_off_by_far(env: Setup) -> None:
    """Just under the limits is fine: the limits above really are the configured ones."""
    ok = [
        b"GET /" + b"a" * 8000 + b" HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n",
        b"GET /echo HTTP/1.1\r\n" + H + b"Connection: close\r\n" + many(97, 1) + b"\r\n",
        b"GET /echo HTTP/1.1\r\n" + H + b"Connection: close\r\n" + many(30, 1000) + b"\r\n",
    ]
    for data in ok:
        resp, _ = exchange(env.port, data)
        assert resp.status == 200, resp.head


def test_identical_content_length_list_may_be_accepted(env: Setup) -> None:
    resp, _ = exchange(
        env.port,
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\nConnection: close\r\n\r\nabc",
    )
    if resp.status == 200:
        assert resp.json()["body_length"] == 3
    else:
        check_error(resp, 400)


def test_bad_request_after_good_one_on_same_connection(env: Setup) -> None:
    """The good request is answered, the bad one refused, nothing after it is processed."""
    with Client(env.port) as client:
        client.send(
            b"GET /echo/1 HTTP/1.1\r\n" + H + b"\r\n"
            b"GET /echo/2 HTTP/1.1\r\n" + H + b"X-A : b\r\n\r\n"
            b"GET /echo/3 HTTP/1.1\r\n" + H + b"\r\n"
        )
        assert client.read_response().json()["raw_path"] == "/echo/1"
        check_error(client.read_response(), 400)
        assert client.closed_within(2)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: <script>alert(1)</script>\r\n\r\n",
                     id="script-in-host"),
        pytest.param(b"GET /<script>alert(1)</script> HTTP/1.1\r\nHost: unknown.test\r\n"
                     b"Connection: close\r\n\r\n",
                     id="script-in-path-unknown-host"),
        pytest.param(b"GET /<script>alert(1)</script> HTTP/1.1\r\n" + H + b"X-<script>: 1\r\n\r\n",
                     id="script-in-header-name"),
        pytest.param(b"<script>alert(1)</script> / HTTP/1.1\r\n" + H + b"\r\n",
                     id="script-as-method"),
        pytest.param(b"GET /<script> HTTP/1.1\r\n" + H + b"Content-Length: <script>\r\n\r\n",
                     id="script-in-content-length"),
    ],
)
def test_error_bodies_do_not_echo_input(env: Setup, data: bytes) -> None:
    resp, _ = exchange(env.port, data)
    assert resp.status in (400, 404), resp.head
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert len(resp.body) < 200
    for needle in (b"<", b">", b"script", b"alert"):
        assert needle not in resp.head + resp.body


def test_bad_request_does_not_affect_concurrent_good_one(env: Setup) -> None:
    """A slow good request on one connection and bad ones on others: the good one completes."""
    with Client(env.port) as good:
        good.send(b"POST /echo/good HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\n01234")
        errors: list[BaseException] = []

        def attack() -> None:
            try:
                for _, status, data in BAD_REQUESTS[:12]:
                    resp, _ = exchange(env.port, data)
                    assert resp.status == status
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=attack) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        good.send(b"56789")
        resp = good.read_response()
        assert resp.status == 200
        assert resp.json()["body_length"] == 10
        good.send(b"GET /echo/again HTTP/1.1\r\n" + H + b"\r\n")
        assert good.read_response().json()["raw_path"] == "/echo/again"
