"""Forward authentication end to end: a real `charon run` asking a real small auth service
(backends/auth_backend.py, aiohttp, its answer chosen by the client's query) before proxying to
http_backend.py (which echoes the head it received) or ws_backend.py (WebSocket)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from harness import HOST, Backend, Charon, free_port
from rawconn import RawConn
from test_websocket_handshake import Head, client_frame, ws_request

COPY = '["Remote-User", "remote-groups"]'


@dataclass
class Env:
    charon: Charon
    auth: Backend
    http: Backend
    ws: Backend


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    auth = Backend("auth_backend.py")
    http = Backend("http_backend.py")
    ws = Backend("ws_backend.py")
    verify = f"{auth.url}/api/verify?from=charon"
    nowhere = f"http://{HOST}:{free_port()}/verify"  # nothing listens there
    alice = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    hosts = f"""
        [[hosts]]
        domains = ["app.test"]
        upstream = "{http.url}"
        forward_auth = {{ url = "{verify}", copy_headers = {COPY}, timeout = "1s" }}

        [[hosts]]
        domains = ["down.test"]
        upstream = "{http.url}"
        forward_auth = {{ url = "{nowhere}", copy_headers = ["Remote-User"] }}

        [[hosts]]
        domains = ["both.test"]
        upstream = "{http.url}"
        basic_auth = {{ users = {{ alice = "{alice}" }} }}
        forward_auth = {{ url = "{verify}", copy_headers = {COPY} }}

        [[hosts]]
        domains = ["ws.test"]
        upstream = "{ws.url}"
        forward_auth = {{ url = "{verify}", copy_headers = {COPY} }}
        """
    try:
        charon = Charon(tmp_path_factory.mktemp("fwd"), hosts, workers=2)
        try:
            charon.start()
            yield Env(charon, auth, http, ws)
        finally:
            charon.stop()
    finally:
        for backend in (auth, http, ws):
            backend.stop()


def connect(env: Env) -> RawConn:
    """One raw keep-alive client connection."""
    return RawConn(socket.create_connection((HOST, env.charon.port), 10))


def tag() -> str:
    return uuid.uuid4().hex[:10]


def get(host: str, target: str, extra: bytes = b"") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra + b"\r\n"


def fetch(env: Env, host: str, target: str, extra: bytes = b"") -> tuple[Head, bytes]:
    with connect(env) as conn:
        return conn.response(get(host, target, extra))


def asked(env: Env, marker: str) -> list[dict]:  # type: ignore[type-arg]
    """What the auth service received for requests whose URI holds `marker`."""
    with urllib.request.urlopen(f"{env.auth.url}/seen", timeout=5) as r:
        entries = json.loads(r.read())
    return [e for e in entries
            if any(n == "X-Forwarded-Uri" and marker in v for n, v in e["headers"])]


def fields_of(pairs: list[list[str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in pairs:
        out.setdefault(name.lower(), []).append(value)
    return out


def test_allowed_with_the_answer_fields_copied(env: Env) -> None:
    t = tag()
    spoof = (b"Remote-User: mallory\r\nremote-groups: root\r\nCookie: session=1\r\n"
             b"Authorization: Bearer tok\r\nConnection: X-Drop-Me\r\nX-Drop-Me: 1\r\n"
             b"X-Forwarded-Uri: /forged\r\n")
    head, body = fetch(env, "app.test", f"/echo?allow-{t}", spoof)
    assert head.status == 200, head.raw
    upstream = fields_of(json.loads(body)["headers"])
    assert upstream["remote-user"] == ["alice"]
    assert upstream["remote-groups"] == ["admins"]
    assert "x-not-copied" not in upstream
    assert upstream["authorization"] == ["Bearer tok"]  # (only basic auth consumes it)
    [question] = asked(env, t)
    assert question["method"] == "GET" and question["path"] == "/api/verify?from=charon"
    sent = fields_of(question["headers"])
    assert sent["host"] == [env.auth.url.removeprefix("http://")]
    assert sent["x-forwarded-method"] == ["GET"]
    assert sent["x-forwarded-proto"] == ["http"]
    assert sent["x-forwarded-host"] == ["app.test"]
    assert sent["x-forwarded-uri"] == [f"/echo?allow-{t}"]
    assert sent["x-forwarded-for"] == ["127.0.0.1"]
    assert sent["cookie"] == ["session=1"]
    assert sent["authorization"] == ["Bearer tok"]
    assert "x-drop-me" not in sent  # named by Connection: hop-by-hop


def test_a_client_cannot_claim_remote_user(env: Env) -> None:
    t = tag()
    head, body = fetch(env, "app.test", f"/echo?anonymous-{t}",
                       b"Remote-User: admin\r\nREMOTE-GROUPS: admins\r\n")
    assert head.status == 200
    upstream = fields_of(json.loads(body)["headers"])
    assert "remote-user" not in upstream and "remote-groups" not in upstream


def test_a_redirect_to_the_login_page_is_relayed(env: Env) -> None:
    t = tag()
    head, body = fetch(env, "app.test", f"/echo?login-{t}")
    assert head.status == 302
    assert head.get("Location") == f"http://login.test/?rd=app.test/echo?login-{t}"
    assert (head.get("Set-Cookie") or "").startswith("flow=abc")
    assert head.get("Content-Type") == "text/html; charset=utf-8"
    assert [n for n, _ in head.headers if n.lower() == "content-type"] == ["Content-Type"]
    assert body == b"<a>log in</a>"


def test_a_refusal_is_relayed_with_its_body_and_the_connection_goes_on(env: Env) -> None:
    t = tag()
    with connect(env) as conn:
        head, body = conn.response(get("app.test", f"/echo?deny-{t}"))
        assert head.status == 401
        assert head.get("WWW-Authenticate") == "Bearer" and head.get("X-Reason") == "nope"
        assert body == b"no entry"
        head, body = conn.response(get("app.test", f"/echo?allow-{t}"))
        assert head.status == 200 and json.loads(body)["raw_path"] == f"/echo?allow-{t}"
        # A POST's body waits for the answer, then goes to the backend.
        data = b"y" * 50_000
        head, body = conn.response(
            f"POST /upload?allow-{t}-post HTTP/1.1\r\nHost: app.test\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        assert head.status == 200 and json.loads(body)["length"] == len(data)
    [question] = asked(env, f"{t}-post")
    sent = fields_of(question["headers"])
    assert sent["x-forwarded-method"] == ["POST"]
    assert "content-length" not in sent and "transfer-encoding" not in sent


def test_basic_auth_first_and_its_password_goes_to_no_one_else(env: Env) -> None:
    t = tag()
    right = b"Authorization: Basic " + base64.b64encode(b"alice:pw") + b"\r\n"
    wrong = b"Authorization: Basic " + base64.b64encode(b"alice:no") + b"\r\n"
    assert fetch(env, "both.test", f"/echo?allow-{t}-wrong", wrong)[0].status == 401
    assert asked(env, f"{t}-wrong") == []  # refused before the service is asked
    head, body = fetch(env, "both.test", f"/echo?allow-{t}", right)
    assert head.status == 200
    upstream = fields_of(json.loads(body)["headers"])
    assert upstream["remote-user"] == ["alice"] and "authorization" not in upstream
    [question] = asked(env, t)
    assert "authorization" not in fields_of(question["headers"])


def test_auth_service_down_is_502(env: Env) -> None:
    head, body = fetch(env, "down.test", "/echo?allow")
    assert head.status == 502
    assert body.startswith(b"502 Bad Gateway")


def test_slow_auth_service_is_504(env: Env) -> None:
    head, _ = fetch(env, "app.test", f"/echo?slow-{tag()}")
    assert head.status == 504


def test_an_answer_too_large_is_502(env: Env) -> None:
    head, _ = fetch(env, "app.test", f"/echo?huge-{tag()}")
    assert head.status == 502


def test_websocket_handshake_through_forward_auth(env: Env) -> None:
    with connect(env) as conn:
        head, _ = conn.response(ws_request("/headers?allow", "ws.test",
                                           extra=b"Remote-User: mallory\r\n"))
        assert head.status == 101, head.raw
        while True:  # the first message: the handshake's fields, as the backend saw them
            if len(conn.buf) >= 4:
                size = conn.buf[1] & 0x7F
                start = 4 if size == 126 else 2
                size = int.from_bytes(conn.buf[2:4]) if size == 126 else size
                if len(conn.buf) >= start + size:
                    break
            assert conn.fill()
        seen = fields_of(json.loads(bytes(conn.buf[start:start + size])))
        assert seen["remote-user"] == ["alice"] and seen["remote-groups"] == ["admins"]
        conn.sock.sendall(client_frame(0x8, b"\x03\xe8"))
    with connect(env) as conn:
        head, body = conn.response(ws_request("/echo?deny", "ws.test"))
        assert head.status == 401 and body == b"no entry"


def test_an_https_auth_service_with_a_private_ca(tmp_path: Path) -> None:
    """`forward_auth = { url = "https://...", tls_ca }`: the service's certificate is verified
    against that bundle (copied fields arrive); without the bundle, the same service's
    certificate is not trusted and the client gets 502, never the backend's answer."""
    from harness import running_charon
    from tlsca import TestCA

    ca = TestCA(tmp_path / "ca")
    leaf = ca.issue([HOST])
    auth = Backend("auth_backend.py", "--tls-cert", str(leaf.cert_path),
                   "--tls-key", str(leaf.key_path))
    http = Backend("http_backend.py")
    verify = f"https://{HOST}:{auth.port}/api/verify"
    hosts = f"""
        [[hosts]]
        domains = ["private-ca.test"]
        upstream = "{http.url}"
        forward_auth = {{ url = "{verify}", copy_headers = {COPY}, tls_ca = "{ca.cert_path}" }}

        [[hosts]]
        domains = ["system-ca.test"]
        upstream = "{http.url}"
        forward_auth = {{ url = "{verify}", copy_headers = {COPY} }}
        """
    try:
        with running_charon(tmp_path, hosts) as charon, \
                RawConn(socket.create_connection((HOST, charon.port), 10)) as conn:
            head, body = conn.response(get("private-ca.test", "/echo?allow"))
            assert head.status == 200, head.raw
            assert fields_of(json.loads(body)["headers"])["remote-user"] == ["alice"]
            head, body = conn.response(get("private-ca.test", "/echo?deny"))
            assert head.status == 401, head.raw  # (the service's own answer, relayed)
            head, body = conn.response(get("system-ca.test", "/echo?allow"))
            assert head.status == 502, head.raw
            assert b"alice" not in body
    finally:
        auth.stop()
        http.stop()


