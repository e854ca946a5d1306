"""Hop-by-hop headers, forwarded headers and raw paths (protocol notes, decisions 5, 6, 8)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import Backend, running_charon
from httpwire import Client, Response, request

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
}


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend("http_backend.py", "--name", "h")
    yield b
    b.stop()


def _hosts(backend: Backend) -> str:
    return f"""
        [[hosts]]
        domains = ["h.test"]
        upstream = "{backend.url}"
        """


@pytest.fixture(scope="module")
def port(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with running_charon(tmp_path_factory.mktemp("headers"), _hosts(backend)) as charon:
        yield charon.port


@pytest.fixture(scope="module")
def trusted_port(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with running_charon(
        tmp_path_factory.mktemp("headers-trusted"),
        _hosts(backend),
        server_toml='trusted_proxies = ["127.0.0.1/32"]',
    ) as charon:
        yield charon.port


def echo(port: int, head: str, body: bytes = b"") -> tuple[Response, list[tuple[str, str]]]:
    """Send `head` (request line and header lines, CRLF-separated) and the backend's view."""
    resp = request(port, head.encode("latin-1") + b"\r\n\r\n" + body)
    assert resp.status == 200, resp.head + resp.body
    return resp, [(n, v) for n, v in resp.json()["headers"]]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in headers if n.lower() == name.lower()]


def names(headers: list[tuple[str, str]]) -> set[str]:
    return {n.lower() for n, _ in headers}


def test_request_hop_by_hop_headers_removed(port: int) -> None:
    _, seen = echo(
        port,
        "GET /echo HTTP/1.1\r\nHost: h.test\r\n"
        "Connection: keep-alive, X-Custom-Hop, x-other-hop\r\n"
        "Keep-Alive: timeout=5\r\n"
        "TE: trailers\r\n"
        "Trailer: X-Checksum\r\n"
        "Upgrade: h2c\r\n"
        "Proxy-Authorization: Basic dXNlcjpwYXNz\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Proxy-Authenticate: Basic\r\n"
        "X-Custom-Hop: 1\r\n"
        "X-Other-Hop: 2\r\n"
        "X-End-To-End: 3\r\n"
        "Authorization: Bearer t",
    )
    assert not names(seen) & (HOP_BY_HOP | {"x-custom-hop", "x-other-hop"}), seen
    assert values(seen, "X-End-To-End") == ["3"]
    assert values(seen, "Authorization") == ["Bearer t"]


def test_connection_with_upgrade_token_is_not_forwarded(port: int) -> None:
    """`Connection: upgrade` on a non-WebSocket request: a plain request, Upgrade dropped."""
    with Client(port) as client:
        client.send(
            b"GET /echo HTTP/1.1\r\nHost: h.test\r\nConnection: Upgrade, X-Hop\r\n"
            b"Upgrade: h2c\r\nX-Hop: 1\r\n\r\n"
        )
        resp = client.read_response()
        assert resp.status == 200
        seen = resp.json()["headers"]
        assert not {n.lower() for n, _ in seen} & {"connection", "upgrade", "x-hop"}
        # The connection is still HTTP: a second request is parsed as one.
        client.send(b"GET /echo/2 HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n")
        assert client.read_response().json()["raw_path"] == "/echo/2"


def test_connection_cannot_drop_forwarded_or_framing_headers(port: int) -> None:
    _, seen = echo(
        port,
        "POST /echo HTTP/1.1\r\nHost: h.test\r\n"
        "Connection: X-Forwarded-For, Content-Length, Host, Via, X-Forwarded-Proto, "
        "X-Forwarded-Host, close\r\n"
        "Content-Length: 5",
        b"hello",
    )
    assert values(seen, "Content-Length") == ["5"]
    assert values(seen, "Host") == ["h.test"]
    assert values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(seen, "X-Forwarded-Proto") == ["http"]
    assert values(seen, "X-Forwarded-Host") == ["h.test"]
    assert values(seen, "Via") == ["1.1 charon"]


def test_body_is_forwarded_with_proxy_framing(port: int) -> None:
    resp, seen = echo(
        port,
        "POST /echo HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n"
        "Transfer-Encoding: chunked",
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    )
    assert resp.json()["body_length"] == 11
    assert values(seen, "Transfer-Encoding") == ["chunked"]
    assert not values(seen, "Content-Length")
    assert not values(seen, "X-Trailer")


def test_forwarded_headers_set(port: int) -> None:
    _, seen = echo(port, "GET /echo HTTP/1.1\r\nHost: h.test:8443\r\nConnection: close")
    assert values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(seen, "X-Forwarded-Proto") == ["http"]
    assert values(seen, "X-Forwarded-Host") == ["h.test:8443"]
    assert values(seen, "Via") == ["1.1 charon"]
    assert not values(seen, "Forwarded")


