"""TLS listeners end to end (issue 12): versions, the certificate chosen by SNI (exact, wildcard,
unknown, none, the catch-all host, the default certificate), ALPN, HTTPS requests through to a
real backend, session resumption (also across workers) and IPv6. Every client verifies the chain
against the throwaway CA of tests/tlsca.py: Python ssl, curl and openssl s_client."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from backends.http_backend import pattern
from harness import HOST, Backend
from test_reload import owner
from tlsca import Leaf, TestCA
from tlsenv import (
    HttpsConnection,
    TlsCharon,
    client_context,
    curl,
    handshake,
    header,
    https_json,
    running_tls_charon,
    s_client,
    same_certificate,
    tls_table,
)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = _ipv6_loopback()


@dataclass
class Env:
    ca: TestCA
    app: Leaf  # app.example.com
    wild: Leaf  # *.example.org
    default: Leaf  # [tls] default_certificate of `with_default`
    catch_all: Leaf  # the "*" host's certificate in `with_catch_all`
    backend: Backend
    strict: TlsCharon  # no default certificate, no "*" host; 2 workers; IPv6 too
    with_default: TlsCharon
    with_catch_all: TlsCharon


def _hosts(env_backend: Backend, app: Leaf, wild: Leaf, extra: str = "") -> str:
    return f"""
        [[hosts]]
        domains = ["app.example.com"]
        upstream = "{env_backend.url}"
        tls = {tls_table(app)}

        [[hosts]]
        domains = ["*.example.org"]
        upstream = "{env_backend.url}"
        tls = {tls_table(wild)}

        [[hosts]]
        domains = ["plain.example.net"]
        upstream = "{env_backend.url}"
        {extra}
        """


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("tls-listener")
    ca = TestCA(tmp / "ca")
    app = ca.issue(["app.example.com"])
    wild = ca.issue(["*.example.org"], key_type="rsa")
    default = ca.issue(["default.test"])
    catch_all = ca.issue(["catchall.test", HOST])
    backend = Backend("http_backend.py")
    try:
        hosts = _hosts(backend, app, wild)
        listen = [f"{HOST}:{{port}}"] + (["[::1]:{port}"] if IPV6 else [])
        strict = TlsCharon(tmp, hosts, workers=2, tls_listen=listen)
        default_toml = f'default_certificate = {tls_table(default)}'
        catch_all_host = f"""
            [[hosts]]
            domains = ["*"]
            upstream = "{backend.url}"
            tls = {tls_table(catch_all)}
            """
        with running_tls_charon(tmp, hosts, workers=1, tls_toml=default_toml) as with_default, \
                running_tls_charon(tmp, hosts + catch_all_host) as with_catch_all:
            strict.start()
            try:
                yield Env(ca, app, wild, default, catch_all, backend, strict, with_default,
                          with_catch_all)
            finally:
                strict.stop()
    finally:
        backend.stop()


# -- versions and certificate selection -------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_tls_versions(env: Env, version: ssl.TLSVersion) -> None:
    ctx = client_context(env.ca, minimum=version, maximum=version)
    done = handshake(env.strict.tls_port, "app.example.com", ctx, request_host="app.example.com")
    assert done.version == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                            ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert same_certificate(done.certificate, env.app)
    if version == ssl.TLSVersion.TLSv1_2:
        assert "GCM" in done.cipher or "CHACHA20" in done.cipher, done.cipher


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_refused(env: Env) -> None:
    ctx = client_context(env.ca, maximum=ssl.TLSVersion.TLSv1_1)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    # OpenSSL 3's default security level would stop the client itself from offering 1.1.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL|PROTOCOL_VERSION|ALERT"):
        handshake(env.strict.tls_port, "app.example.com", ctx)


@pytest.mark.parametrize(("name", "which"), [
    ("app.example.com", "app"),
    ("a.example.org", "wild"),
    ("b.example.org", "wild"),
])
def test_certificate_chosen_by_sni(env: Env, name: str, which: str) -> None:
    """Exact and wildcard names, hostname checked by the client against the chain it got."""
    for charon in (env.strict, env.with_default, env.with_catch_all):
        done = handshake(charon.tls_port, name, client_context(env.ca))
        assert same_certificate(done.certificate, getattr(env, which)), (charon.tls_port, name)


@pytest.mark.parametrize("name", [
    "unknown.example.com",
    "example.org",  # a wildcard covers one label, never the bare suffix
    "x.a.example.org",
    "plain.example.net",  # a proxy host without a certificate of its own
])
def test_unknown_sni_without_default_is_unrecognized_name(env: Env, name: str) -> None:
    ctx = client_context(env.ca, check_hostname=False)
    with pytest.raises(ssl.SSLError, match="TLSV1_UNRECOGNIZED_NAME"):
        handshake(env.strict.tls_port, name, ctx)


def test_no_sni_without_default_gets_no_certificate(env: Env) -> None:
    """An IP literal sends no SNI: no host's certificate is the right one to show."""
    ctx = client_context(env.ca, check_hostname=False)
    with pytest.raises(ssl.SSLError):
        handshake(env.strict.tls_port, HOST, ctx)