def test_tls_ca_needs_an_https_url(tmp_path: Path) -> None:
    from charon.config import ConfigError, load_config_text

    text = ('[[hosts]]\ndomains = ["a.test"]\nupstream = "http://127.0.0.1:9"\n'
            'forward_auth = { url = "http://127.0.0.1:9/v", tls_ca = "ca.pem" }\n')
    with pytest.raises(ConfigError, match="tls_ca.*needs an https:// url"):
        load_config_text(text, str(tmp_path / "c.toml"))


def test_questions_reuse_a_kept_alive_connection(env: Env) -> None:
    """Successive questions from one worker go on one connection to the service, not one
    each (a handshake and a TIME_WAIT socket per request)."""
    t = tag()
    with connect(env) as conn:  # (one client connection: one worker asks every question)
        for i in range(4):
            head, _ = conn.response(get("app.test", f"/echo?allow-{t}-{i}"))
            assert head.status == 200, head.raw
    ports = {question["peer_port"] for question in asked(env, t)}
    assert len(asked(env, t)) == 4
    assert len(ports) == 1, ports


def test_a_connection_the_service_closed_is_not_reused(tmp_path: Path) -> None:
    """The service closes idle connections after 0.3 s: the next question, 1 s later, is
    answered on a new connection (the closed one is noticed, or asked again), never a 502."""
    from harness import running_charon

    auth = Backend("auth_backend.py", "--keepalive", "0.3")
    http = Backend("http_backend.py")
    hosts = f"""
        [[hosts]]
        domains = ["app.test"]
        upstream = "{http.url}"
        forward_auth = {{ url = "{auth.url}/v", copy_headers = {COPY} }}
        """
    try:
        with running_charon(tmp_path, hosts) as charon, \
                RawConn(socket.create_connection((HOST, charon.port), 10)) as conn:
            t = tag()
            for i in range(3):
                head, _ = conn.response(get("app.test", f"/echo?allow-{t}-{i}"))
                assert head.status == 200, head.raw
                time.sleep(1.0)
            with urllib.request.urlopen(f"{auth.url}/seen", timeout=5) as r:
                ports = {e["peer_port"] for e in json.loads(r.read())}
            assert len(ports) == 3, ports
    finally:
        auth.stop()
        http.stop()