SPOOFED = (
    "X-Forwarded-For: 1.2.3.4\r\n"
    "X-Forwarded-For: 5.6.7.8, 9.9.9.9\r\n"
    "X-Forwarded-Proto: https\r\n"
    "X-Forwarded-Host: evil.test\r\n"
    "Forwarded: for=1.2.3.4;proto=https\r\n"
    "Via: 1.0 upstream-proxy"
)


def test_untrusted_peer_forwarded_headers_replaced(port: int) -> None:
    _, seen = echo(port, "GET /echo HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n" + SPOOFED)
    assert values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(seen, "X-Forwarded-Proto") == ["http"]
    assert values(seen, "X-Forwarded-Host") == ["h.test"]
    assert not any("1.2.3.4" in v for v in values(seen, "Forwarded")), seen
    # Via is a chain, not a claim about the client: appended to.
    assert values(seen, "Via") == ["1.0 upstream-proxy, 1.1 charon"]


def test_trusted_peer_forwarded_headers_appended(trusted_port: int) -> None:
    _, seen = echo(
        trusted_port, "GET /echo HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n" + SPOOFED
    )
    assert values(seen, "X-Forwarded-For") == ["1.2.3.4, 5.6.7.8, 9.9.9.9, 127.0.0.1"]
    assert values(seen, "X-Forwarded-Proto") == ["https"]
    assert values(seen, "X-Forwarded-Host") == ["evil.test"]
    assert values(seen, "Forwarded") == ["for=1.2.3.4;proto=https, for=127.0.0.1"]
    assert values(seen, "Via") == ["1.0 upstream-proxy, 1.1 charon"]


def test_trusted_peer_without_forwarded_headers(trusted_port: int) -> None:
    _, seen = echo(trusted_port, "GET /echo HTTP/1.1\r\nHost: h.test\r\nConnection: close")
    assert values(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(seen, "X-Forwarded-Proto") == ["http"]
    assert values(seen, "X-Forwarded-Host") == ["h.test"]


@pytest.mark.parametrize(
    "target",
    [
        # (Dot-segments and fragments are refused: test_http_request_rules.py.)
        "/a/..b/b//c%2F%2e.x?x=%20&y=/../",
        "/echo/%2e%2e%2e/.../x..?a=b&a=c",
        "/.well-known/echo/..x/y;p=1?%00=%zz",
        "//double//slash//",
        "/p%C3%A4th/%E2%82%AC?q=%C3%A4&r=a+b",
    ],
)
def test_raw_path_forwarded_byte_for_byte(port: int, target: str) -> None:
    resp, _ = echo(port, f"GET {target} HTTP/1.1\r\nHost: h.test\r\nConnection: close")
    assert resp.json()["raw_path"] == target


def test_request_headers_keep_order_case_and_duplicates(port: int) -> None:
    _, seen = echo(
        port,
        "GET /echo HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n"
        "X-B: 1\r\nx-a: 2\r\nX-B: 3\r\nCookie: a=1\r\nCookie: b=2\r\nX-Empty: \r\n"
        "X-Spaces:   padded value   ",
    )
    custom = [(n, v) for n, v in seen if n.lower() in ("x-b", "x-a", "cookie", "x-empty")]
    assert custom == [
        ("X-B", "1"), ("x-a", "2"), ("X-B", "3"), ("Cookie", "a=1"), ("Cookie", "b=2"),
        ("X-Empty", ""),
    ]
    assert values(seen, "X-Spaces") == ["padded value"]


def test_response_hop_by_hop_headers_removed(port: int) -> None:
    with Client(port) as client:
        client.send(b"GET /headers HTTP/1.1\r\nHost: h.test\r\n\r\n")
        resp = client.read_response()
        assert resp.status == 200
        got = {n.lower() for n, _ in resp.headers}
        assert not got & (HOP_BY_HOP - {"transfer-encoding"}), resp.head
        assert "x-drop-me" not in got
        assert resp.header("X-Keep-Me") == "yes"
        assert resp.header("Cache-Control") == "max-age=60"
        assert resp.all("Set-Cookie") == ["a=1", "b=2"]
        assert resp.body == b"headers"
        # The backend's `Connection` did not close the client connection.
        client.send(b"GET /echo HTTP/1.1\r\nHost: h.test\r\n\r\n")
        assert client.read_response().status == 200


def test_response_connection_close_added_by_proxy_only(port: int) -> None:
    resp = request(port, b"GET /headers HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n")
    assert resp.all("Connection") == ["close"]
    assert not resp.has("X-Drop-Me")
    assert not resp.has("Keep-Alive")