@pytest.mark.parametrize("name", ["unknown.example.com", "plain.example.net", None])
def test_unknown_or_no_sni_gets_default_certificate(env: Env, name: str | None) -> None:
    ctx = client_context(env.ca, check_hostname=False)
    done = handshake(env.with_default.tls_port, name, ctx)
    assert same_certificate(done.certificate, env.default)


@pytest.mark.parametrize("name", ["unknown.example.com", HOST])
def test_catch_all_host_certificate(env: Env, name: str) -> None:
    """The "*" host's certificate for names no other host has (the chain verifies; the name
    cannot), and without SNI (an IP literal, which the certificate names)."""
    ctx = client_context(env.ca, check_hostname=name == HOST)
    done = handshake(env.with_catch_all.tls_port, name, ctx, request_host=name)
    assert same_certificate(done.certificate, env.catch_all)


# -- ALPN -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("offered", "chosen"), [
    (["h2", "http/1.1"], "http/1.1"),
    (["http/1.1"], "http/1.1"),
    (None, None),
])
def test_alpn(env: Env, offered: list[str] | None, chosen: str | None) -> None:
    ctx = client_context(env.ca, alpn=offered)
    done = handshake(env.strict.tls_port, "app.example.com", ctx, request_host="app.example.com")
    assert done.alpn == chosen


# -- HTTPS through to the backend ------------------------------------------------------------