def test_idle_connections_are_bounded_and_expire() -> None:
    from charon.config.model import Upstream
    from charon.worker.access.authconns import AuthConnections

    async def run() -> None:
        accepted: list[object] = []  # (the service's ends, kept open)
        server = await asyncio.start_server(lambda r, w: accepted.append(w), HOST, 0)
        port = server.sockets[0].getsockname()[1]
        service = Upstream(f"http://{HOST}:{port}", HOST, port)
        pool = AuthConnections(max_idle=2, idle_timeout=60.0)
        made = [await asyncio.open_connection(HOST, port) for _ in range(3)]
        for connection in made:
            pool.give_back(service, connection)
        assert pool.idle_count(service) == 2
        assert made[0][1].transport.is_closing()  # the oldest went
        assert pool.take(service) == made[2]  # the most recently used first
        made[1][1].transport.abort()  # (the service closed it)
        await asyncio.sleep(0)
        assert pool.take(service) is None and pool.idle_count(service) == 0
        expiring = AuthConnections(idle_timeout=0.0)
        connection = await asyncio.open_connection(HOST, port)
        expiring.give_back(service, connection)
        await asyncio.sleep(0.01)
        assert expiring.take(service) is None
        assert connection[1].transport.is_closing()
        server.close()

    asyncio.run(run())
