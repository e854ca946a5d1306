"""The HTTP path's TLS behaviours (issue 12): force_https's 308, the ACME HTTP-01 responder,
https:// backends (verified against a CA file, the system store, or not at all), HSTS and
X-Forwarded-Proto over TLS, 421 when Host and SNI name different proxy hosts.

Real processes: one Charon, a plain aiohttp backend and two HTTPS aiohttp backends whose
certificates come from a throwaway CA (tests/tlsca.py); clients are raw sockets (httpwire).
"""

from __future__ import annotations

import os
import ssl
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Backend, Charon, free_port, wait_until
from httpwire import Client, Response
from test_metrics import value, wait_metrics
from test_websocket_handshake import RawWs, client_frame
from tlsca import TestCA

from charon.config.loader import load_config_text
from charon.tls.paths import http01_path
from charon.worker.http.errors import HttpError
from charon.worker.http.headers import ForwardedPolicy
from charon.worker.http.request import plan_request
from charon.worker.routing import Router, config_router
from charon.worker.tlsinfo import TlsInfo

WS_HEAD = (
    "GET /chat HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@dataclass
class Setup:
    charon: Charon
    tls_port: int
    state_dir: Path
    backend_port: int
    ca: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("tls_http")
    ca = TestCA(tmp / "ca")
    site = ca.issue(["force.test", "secure.test", "ws.test", "verified.test"], "site")
    backend_leaf = ca.issue(["127.0.0.1"], "backend")
    other_leaf = ca.issue(["other.internal"], "other")
    state_dir = tmp / "state"
    state_dir.mkdir()
    plain = Backend("http_backend.py", "--name", "plain")
    secure = Backend(
        "http_backend.py", "--name", "secure",
        "--cert", str(backend_leaf.cert_path), "--key", str(backend_leaf.key_path),
    )
    misnamed = Backend(
        "http_backend.py", "--name", "misnamed",
        "--cert", str(other_leaf.cert_path), "--key", str(other_leaf.key_path),
    )
    secure_ws = Backend(
        "ws_backend.py", "--cert", str(backend_leaf.cert_path), "--key", str(backend_leaf.key_path)
    )
    tls_port = free_port()
    site_tls = f'tls = {{ cert = "{site.cert_path}", key = "{site.key_path}" }}'
    https = f"https://127.0.0.1:{secure.port}"
    hosts = f"""
        [[hosts]]
        domains = ["force.test"]
        upstream = "{plain.url}"
        {site_tls}
        force_https = true
        hsts = "max-age=600"

        [[hosts]]
        domains = ["secure.test"]
        upstream = "{plain.url}"
        {site_tls}

        [[hosts]]
        domains = ["plain.test"]
        upstream = "{plain.url}"
        hsts = "max-age=600"

        [[hosts]]
        domains = ["acme.test"]
        upstream = "{plain.url}"
        tls = "auto"

        [[hosts]]
        domains = ["verified.test"]
        upstream = "{https}"
        tls_ca = "{ca.cert_path}"
        {site_tls}

        [[hosts]]
        domains = ["system.test"]
        upstream = "{https}"

        [[hosts]]
        domains = ["unverified.test"]
        upstream = "{https}"
        tls_verify = false

        [[hosts]]
        domains = ["misnamed.test"]
        upstream = "https://127.0.0.1:{misnamed.port}"
        tls_ca = "{ca.cert_path}"

        [[hosts]]
        domains = ["ws.test"]
        upstream = "https://127.0.0.1:{secure_ws.port}"
        tls_ca = "{ca.cert_path}"
        {site_tls}

        [[hosts]]
        domains = ["plainport.test"]
        upstream = "http://127.0.0.1:{secure.port}"
    """
    charon = Charon(
        tmp,
        hosts,
        server_toml=f'tls_listen = ["127.0.0.1:{tls_port}"]',
        extra_toml=f"""
            [tls]
            state_dir = "{state_dir}"
            default_certificate = {{ cert = "{site.cert_path}", key = "{site.key_path}" }}
            acme_directory = "https://127.0.0.1:9/directory"
        """,
    )
    try:
        charon.start()
        yield Setup(charon, tls_port, state_dir, plain.port, ca.cert_path)
    finally:
        charon.stop()
        for backend in (plain, secure, misnamed, secure_ws):
            backend.stop()


def exchange(client: Client, request: str, head: bool = False) -> Response:
    client.send(request.encode("latin-1"))
    return client.read_response(head_request=head)


def get(port: int, host: str, path: str = "/") -> Response:
    with Client(port) as client:
        return exchange(client, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n")


# -- force_https --------------------------------------------------------------------------------


def test_force_https_redirects_plain_requests_and_keeps_the_connection(setup: Setup) -> None:
    port = setup.charon.port
    with Client(port) as client:
        resp = exchange(
            client, f"GET /a/b?c=d&e HTTP/1.1\r\nHost: Force.Test:{port}\r\n\r\n"
        )
        assert resp.status == 308
        assert resp.header("Location") == f"https://force.test:{setup.tls_port}/a/b?c=d&e"
        assert resp.body == b"" and resp.header("Content-Length") == "0"
        assert not resp.has("Strict-Transport-Security")  # never over plain http
        # A body is read and dropped; the connection goes on.
        resp = exchange(
            client, "POST /form HTTP/1.1\r\nHost: force.test\r\nContent-Length: 5\r\n\r\nhello"
        )
        assert resp.status == 308
        assert resp.header("Location") == f"https://force.test:{setup.tls_port}/form"
        resp = exchange(client, "HEAD /h HTTP/1.1\r\nHost: force.test\r\n\r\n", head=True)
        assert resp.status == 308 and resp.body == b""
        resp = exchange(client, "GET /x HTTP/1.1\r\nHost: plain.test\r\n\r\n")
        assert resp.status == 200 and resp.json()["backend"] == "plain"


def test_force_https_uses_the_origin_form_of_an_absolute_target(setup: Setup) -> None:
    resp = get(setup.charon.port, "ignored.test", "http://force.test:81/p?q")
    assert resp.status == 308
    assert resp.header("Location") == f"https://force.test:{setup.tls_port}/p?q"


def test_force_https_spares_acme_challenges(setup: Setup) -> None:
    resp = get(setup.charon.port, "force.test", "/.well-known/acme-challenge/NoSuchToken")
    assert resp.status == 200
    assert resp.json()["raw_path"] == "/.well-known/acme-challenge/NoSuchToken"


def test_force_https_answers_websocket_handshakes_too(setup: Setup) -> None:
    with Client(setup.charon.port) as client:
        resp = exchange(client, WS_HEAD.format(host="force.test"))
        assert resp.status == 308
        assert resp.header("Location") == f"https://force.test:{setup.tls_port}/chat"
        assert client.closed_within(5)


def test_plain_requests_say_http_and_get_no_hsts(setup: Setup) -> None:
    resp = get(setup.charon.port, "plain.test", "/echo")
    assert resp.status == 200
    assert not resp.has("Strict-Transport-Security")
    headers = {k.lower(): v for k, v in resp.json()["headers"]}
    assert headers["x-forwarded-proto"] == "http"


# -- ACME HTTP-01 ------------------------------------------------------------------------------


def test_acme_challenge_files_are_answered_by_the_proxy_on_any_host(setup: Setup) -> None:
    token = "Tok_en-123"
    path = http01_path(str(setup.state_dir), token)
    assert path is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    answer = b"Tok_en-123.thumbprint-of-the-account-key"
    path.write_bytes(answer)
    target = f"/.well-known/acme-challenge/{token}"
    for host in ("acme.test", "plain.test", "force.test", "nobody.test"):
        resp = get(setup.charon.port, host, target)
        assert (host, resp.status, resp.body) == (host, 200, answer)
        assert resp.header("Content-Type") == "text/plain"
    with Client(setup.charon.port) as client:
        resp = exchange(client, f"HEAD {target} HTTP/1.1\r\nHost: acme.test\r\n\r\n", head=True)
        assert resp.status == 200 and resp.header("Content-Length") == str(len(answer))
        # Another method is the backend's business.
        resp = exchange(client, f"POST {target} HTTP/1.1\r\nHost: acme.test\r\n\r\n")
        assert resp.status == 200 and resp.json()["method"] == "POST"
    path.write_bytes(b"x" * 5000)
    assert get(setup.charon.port, "acme.test", target).body == b"x" * 4096
    path.unlink()
    resp = get(setup.charon.port, "acme.test", target)
    assert resp.status == 200 and resp.json()["backend"] == "plain"
    assert get(setup.charon.port, "nobody.test", target).status == 404


def test_acme_tokens_cannot_name_other_files(setup: Setup) -> None:
    secret = setup.state_dir / "acme" / "secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(b"private")
    for target in ("/.well-known/acme-challenge/..%2Fsecret",
                   "/.well-known/acme-challenge/%2E%2E%2Fsecret",
                   "/.well-known/acme-challenge/.secret",
                   "/.well-known/acme-challenge/"):
        resp = get(setup.charon.port, "acme.test", target)
        assert b"private" not in resp.body, target
        assert resp.status == 400 or resp.json()["backend"] == "plain", target


# -- https:// backends ---------------------------------------------------------------------------


def test_https_backend_verified_with_a_ca_file(setup: Setup) -> None:
    with Client(setup.charon.port) as client:
        for _ in range(3):  # the pooled TLS connection is reused
            resp = exchange(client, "GET /echo HTTP/1.1\r\nHost: verified.test\r\n\r\n")
            assert resp.status == 200 and resp.json()["backend"] == "secure"
        body = "x" * 100_000
        resp = exchange(
            client,
            f"POST /upload HTTP/1.1\r\nHost: verified.test\r\nContent-Length: {len(body)}"
            f"\r\n\r\n{body}",
        )
        assert resp.status == 200 and resp.json()["length"] == len(body)


def test_https_backend_without_verification(setup: Setup) -> None:
    resp = get(setup.charon.port, "unverified.test", "/echo")
    assert resp.status == 200 and resp.json()["backend"] == "secure"


def test_https_backend_failing_verification_is_502_of_kind_tls(setup: Setup) -> None:
    # First an unverified connection to the same address: it must not be lent to a host
    # that verifies (pools are per address and TLS settings).
    assert get(setup.charon.port, "unverified.test", "/echo").status == 200
    resp = get(setup.charon.port, "system.test", "/echo")  # a private CA: not in the system's
    assert resp.status == 502
    resp = get(setup.charon.port, "misnamed.test", "/echo")  # a good chain for another name
    assert resp.status == 502
    wait_metrics(
        setup.charon,
        lambda s: all(
            value(s, "charon_upstream_errors_total", host=host, kind="tls", reason="tls") == 1
            for host in ("system.test", "misnamed.test")
        ),
        "TLS upstream errors counted",
    )
    # The worker's log line names the backend and what TLS said (test_operator_errors).
    wait_until(lambda: "GET system.test/echo answered 502: upstream " in setup.charon.log()
               and "failed connecting: TLS: self-signed certificate" in setup.charon.log(),
               5, what="the log line")


def test_plain_and_tls_connections_to_one_address_are_never_mixed(setup: Setup) -> None:
    assert get(setup.charon.port, "verified.test", "/echo").status == 200
    # plainport.test speaks plain HTTP to the TLS backend's address: a pooled TLS connection
    # would answer 200; a plain one gets the backend's TLS refusal.
    assert get(setup.charon.port, "plainport.test", "/echo").status == 502


def test_websocket_to_an_https_backend_is_tunnelled(setup: Setup) -> None:
    with RawWs(setup.charon.port) as ws:
        head = ws.upgrade("/echo", "ws.test", b"Sec-WebSocket-Protocol: v1.chat\r\n")
        assert head.get("Sec-WebSocket-Protocol") == "v1.chat"
        ws.send(client_frame(0x1, b"hello over tls"))
        frame = ws.read_frame()
        assert (frame.opcode, frame.payload, frame.masked) == (0x1, b"hello over tls", False)
        big = os.urandom(700_000)  # more than one read of each leg, both ways
        ws.send(client_frame(0x2, big))
        frame = ws.read_frame()
        assert frame.opcode == 0x2 and frame.payload == big
        ws.send(client_frame(0x8, struct.pack("!H", 1000) + b"done"))
        frame = ws.read_frame()
        assert frame.opcode == 0x8 and frame.close_code == 1000
        ws.read_to_end()


def test_https_backend_closing_a_tunnel_reaches_the_client(setup: Setup) -> None:
    with RawWs(setup.charon.port) as ws:
        ws.upgrade("/close/4001", "ws.test")
        frame = ws.read_frame()
        assert frame.opcode == 0x8 and frame.close_code == 4001
        ws.send(client_frame(0x8, struct.pack("!H", 4001)))
        ws.read_to_end()


# -- over TLS (the engine terminates it; real TLS clients) -----------------------------------------


def tls_context(setup: Setup, check_name: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(setup.ca))
    context.check_hostname = check_name
    return context


def tls_client(setup: Setup, sni: str | None) -> Client:
    """A Client whose socket speaks TLS, sending `sni` (None: no SNI, verified all the same)."""
    client = Client(setup.tls_port)
    client.sock = tls_context(setup, sni is not None).wrap_socket(
        client.sock, server_hostname=sni
    )
    return client


def tls_ws(setup: Setup, sni: str) -> RawWs:
    ws = RawWs(setup.tls_port)
    ws.sock = tls_context(setup).wrap_socket(ws.sock, server_hostname=sni)
    return ws


def test_over_tls_requests_say_https_and_get_hsts(setup: Setup) -> None:
    with tls_client(setup, "force.test") as client:
        resp = exchange(client, "GET /echo HTTP/1.1\r\nHost: force.test\r\n\r\n")
        assert resp.status == 200  # force_https redirects plain requests only
        assert resp.all("Strict-Transport-Security") == ["max-age=600"]
        headers = {k.lower(): v for k, v in resp.json()["headers"]}
        assert headers["x-forwarded-proto"] == "https"
        resp = exchange(client, "GET /sts HTTP/1.1\r\nHost: force.test\r\n\r\n")
        assert resp.all("Strict-Transport-Security") == ["max-age=1"]  # the backend's own
    with tls_client(setup, "secure.test") as client:
        resp = exchange(client, "GET /echo HTTP/1.1\r\nHost: secure.test\r\n\r\n")
        assert resp.status == 200 and not resp.has("Strict-Transport-Security")


def test_curl_sees_hsts_over_https(setup: Setup) -> None:
    port = setup.tls_port
    out = subprocess.run(
        ["curl", "-sS", "-i", "--max-time", "10", "--cacert", str(setup.ca),
         "--resolve", f"force.test:{port}:127.0.0.1", f"https://force.test:{port}/echo"],
        capture_output=True, timeout=20, check=True,
    ).stdout.decode("latin-1").lower()
    assert out.startswith("http/1.1 200")
    assert "\r\nstrict-transport-security: max-age=600\r\n" in out


def test_421_when_host_is_another_proxy_host_than_sni(setup: Setup) -> None:
    with tls_client(setup, "force.test") as client:
        resp = exchange(client, "GET /echo HTTP/1.1\r\nHost: secure.test\r\n\r\n")
        assert resp.status == 421
        assert resp.body.startswith(b"421 Misdirected Request")
        resp = exchange(client, "GET /echo HTTP/1.1\r\nHost: nobody.test\r\n\r\n")
        assert resp.status == 421  # the SNI name's host is not "no host"
        resp = exchange(client, "GET /echo HTTP/1.1\r\nHost: force.test:443\r\n\r\n")
        assert resp.status == 200  # the connection goes on
    with tls_client(setup, None) as client:  # no SNI (the default certificate): no 421
        resp = exchange(client, "GET /echo HTTP/1.1\r\nHost: secure.test\r\n\r\n")
        assert resp.status == 200
    with tls_ws(setup, "force.test") as ws:  # a handshake the front door plans
        ws.send(WS_HEAD.format(host="ws.test").encode())
        head, body = ws.read_response()
        assert head.status == 421 and body.startswith(b"421 ")


def test_https_request_to_an_https_backend(setup: Setup) -> None:
    with tls_client(setup, "verified.test") as client:
        resp = exchange(client, "GET /echo HTTP/1.1\r\nHost: verified.test\r\n\r\n")
        assert resp.status == 200 and resp.json()["backend"] == "secure"


def test_wss_to_an_https_backend(setup: Setup) -> None:
    with tls_ws(setup, "ws.test") as ws:
        ws.upgrade("/echo", "ws.test")
        payload = os.urandom(200_000)
        ws.send(client_frame(0x2, payload))
        frame = ws.read_frame()
        assert frame.opcode == 0x2 and frame.payload == payload
        ws.send(client_frame(0x8, struct.pack("!H", 1000)))
        assert ws.read_frame().close_code == 1000


# -- the plan's decisions for TLS connections (plan_request itself) ------------------------------

PLAN_CONFIG = """
[server]
listen = ["127.0.0.1:8080"]
tls_listen = ["127.0.0.1:443"]

[[hosts]]
domains = ["a.test", "*.wild.test"]
upstream = "http://127.0.0.1:9001"
force_https = true
hsts = "max-age=60"
tls = {{ cert = "{cert}", key = "{key}" }}

[[hosts]]
domains = ["b.test"]
upstream = "http://127.0.0.1:9002"
tls = {{ cert = "{cert}", key = "{key}" }}

[[hosts]]
domains = ["*"]
upstream = "http://127.0.0.1:9003"
"""


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Router:
    ca = TestCA(tmp_path_factory.mktemp("plan_ca"))
    leaf = ca.issue(["a.test", "*.wild.test", "b.test"])
    config = load_config_text(PLAN_CONFIG.format(cert=leaf.cert_path, key=leaf.key_path), "p.toml")
    return config_router(config, lambda upstream: None)  # type: ignore[arg-type,return-value]


def plan(router: Router, host: str, sni: str | None | bool, path: str = "/x") -> object:
    """plan_request for a GET; `sni` False: a plain connection."""
    tls = None if sni is False else TlsInfo(sni or None, "http/1.1", "TLSv1.3", "X", False)
    try:
        return plan_request(b"GET", path.encode(), "1.1", [(b"Host", host.encode())],
                            "10.0.0.1", tls, router, ForwardedPolicy(()))
    except HttpError as error:
        return error


def test_421_when_host_and_sni_name_different_proxy_hosts(router: Router) -> None:
    def status(host: str, sni: str | None) -> int:
        result = plan(router, host, sni)
        return result.status if isinstance(result, HttpError) else 200

    assert status("a.test", "a.test") == 200
    assert status("x.wild.test", "a.test") == 200  # one proxy host, two of its names
    assert status("b.test", "a.test") == 421
    assert status("a.test", "b.test") == 421
    assert status("unknown.test", "other.test") == 200  # both the catch-all
    assert status("a.test", "unknown.test") == 421  # the catch-all counts as a host
    assert status("unknown.test", "b.test") == 421
    assert status("b.test", None) == 200  # no SNI: nothing to compare


def test_tls_plans_say_https_and_carry_hsts(router: Router) -> None:
    result = plan(router, "a.test", "a.test")
    assert not isinstance(result, HttpError)
    assert b"\r\nX-Forwarded-Proto: https\r\n" in result.head  # type: ignore[attr-defined]
    assert result.hsts == b"max-age=60"  # type: ignore[attr-defined]
    assert plan(router, "b.test", "b.test").hsts is None  # type: ignore[attr-defined]


def test_redirect_to_port_443_names_no_port(router: Router) -> None:
    result = plan(router, "a.test:8080", False, "/p?q=1")
    assert isinstance(result, HttpError) and result.status == 308
    assert result.fields == b"Location: https://a.test/p?q=1\r\n"


def test_forwarded_element_says_proto_https_over_tls(router: Router) -> None:
    policy = ForwardedPolicy(load_config_text(
        '[server]\nlisten = ["127.0.0.1:1"]\ntrusted_proxies = ["10.0.0.0/8"]\n'
        '[[hosts]]\ndomains = ["*"]\nupstream = "http://127.0.0.1:2"\n', "t.toml"
    ).server.trusted_proxies)
    headers = [(b"Host", b"b.test"), (b"Forwarded", b"for=1.2.3.4")]
    tls = TlsInfo("b.test", None, "TLSv1.2", "X", True)
    result = plan_request(b"GET", b"/", "1.1", headers, "10.0.0.1", tls, router, policy)
    assert b"\r\nForwarded: for=1.2.3.4, for=10.0.0.1;proto=https\r\n" in result.head
    result = plan_request(b"GET", b"/", "1.1", headers, "10.0.0.1", None, router, policy)
    assert b"\r\nForwarded: for=1.2.3.4, for=10.0.0.1\r\n" in result.head