def test_get_post_keepalive_and_forwarded_proto(env: Env) -> None:
    conn = HttpsConnection("app.example.com", env.strict.tls_port, client_context(env.ca))
    try:
        for i in range(5):
            status, echo = https_json(conn, "GET", f"/echo/{i}")
            assert status == 200
            assert echo["raw_path"] == f"/echo/{i}"
            assert header(echo, "X-Forwarded-Proto") == ["https"]
            assert header(echo, "X-Forwarded-Host") == [f"app.example.com:{env.strict.tls_port}"]
        sock = conn.sock
        body = os.urandom(300_000)
        status, up = https_json(conn, "POST", "/upload", body=body)
        assert status == 200
        assert (up["length"], up["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
        assert conn.sock is sock, "keep-alive: every request on one TLS connection"
    finally:
        conn.close()


def test_large_download_and_chunked_upload(env: Env) -> None:
    """Bodies bigger than any buffer on the way, both directions, on one TLS connection."""
    size = 5_000_000
    want = hashlib.sha256(b"".join(pattern(size))).hexdigest()
    conn = HttpsConnection("app.example.com", env.strict.tls_port, client_context(env.ca),
                           timeout=20)
    try:
        for chunked in ("0", "1"):
            conn.request("GET", f"/bytes/{size}?chunked={chunked}")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200
            assert (len(body), hashlib.sha256(body).hexdigest()) == (size, want)
        blocks = [os.urandom(65536) for _ in range(40)]
        conn.request("POST", "/chunks", body=iter(blocks), encode_chunked=True,
                     headers={"Transfer-Encoding": "chunked"})
        response = conn.getresponse()
        got = json.loads(response.read())
        joined = b"".join(blocks)
        assert (got["length"], got["sha256"]) == (len(joined), hashlib.sha256(joined).hexdigest())
    finally:
        conn.close()


def test_forwarded_proto_cannot_be_forged_over_tls(env: Env) -> None:
    conn = HttpsConnection("b.example.org", env.strict.tls_port, client_context(env.ca))
    try:
        status, echo = https_json(conn, "GET", "/echo", headers={"X-Forwarded-Proto": "http"})
        assert status == 200
        assert header(echo, "X-Forwarded-Proto") == ["https"]
    finally:
        conn.close()


def test_host_naming_another_proxy_host_than_sni_is_421(env: Env) -> None:
    conn = HttpsConnection("app.example.com", env.strict.tls_port, client_context(env.ca))
    try:
        conn.request("GET", "/echo", headers={"Host": "a.example.org"})
        response = conn.getresponse()
        response.read()
        assert response.status == 421
    finally:
        conn.close()


def test_curl(env: Env) -> None:
    for name in ("app.example.com", "c.example.org"):
        done = curl(env.strict.tls_port, name, env.ca, "/echo/curl", "-w", "\n%{http_code}",
                    "-H", "X-Test: curl")
        assert done.returncode == 0, done.stderr
        body, _, code = done.stdout.rpartition("\n")
        assert code == "200", done.stdout
        assert '"X-Forwarded-Proto", "https"' in body, body
    refused = curl(env.strict.tls_port, "unknown.example.com", env.ca)
    assert refused.returncode != 0


def test_openssl_s_client(env: Env) -> None:
    request = (b"GET /echo/s_client HTTP/1.1\r\nHost: app.example.com\r\n"
               b"Connection: close\r\n\r\n")
    done = s_client(env.strict.tls_port, "app.example.com", env.ca, request,
                    "-alpn", "h2,http/1.1")
    assert "Verify return code: 0 (ok)" in done.stdout, done.stdout + done.stderr
    assert "ALPN protocol: http/1.1" in done.stdout, done.stdout
    assert "HTTP/1.1 200 " in done.stdout, done.stdout
    assert "/echo/s_client" in done.stdout
    wild = s_client(env.strict.tls_port, "z.example.org", env.ca,
                    b"GET / HTTP/1.1\r\nHost: z.example.org\r\nConnection: close\r\n\r\n",
                    "-tls1_2")
    assert "Verify return code: 0 (ok)" in wild.stdout, wild.stdout
    assert "Protocol  : TLSv1.2" in wild.stdout, wild.stdout
    assert "HTTP/1.1 200 " in wild.stdout, wild.stdout


# -- session resumption ----------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_session_resumption(env: Env, version: ssl.TLSVersion) -> None:
    ctx = client_context(env.ca, minimum=version, maximum=version)
    port = env.strict.tls_port
    first = handshake(port, "app.example.com", ctx, request_host="app.example.com")
    assert not first.reused and first.session is not None
    again = handshake(port, "app.example.com", ctx, session=first.session,
                      request_host="app.example.com")
    assert again.reused
    assert same_certificate(again.certificate, env.app)


def test_session_resumption_across_workers(env: Env) -> None:
    """Sessions from one worker resume on the other (ticket keys shared by the workers)."""
    ctx = client_context(env.ca)
    port = env.strict.tls_port
    workers = set(env.strict.worker_pids())
    assert len(workers) == 2
    first = handshake(port, "app.example.com", ctx, request_host="app.example.com")
    assert first.session is not None

    def resume(_: int) -> tuple[bool, int | None]:
        with socket.create_connection((HOST, port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="app.example.com",
                                session=first.session) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
            assert s.recv(65536)  # the connection stays open: find who serves it
            return bool(s.session_reused), owner(port, s.getsockname()[1], workers)

    results: list[tuple[bool, int | None]] = []
    with ThreadPoolExecutor(8) as pool:
        for _ in range(6):  # until both workers took some (the kernel decides who accepts)
            results += pool.map(resume, range(16))
            if {pid for _, pid in results} >= workers:
                break
    assert {pid for _, pid in results} >= workers, f"one worker took every connection: {results}"
    assert all(reused for reused, _ in results), results


# -- IPv6 -------------------------------------------------------------------------------------


@pytest.mark.skipif(not IPV6, reason="no IPv6 loopback on this machine")
def test_ipv6_tls_listener(env: Env) -> None:
    done = handshake(env.strict.tls_port, "a.example.org", client_context(env.ca),
                     request_host="a.example.org", address="::1")
    assert same_certificate(done.certificate, env.wild)
    conn = HttpsConnection("app.example.com", env.strict.tls_port, client_context(env.ca),
                           address="::1")
    try:
        status, echo = https_json(conn, "GET", "/echo/v6")
        assert status == 200
        assert header(echo, "X-Forwarded-For") == ["::1"]
        assert header(echo, "X-Forwarded-Proto") == ["https"]
    finally:
        conn.close()

