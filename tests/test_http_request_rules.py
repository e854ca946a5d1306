"""Request rules of issue #10 (item 4), decided in plan_request for both paths.

Each rule is checked over raw sockets on the HTTP path and, for a WebSocket handshake on a
fresh connection, on the front door's path (door.c splits the head, door.py plans it): both
must give the same answer, and what the backend received is checked where it matters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import Backend, running_charon
from httpwire import Client, Response
from test_websocket_handshake import RawWs, ws_request

H = b"Host: h.test\r\n"
CONTROL_IPS = [
    "True-Client-IP", "CF-Connecting-IP", "X-Client-IP", "Fastly-Client-IP",
    "X-Cluster-Client-IP", "X-Originating-IP", "X-Remote-IP", "X-Remote-Addr", "Client-IP",
]


@dataclass
class Setup:
    port: int  # untrusted peer, underscores dropped
    trusted_port: int  # 127.0.0.1 trusted, underscores allowed


def _hosts(http: Backend, ws: Backend) -> str:
    return f"""
        [[hosts]]
        domains = ["h.test"]
        upstream = "{http.url}"

        [[hosts]]
        domains = ["ws.test"]
        upstream = "{ws.url}"
        """


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    http = Backend("http_backend.py", "--name", "h")
    ws = Backend("ws_backend.py")
    try:
        with running_charon(tmp_path_factory.mktemp("rules"), _hosts(http, ws)) as plain, \
                running_charon(
                    tmp_path_factory.mktemp("rules-trusted"), _hosts(http, ws),
                    server_toml='trusted_proxies = ["127.0.0.1/32"]\n'
                                "underscores_in_headers = true",
                ) as trusted:
            yield Setup(plain.port, trusted.port)
    finally:
        http.stop()
        ws.stop()


def send(port: int, data: bytes, head_request: bool = False) -> Response:
    with Client(port, timeout=5) as client:
        client.send(data)
        return client.read_response(head_request)


def refused(resp: Response, status: int = 400) -> None:
    assert resp.status == status, resp.head + resp.body
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert resp.body.startswith(b"%d " % status), resp.body
    assert b'"backend"' not in resp.body  # not the echo backend's JSON


def seen_headers(resp: Response) -> list[tuple[str, str]]:
    assert resp.status == 200, resp.head + resp.body
    return [(n, v) for n, v in resp.json()["headers"]]


def values(seen: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in seen if n.lower() == name.lower()]


def handshake(port: int, request: bytes, warm_up: bool) -> tuple[int, bytes]:
    """(status, the backend's first message after a 101 / the refusal's body): on a fresh
    connection (the front door) or after a keep-alive request (the HTTP path)."""
    with RawWs(port) as ws:
        if warm_up:
            ws.send(b"GET /plain HTTP/1.1\r\nHost: ws.test\r\n\r\n")
            head, body = ws.read_response()
            assert (head.status, body) == (200, b"plain"), head.raw
        ws.send(request)
        head = ws.read_head()
        if head.status != 101:
            return head.status, ws.read_exact(int(head.get("Content-Length") or 0))
        return 101, ws.read_frame().payload


def both_paths(port: int, request: bytes) -> tuple[int, bytes]:
    front = handshake(port, request, warm_up=False)
    http = handshake(port, request, warm_up=True)
    assert front == http, f"front door {front!r}, HTTP path {http!r}"
    return front


# -- dot-segments and fragments ----------------------------------------------------------------

DOT_TARGETS = [
    "/public/../admin", "/public/%2e%2e/admin", "/public/%2E%2e/admin", "/public/.%2e/admin",
    "/./admin", "/public/.", "/public/..", "/public/..?x=1", "/public/.?x=1",
    "/public%2f..%2fadmin", "/public%2F%2E%2E%2Fadmin", "/public/..%5cadmin",
    "/public\\..\\admin", "/public/..;x=1/admin",
]


@pytest.mark.parametrize("target", DOT_TARGETS)
def test_dot_segment_is_400(env: Setup, target: str) -> None:
    with Client(env.port) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: h.test\r\n\r\n".encode())
        refused(client.read_response())
        # Well framed: the connection goes on.
        client.send(b"GET /echo/next HTTP/1.1\r\n" + H + b"\r\n")
        assert client.read_response().json()["raw_path"] == "/echo/next"


@pytest.mark.parametrize(
    "target", ["/a/..b/.c/d..", "/.well-known/x", "/a/.../b", "/x?next=/../admin&p=./",
               "/api/group%2Fproject", "/files/a.tar.gz"],
)
def test_dots_that_are_not_segments_pass(env: Setup, target: str) -> None:
    resp = send(env.port, f"GET {target} HTTP/1.1\r\nHost: h.test\r\n\r\n".encode())
    assert resp.json()["raw_path"] == target


def test_dot_segment_in_absolute_form_is_400(env: Setup) -> None:
    refused(send(env.port, b"GET http://h.test/public/../admin HTTP/1.1\r\n" + H + b"\r\n"))


@pytest.mark.parametrize("target", ["/echo#x", "/echo?a=1#x", "/#", "http://h.test/echo#x"])
def test_fragment_is_400(env: Setup, target: str) -> None:
    refused(send(env.port, f"GET {target} HTTP/1.1\r\nHost: h.test\r\n\r\n".encode()))


@pytest.mark.parametrize("target", ["/echo/../echo", "/echo/%2e", "/echo#x"])
def test_handshake_target_refused_on_both_paths(env: Setup, target: str) -> None:
    status, _ = both_paths(env.port, ws_request(target, host="ws.test"))
    assert status == 400


# -- Host ports --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "host", ["h.test:99999", "h.test:", "h.test:0", "h.test:65536", "h.test:8a", "h.test:-1",
             "[::1]:", "[::1]:0"],
)
def test_host_with_bad_port_is_400(env: Setup, host: str) -> None:
    resp = send(env.port, f"GET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    refused(resp)
    assert resp.header("Connection") == "close"


def test_host_with_good_port_is_routed(env: Setup) -> None:
    for host in ("h.test:65535", "h.test:1", "h.test:080"):
        resp = send(env.port, f"GET /echo HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert resp.json()["backend"] == "h", host


@pytest.mark.parametrize("authority", ["h.test:0", "h.test:", "h.test:70000"])
def test_absolute_form_with_bad_port_is_400(env: Setup, authority: str) -> None:
    refused(send(env.port, f"GET http://{authority}/echo HTTP/1.1\r\n".encode() + H + b"\r\n"))


def test_handshake_host_with_bad_port_refused_on_both_paths(env: Setup) -> None:
    status, _ = both_paths(env.port, ws_request("/echo", host="ws.test:0"))
    assert status == 400


# -- header names with underscores -------------------------------------------------------------

def test_underscored_transfer_encoding_is_dropped(env: Setup) -> None:
    """`Transfer_Encoding: chunked` beside Content-Length: the backend gets the length only."""
    resp = send(
        env.port,
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer_Encoding: chunked\r\nContent-Length: 5\r\n"
        b"X_Forwarded_For: 6.6.6.6\r\nX-Normal: 1\r\nConnection: close\r\n\r\nhello",
    )
    seen = seen_headers(resp)
    names = {n.lower() for n, _ in seen}
    assert "transfer_encoding" not in names and "x_forwarded_for" not in names, seen
    assert values(seen, "Content-Length") == ["5"]
    assert values(seen, "X-Normal") == ["1"]
    assert resp.json()["body_length"] == 5


def test_underscored_names_dropped_when_connection_names_fields(env: Setup) -> None:
    """The second pass over the fields (Connection naming one) drops them too."""
    seen = seen_headers(send(
        env.port,
        b"GET /echo HTTP/1.1\r\n" + H + b"Connection: close, X-Gone\r\nX-Gone: 1\r\n"
        b"X_Under: 1\r\nX-Kept: 1\r\n\r\n",
    ))
    names = {n.lower() for n, _ in seen}
    assert "x_under" not in names and "x-gone" not in names, seen
    assert values(seen, "X-Kept") == ["1"]


def test_underscored_names_forwarded_when_allowed(env: Setup) -> None:
    seen = seen_headers(send(
        env.trusted_port,
        b"GET /echo HTTP/1.1\r\n" + H + b"X_Under: 1\r\nConnection: close\r\n\r\n",
    ))
    assert values(seen, "X_Under") == ["1"]


def test_handshake_underscored_name_dropped_on_both_paths(env: Setup) -> None:
    status, message = both_paths(
        env.port, ws_request("/headers", host="ws.test", extra=b"X_Under: 1\r\nX-Kept: 1\r\n")
    )
    assert status == 101
    seen = [(n, v) for n, v in json.loads(message)]
    assert values(seen, "X-Kept") == ["1"] and not values(seen, "X_Under"), seen


# -- client addresses --------------------------------------------------------------------------

def _spoofing_fields() -> bytes:
    return b"X-Real-IP: 6.6.6.6\r\n" + b"".join(
        name.encode() + b": 6.6.6.6\r\n" for name in CONTROL_IPS
    )


def test_client_ip_fields_from_untrusted_peer_replaced(env: Setup) -> None:
    seen = seen_headers(send(
        env.port,
        b"GET /echo HTTP/1.1\r\n" + H + _spoofing_fields() + b"Connection: close\r\n\r\n",
    ))
    assert values(seen, "X-Real-IP") == ["127.0.0.1"]
    for name in CONTROL_IPS:
        assert not values(seen, name), name
    assert "6.6.6.6" not in json.dumps(seen)


def test_client_ip_fields_from_trusted_proxy(env: Setup) -> None:
    """X-Real-IP is decision 6's client IP (the rightmost untrusted address); the CDN fields
    a trusted proxy set are kept."""
    seen = seen_headers(send(
        env.trusted_port,
        b"GET /echo HTTP/1.1\r\n" + H + b"X-Forwarded-For: 1.2.3.4\r\n" + _spoofing_fields()
        + b"Connection: close\r\n\r\n",
    ))
    assert values(seen, "X-Real-IP") == ["1.2.3.4"]
    for name in CONTROL_IPS:
        assert values(seen, name) == ["6.6.6.6"], name


def test_handshake_client_ip_fields_on_both_paths(env: Setup) -> None:
    status, message = both_paths(
        env.port, ws_request("/headers", host="ws.test", extra=_spoofing_fields())
    )
    assert status == 101
    seen = [(n, v) for n, v in json.loads(message)]
    assert values(seen, "X-Real-IP") == ["127.0.0.1"]
    assert "6.6.6.6" not in message.decode(), seen


# -- TRACE, OPTIONS and Max-Forwards -----------------------------------------------------------

def test_trace_is_405_with_allow(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(b"TRACE /echo HTTP/1.1\r\n" + H + b"Cookie: secret=1\r\n\r\n")
        resp = client.read_response()
        refused(resp, 405)
        assert "TRACE" not in (resp.header("Allow") or "TRACE")
        assert b"secret" not in resp.body
        client.send(b"GET /echo/next HTTP/1.1\r\n" + H + b"\r\n")
        assert client.read_response().json()["raw_path"] == "/echo/next"


def test_connect_405_has_allow(env: Setup) -> None:
    resp = send(env.port, b"CONNECT h.test:443 HTTP/1.1\r\nHost: h.test:443\r\n\r\n")
    refused(resp, 405)
    assert "GET" in (resp.header("Allow") or "")


@pytest.mark.parametrize("target", [b"*", b"/echo"])
def test_options_max_forwards_0_answered_by_proxy(env: Setup, target: bytes) -> None:
    with Client(env.port) as client:
        client.send(b"OPTIONS " + target + b" HTTP/1.1\r\n" + H + b"Max-Forwards: 0\r\n\r\n")
        resp = client.read_response()
        assert resp.status == 200, resp.head
        assert "OPTIONS" in (resp.header("Allow") or "")
        assert resp.body == b""  # not the backend's echo
        client.send(b"GET /echo/next HTTP/1.1\r\n" + H + b"\r\n")
        assert client.read_response().json()["raw_path"] == "/echo/next"


def test_options_max_forwards_decremented(env: Setup) -> None:
    seen = seen_headers(send(
        env.port,
        b"OPTIONS /echo HTTP/1.1\r\n" + H + b"Max-Forwards: 3\r\nConnection: close\r\n\r\n",
    ))
    assert values(seen, "Max-Forwards") == ["2"]


def test_max_forwards_of_other_methods_forwarded_unchanged(env: Setup) -> None:
    seen = seen_headers(send(
        env.port, b"GET /echo HTTP/1.1\r\n" + H + b"Max-Forwards: 0\r\nConnection: close\r\n\r\n"
    ))
    assert values(seen, "Max-Forwards") == ["0"]


@pytest.mark.parametrize("value", [b"x", b"-1", b"1, 2", b""])
def test_invalid_max_forwards_is_400(env: Setup, value: bytes) -> None:
    refused(send(env.port, b"OPTIONS /echo HTTP/1.1\r\n" + H + b"Max-Forwards: " + value
                 + b"\r\n\r\n"))


# -- the request line: single spaces -----------------------------------------------------------

def refused_then_closed(client: Client, head_request: bool = False) -> None:
    resp = client.read_response(head_request)
    if head_request:
        assert resp.status == 400 and int(resp.header("Content-Length") or 0) > 0, resp.head
    else:
        refused(resp)
    assert resp.header("Connection") == "close"
    client.sock.settimeout(5)
    assert client.read_all() == b""


@pytest.mark.parametrize(
    "line",
    [b"GET  /echo HTTP/1.1", b"GET /echo  HTTP/1.1", b"GET   /echo   HTTP/1.1",
     b"GET  http://h.test/echo HTTP/1.1", b"OPTIONS  * HTTP/1.1"],
)
def test_extra_spaces_in_request_line_are_400(env: Setup, line: bytes) -> None:
    with Client(env.port) as client:
        client.send(line + b"\r\n" + H + b"\r\n")
        refused_then_closed(client)


def test_extra_spaces_in_head_request_line_400_has_no_body(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(b"HEAD  /echo HTTP/1.1\r\n" + H + b"\r\n")
        refused_then_closed(client, head_request=True)


def test_spaces_in_field_values_are_not_the_request_line(env: Setup) -> None:
    seen = seen_headers(send(
        env.port, b"GET /echo HTTP/1.1\r\n" + H + b"X-A: a  b   c\r\nConnection: close\r\n\r\n"
    ))
    assert values(seen, "X-A") == ["a  b   c"]


CHUNKED_POST = (
    b"POST /echo/chunked HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1d;ext=1\r\n\r\nGET /echo/inside HTTP/1.1\r\n\r\n"  # a request line inside the data
    b"00005\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"
)


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(b"GET /echo/first HTTP/1.1\r\n" + H + b"\r\n", id="get"),
        pytest.param(b"\r\nGET /echo/first HTTP/1.1\r\n" + H + b"\r\n\r\n", id="get-crlfs"),
        pytest.param(b"POST /echo/first HTTP/1.1\r\n" + H + b"Content-Length: 29\r\n\r\n"
                     b"\r\nGET /echo/inside HTTP/1.1\r\n", id="content-length"),
        pytest.param(CHUNKED_POST, id="chunked"),
        pytest.param(b"GET /x HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 3\r\n\r\nabc",
                     id="unknown-host-404-with-body"),
        pytest.param(b"OPTIONS * HTTP/1.1\r\n" + H + b"Max-Forwards: 0\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n3\r\nGET\r\n0\r\n\r\n",
                     id="options-answered-by-proxy-chunked-body"),
    ],
)
def test_pipelined_request_line_found_after(env: Setup, first: bytes) -> None:
    """The second request of a read is found after the first one's body (whatever is inside
    it): a single-spaced one is served, a double-spaced one refused."""
    for second, ok in ((b"GET /echo/second HTTP/1.1", True), (b"GET  /echo/second HTTP/1.1",
                                                              False)):
        with Client(env.port) as client:
            client.send(first + second + b"\r\n" + H + b"\r\n")
            assert client.read_response().status in (200, 404), first
            if ok:
                assert client.read_response().json()["raw_path"] == "/echo/second"
            else:
                refused_then_closed(client)


@pytest.mark.parametrize("cut", [3, 4, 5, 14, 24, 25, 26, 40, 70, 75, 95, 101, 110, 120, 129])
def test_request_line_found_across_reads(env: Setup, cut: int) -> None:
    """A chunked POST then a double-spaced GET, cut in two reads anywhere (lines, the empty line,
    chunk-size lines, trailers): the GET is refused, the POST served."""
    data = CHUNKED_POST + b"GET  /echo/second HTTP/1.1\r\n" + H + b"\r\n"
    with Client(env.port) as client:
        client.send(data[:cut])
        time.sleep(0.15)
        client.send(data[cut:])
        assert client.read_response().json()["raw_path"] == "/echo/chunked"
        refused_then_closed(client)


@pytest.mark.parametrize("cut", [4, 5, 9, 20, 21])
def test_good_request_line_across_reads(env: Setup, cut: int) -> None:
    data = b"GET /echo/cut HTTP/1.1\r\n\r\n"[:0] + b"GET /echo/cut HTTP/1.1\r\n" + H + b"\r\n"
    with Client(env.port) as client:
        client.send(data[:cut])
        time.sleep(0.15)
        client.send(data[cut:])
        assert client.read_response().json()["raw_path"] == "/echo/cut"
        client.send(b"GET  /echo HTTP/1.1\r\n" + H + b"\r\n")
        refused_then_closed(client)


def test_handshake_with_extra_spaces_refused_on_both_paths(env: Setup) -> None:
    request = ws_request("/echo", host="ws.test").replace(b"GET /echo", b"GET  /echo", 1)
    status, _ = both_paths(env.port, request)
    assert status == 400


@pytest.mark.parametrize("bad_at", [1, 20, 39])
def test_request_line_found_in_a_read_fed_in_slices(env: Setup, bad_at: int) -> None:
    """40 pipelined requests in one write (more than one 4 KiB slice, and more than the 16 the
    queue takes before the rest of the read waits): the request lines are followed across
    slices and waits, so only the double-spaced one is refused, after every one before it."""
    pad = b"X-Pad: " + b"p" * 500 + b"\r\n"
    requests = [
        (b"GET  /echo/%d HTTP/1.1\r\n" if i == bad_at else b"GET /echo/%d HTTP/1.1\r\n") % i
        + H + pad + b"\r\n"
        for i in range(40)
    ]
    data = b"".join(requests)
    assert len(data) > 4 * 4096
    with Client(env.port) as client:
        client.send(data)
        for i in range(bad_at):
            assert client.read_response().json()["raw_path"] == f"/echo/{i}"
        refused_then_closed(client)
