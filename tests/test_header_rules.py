"""Header rules (issue 14): `request_headers`, `response_headers`, `host_header` and the
`security_headers` preset, through a real Charon and a real backend that echoes the head it
got and answers with fields of its own (tests/backends/headers_backend.py). The rule objects
themselves are checked first, without processes (the order of remove, set, add, default).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import HOST, Backend, free_port
from httpwire import Client, Response, get, request
from test_websocket_handshake import ACCEPT, RawWs, ws_request
from tlsca import Leaf, TestCA
from tlsenv import client_context, running_tls_charon, tls_table

from charon.config.model import Upstream
from charon.config.rules import HeaderOps, Rules
from charon.worker.http.headerrules import (
    header_rules,
    own_fields,
    upstream_authority,
    with_host,
)
from charon.worker.websocket.handshake import switching_response

# -- the rules, without processes --------------------------------------------------------------


def test_a_route_without_header_rules_has_none() -> None:
    assert header_rules(Rules()) is None
    assert header_rules(Rules(max_body_size=10, security_headers=False)) is None
    assert header_rules(Rules(host_header="upstream")) is not None


def test_response_rules_remove_then_set_then_add_then_default() -> None:
    ops = HeaderOps(
        set=(("Cache-Control", "no-store"),),
        add=(("X-Tag", "a"),),
        remove=("server", "x-tag", "x-content-type-options"),
        default=(("X-Frame-Options", "SAMEORIGIN"), ("Referrer-Policy", "no-referrer"),
                 ("X-Content-Type-Options", "nosniff")),  # (removed: never added)
    )
    rules = header_rules(Rules(response_headers=ops))
    assert rules is not None and rules.response is not None
    backend = [
        (b"Server", b"x"), (b"cache-control", b"max-age=1"), (b"Cache-Control", b"public"),
        (b"X-Tag", b"backend"), (b"x-frame-options", b"DENY"), (b"Vary", b"Accept"),
        (b"X-Content-Type-Options", b"nosniff"),
    ]
    assert rules.response.apply(backend) == [
        (b"x-frame-options", b"DENY"),  # the backend's own value wins over a default
        (b"Vary", b"Accept"),
        (b"Cache-Control", b"no-store"),  # set replaces every field of that name
        (b"X-Tag", b"a"),  # removed, then added
        (b"Referrer-Policy", b"no-referrer"),  # absent: the default is added
    ]


def test_request_rules_rewrite_the_field_lines() -> None:
    ops = HeaderOps(set=(("X-App", "1"),), add=(("X-Tag", "a"),), remove=("via", "x-debug"))
    rules = header_rules(Rules(request_headers=ops, host_header="backend.internal"))
    assert rules is not None
    out = [
        b"GET /p HTTP/1.1\r\nHost: app.test\r\n",
        b"X-Debug", b": ", b"1", b"\r\n", b"x-app", b": ", b"client", b"\r\n",
        b"X-Tag", b": ", b"c", b"\r\n", b"Via: 1.1 charon\r\n",
    ]
    assert b"".join(rules.upstream_fields(out)) == (
        b"GET /p HTTP/1.1\r\nHost: backend.internal\r\n"
        b"X-Tag: c\r\nX-App: 1\r\nX-Tag: a\r\n"
    )


def test_upstream_authority_and_host_line() -> None:
    assert upstream_authority(Upstream("http://a:80", "a", 80)) == b"a"
    assert upstream_authority(Upstream("https://a", "a", 443, tls=True)) == b"a"
    assert upstream_authority(Upstream("https://a:80", "a", 80, tls=True)) == b"a:80"
    assert upstream_authority(Upstream("http://[::1]:8080", "::1", 8080)) == b"[::1]:8080"
    head = b"GET / HTTP/1.1\r\nHost: old\r\nX: 1\r\n\r\n"
    assert with_host(head, b"new:81") == b"GET / HTTP/1.1\r\nHost: new:81\r\nX: 1\r\n\r\n"


def test_own_answers_get_the_preset_only_with_its_overrides() -> None:
    ops = HeaderOps(
        set=(("X-Frame-Options", "DENY"), ("X-App", "1")),
        add=(("X-Tag", "a"),),
        remove=("referrer-policy",),
        default=(("X-Frame-Options", "SAMEORIGIN"), ("Referrer-Policy", "no-referrer"),
                 ("X-Content-Type-Options", "nosniff")),
    )
    rules = header_rules(Rules(response_headers=ops, security_headers=True))
    assert own_fields(b"max-age=5", rules) == (
        b"Strict-Transport-Security: max-age=5\r\n"
        b"X-Frame-Options: DENY\r\nX-Content-Type-Options: nosniff\r\n"
    )
    assert own_fields(None, None) == b""


def test_a_101_keeps_its_handshake_fields() -> None:
    ops = HeaderOps(
        set=(("Sec-WebSocket-Protocol", "forged"), ("X-App", "1")),
        remove=("sec-websocket-accept", "server"),
    )
    rules = header_rules(Rules(response_headers=ops))
    assert rules is not None
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    backend = [
        (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Accept", ACCEPT), (b"Server", b"x"),
    ]
    answer = switching_response(backend, key, b"GET / HTTP/1.1\r\n\r\n", rules.switching)
    assert answer is not None
    assert answer[0] == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\nX-App: 1\r\n\r\n"
    )


# -- end to end --------------------------------------------------------------------------------


@dataclass
class Env:
    port: int
    tls_port: int
    ca: TestCA
    backend: Backend
    dead: int  # a port nothing listens on


REQUEST_RULES = (
    '{ set = { "X-App" = "1", "X-Forwarded-For" = "10.9.9.9" }, add = { "X-Tag" = "a" }, '
    'remove = ["X-Debug", "Via", "X-Real-IP"] }'
)
RESPONSE_RULES = (
    '{ set = { "Cache-Control" = "no-store" }, add = { "X-Added" = "yes" }, '
    'remove = ["Server", "X-Remove-Me"] }'
)


def _hosts(backend: Backend, dead: int, site: Leaf) -> str:
    up, gone = backend.url, f"http://{HOST}:{dead}"
    return f"""
        [[hosts]]
        domains = ["plain.test"]
        upstream = "{up}"

        [[hosts]]
        domains = ["rules.test"]
        upstream = "{up}"
        request_headers = {REQUEST_RULES}
        response_headers = {RESPONSE_RULES}
        host_header = "upstream"

        [[hosts.locations]]
        path = "/literal/"
        upstream = "{up}"
        host_header = "backend.internal"

        [[hosts.locations]]
        path = "/dead/"
        upstream = "{gone}"

        [[hosts]]
        domains = ["secure.test"]
        upstream = "{up}"
        tls = {tls_table(site)}
        security_headers = true
        max_body_size = "1k"

        [[hosts.locations]]
        path = "/dead/"
        upstream = "{gone}"

        [[hosts]]
        domains = ["override.test"]
        upstream = "{up}"
        security_headers = {{ x_frame_options = "DENY", referrer_policy = false }}
        response_headers = {{ set = {{ "X-Content-Type-Options" = "nosniff, custom" }} }}

        [[hosts]]
        domains = ["retry.test"]
        upstreams = ["{gone}", "{up}"]
        max_fails = 0
        host_header = "upstream"
        """


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("header-rules")
    ca = TestCA(tmp / "ca")
    site = ca.issue(["secure.test"], "site")
    backend = Backend("headers_backend.py", "--name", "one")
    try:
        dead = free_port()
        with running_tls_charon(tmp, _hosts(backend, dead, site)) as charon:
            yield Env(charon.port, charon.tls_port, ca, backend, dead)
    finally:
        backend.stop()


def _seen(response: Response) -> list[tuple[str, str]]:
    assert response.status == 200, response.head + response.body
    return [(n, v) for n, v in response.json()["headers"]]


def _values(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for n, v in fields if n.lower() == name.lower()]


def test_request_rules_set_add_remove(env: Env) -> None:
    seen = _seen(get(env.port, "rules.test", "/echo",
                     "X-Debug: 1\r\nX-App: client\r\nX-Tag: client\r\n"))
    assert _values(seen, "X-App") == ["1"]
    assert _values(seen, "X-Tag") == ["client", "a"]
    assert _values(seen, "X-Debug") == []
    # The proxy's own fields: removed (Via, X-Real-IP) or set (X-Forwarded-For) as asked.
    assert _values(seen, "Via") == [] and _values(seen, "X-Real-IP") == []
    assert _values(seen, "X-Forwarded-For") == ["10.9.9.9"]
    assert _values(seen, "X-Forwarded-Host") == ["rules.test"]
    assert _values(seen, "Host") == [f"{HOST}:{env.backend.port}"]  # host_header = "upstream"


def test_response_rules_set_add_remove(env: Env) -> None:
    response = get(env.port, "rules.test", "/echo?h=Cache-Control:max-age%3D60&h=X-Keep:1")
    assert response.status == 200
    assert response.all("Cache-Control") == ["no-store"]
    assert response.all("X-Added") == ["yes"]
    assert not response.has("Server") and not response.has("X-Remove-Me")
    assert response.all("X-Keep") == ["1"] and response.all("X-Backend") == ["one"]


def test_host_header_literal_on_a_location(env: Env) -> None:
    seen = _seen(get(env.port, "rules.test", "/literal/x"))
    assert _values(seen, "Host") == ["backend.internal"]
    assert _values(seen, "X-Forwarded-Host") == ["rules.test"]
    assert _values(seen, "X-App") == ["1"]  # the host's other rules are inherited


def test_host_header_follows_a_retry_to_the_second_target(env: Env) -> None:
    # Round robin over [dead, alive]: of two requests, one tries the dead target first and
    # is sent again to the live one, which must see its own name, not the dead one's.
    for _ in range(4):
        seen = _seen(get(env.port, "retry.test", "/echo"))
        assert _values(seen, "Host") == [f"{HOST}:{env.backend.port}"]


def test_security_headers_preset(env: Env) -> None:
    response = get(env.port, "secure.test", "/echo")
    assert response.all("X-Content-Type-Options") == ["nosniff"]
    assert response.all("Referrer-Policy") == ["strict-origin-when-cross-origin"]
    assert response.all("X-Frame-Options") == ["SAMEORIGIN"]
    assert not response.has("Strict-Transport-Security")  # plain http: never (RFC 6797 7.2)
    # The backend's own value wins over the preset's.
    response = get(env.port, "secure.test", "/echo?h=X-Frame-Options:DENY")
    assert response.all("X-Frame-Options") == ["DENY"]
    assert response.all("X-Content-Type-Options") == ["nosniff"]


def test_security_headers_over_tls_add_hsts(env: Env) -> None:
    """HSTS is the host's (over TLS only), on proxied responses and the proxy's own answers."""
    ctx = client_context(env.ca)
    for data, status in (
        (b"GET /echo HTTP/1.1\r\nHost: secure.test\r\n\r\n", 200),
        (b"GET /dead/x HTTP/1.1\r\nHost: secure.test\r\n\r\n", 502),
        (b"POST /echo HTTP/1.1\r\nHost: secure.test\r\nContent-Length: 5000\r\n\r\n", 413),
    ):
        with Client(env.tls_port) as client:
            client.sock = ctx.wrap_socket(client.sock, server_hostname="secure.test")
            client.send(data)
            response = client.read_response()
        assert response.status == status, response.head
        assert response.all("Strict-Transport-Security") == ["max-age=31536000"]
        assert response.all("X-Frame-Options") == ["SAMEORIGIN"]


def test_security_headers_overridden_field_by_field(env: Env) -> None:
    response = get(env.port, "override.test", "/echo?h=X-Content-Type-Options:backend")
    assert response.all("X-Frame-Options") == ["DENY"]
    assert not response.has("Referrer-Policy")
    assert response.all("X-Content-Type-Options") == ["nosniff, custom"]  # set beats backend


def test_own_answers_carry_the_preset_only(env: Env) -> None:
    # A 502 (planned, then the backend failed) and a 413 (refused while planning).
    bad_gateway = get(env.port, "secure.test", "/dead/x")
    too_large = request(
        env.port,
        b"POST /echo HTTP/1.1\r\nHost: secure.test\r\nContent-Length: 5000\r\n\r\n",
    )
    for response, status in ((bad_gateway, 502), (too_large, 413)):
        assert response.status == status, response.head
        assert response.all("X-Content-Type-Options") == ["nosniff"]
        assert response.all("X-Frame-Options") == ["SAMEORIGIN"]
    # Set/add rules are for proxied responses only.
    response = get(env.port, "rules.test", "/dead/x")
    assert response.status == 502
    assert not response.has("X-Added") and not response.has("X-Frame-Options")
    assert get(env.port, "plain.test", "/nowhere-else").status == 200


@pytest.mark.parametrize("warm_up", [False, True], ids=["front-door", "http-path"])
def test_websocket_101_carries_response_rules(env: Env, warm_up: bool) -> None:
    with RawWs(env.port) as ws:
        if warm_up:  # a keep-alive request first: the handshake takes the HTTP path
            ws.send(b"GET /echo HTTP/1.1\r\nHost: rules.test\r\n\r\n")
            head, _ = ws.read_response()
            assert head.status == 200, head.raw
        ws.send(ws_request("/ws?h=X-WS:1", "rules.test", extra=b"X-Debug: 1\r\n"))
        head = ws.read_head()
        assert head.status == 101, head.raw
        names = [n.lower() for n, _ in head.headers]
        assert head.get("Sec-WebSocket-Accept") == ACCEPT.decode()
        assert head.get("X-Added") == "yes" and head.get("X-WS") == "1"
        assert "server" not in names and "x-remove-me" not in names
        frame = ws.read_frame()
        seen = json.loads(frame.payload)
        assert _values(seen, "X-App") == ["1"] and _values(seen, "X-Debug") == []
        assert _values(seen, "Host") == [f"{HOST}:{env.backend.port}"]


def test_a_host_without_rules_is_untouched(env: Env) -> None:
    """Both heads exactly as without issue 14: the client's fields in order, then the proxy's;
    the backend's fields as it sent them."""
    with Client(env.port) as client:
        client.send(
            b"GET /echo?h=X-Frame-Options:x HTTP/1.1\r\nHost: plain.test\r\n"
            b"X-Debug: 1\r\nX-App: client\r\nUser-Agent: t\r\n\r\n"
        )
        response = client.read_response()
    seen = _seen(response)
    assert seen == [
        ("Host", "plain.test"), ("X-Debug", "1"), ("X-App", "client"), ("User-Agent", "t"),
        ("X-Forwarded-For", HOST), ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "plain.test"), ("X-Real-IP", HOST), ("Via", "1.1 charon"),
    ]
    assert [n for n, _ in response.headers] == [
        "X-Backend", "X-Remove-Me", "X-Frame-Options", "Content-Type", "Date", "Server",
        "Content-Length",
    ]
