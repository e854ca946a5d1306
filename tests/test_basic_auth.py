"""Basic authentication end to end: a real `charon run` in front of http_backend.py (which echoes
the head it received) and ws_backend.py (WebSocket handshakes), with users hashed by bcrypt and
argon2 inline and in an htpasswd file this test writes. Hashes use low costs so the file runs
fast; the proxy verifies whatever cost a hash names. Client addresses are chosen by binding the
client socket to 127.0.0.x (the failure budget is per client IP)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import argon2
import bcrypt
import pytest
from harness import HOST, REPO, Backend, Charon
from rawconn import RawConn
from test_websocket_handshake import Head, client_frame, ws_request

FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
CHALLENGE = 'Basic realm="Staff only", charset="UTF-8"'


@dataclass
class Env:
    charon: Charon
    http: Backend
    ws: Backend


def _bcrypt(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("basic")
    htpasswd = tmp / "users.htpasswd"
    htpasswd.write_text(f"# made by the test\ncarol:{_bcrypt('carol-pw')}\n"
                        f"dave:{_bcrypt('dävë-pw')}\n")
    http = Backend("http_backend.py")
    ws = Backend("ws_backend.py")
    users = (f'alice = "{_bcrypt("alice-pw")}", '
             f'bob = "{FAST_ARGON2.hash("bob-pw")}", "zoë" = "{_bcrypt("zoë-pw")}", '
             f'erin = "{_bcrypt("erin-pw")}"')
    hosts = f"""
        [[hosts]]
        domains = ["bcrypt.test"]
        upstream = "{http.url}"
        basic_auth = {{ realm = "Staff only", users = {{ {users} }} }}

        [[hosts.locations]]
        path = "/public/"
        upstream = "{http.url}"
        basic_auth = false

        [[hosts]]
        domains = ["file.test"]
        upstream = "{http.url}"
        basic_auth = {{ htpasswd = "{htpasswd}" }}

        [[hosts]]
        domains = ["forwarded.test"]
        upstream = "{http.url}"
        basic_auth = {{ users = {{ {users} }}, forward_authorization = true }}

        [[hosts]]
        domains = ["ws.test"]
        upstream = "{ws.url}"
        basic_auth = {{ realm = "Staff only", users = {{ {users} }} }}
        """
    try:
        charon = Charon(tmp, hosts, workers=2)
        try:
            charon.start()
            yield Env(charon, http, ws)
        finally:
            charon.stop()
    finally:
        http.stop()
        ws.stop()


def connect(env: Env, source: str = "127.0.0.1") -> RawConn:
    """One raw keep-alive client connection from a chosen source address."""
    return RawConn(socket.create_connection((HOST, env.charon.port), 10, (source, 0)))


def basic(user: str, password: str) -> bytes:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Authorization: Basic {token}\r\n".encode()


def get(host: str, path: str = "/echo", extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra + b"\r\n"


def fetch(env: Env, host: str, extra: bytes = b"", source: str = "127.0.0.1",
          path: str = "/echo") -> tuple[Head, bytes]:
    with connect(env, source) as conn:
        return conn.response(get(host, path, extra))


def seen_fields(body: bytes) -> dict[str, str]:
    return {name.lower(): value for name, value in json.loads(body)["headers"]}


def assert_refused(head: Head, body: bytes, challenge: str = CHALLENGE) -> None:
    assert head.status == 401, head.raw
    assert head.get("WWW-Authenticate") == challenge
    assert body == b"401 Unauthorized: authentication required\n"


@pytest.mark.parametrize(("user", "password"), [
    ("alice", "alice-pw"),  # bcrypt
    ("bob", "bob-pw"),  # argon2id
    ("zoë", "zoë-pw"),  # a UTF-8 user name (RFC 7617 charset)
])
def test_right_password(env: Env, user: str, password: str) -> None:
    head, body = fetch(env, "bcrypt.test", basic(user, password))
    assert head.status == 200, head.raw
    fields = seen_fields(body)
    assert "authorization" not in fields  # consumed by the proxy


@pytest.mark.parametrize(("user", "password"), [
    ("alice", "wrong"), ("bob", "wrong"), ("nobody", "alice-pw"), ("alice", ""),
])
def test_wrong_password(env: Env, user: str, password: str) -> None:
    head, body = fetch(env, "bcrypt.test", basic(user, password), source="127.0.0.2")
    assert_refused(head, body)


@pytest.mark.parametrize("extra", [
    b"",  # no credentials
    b"Authorization: Bearer abc\r\n",
    b"Authorization: Basic !!!not-base64\r\n",
    b"Authorization: Basic " + base64.b64encode(b"no colon") + b"\r\n",
    b"Authorization: Basic " + base64.b64encode(b"alice:\xff\xfe") + b"\r\n",
    b"Authorization: Basic " + base64.b64encode(b"\xff:alice-pw") + b"\r\n",
])
def test_missing_or_malformed_credentials_are_401(env: Env, extra: bytes) -> None:
    head, body = fetch(env, "bcrypt.test", extra, source="127.0.0.3")
    assert_refused(head, body)


def test_htpasswd_file_with_bcrypt(env: Env) -> None:
    assert fetch(env, "file.test", basic("carol", "carol-pw"))[0].status == 200
    assert fetch(env, "file.test", basic("dave", "dävë-pw"))[0].status == 200
    head, body = fetch(env, "file.test", basic("carol", "dave-pw"), source="127.0.0.2")
    assert_refused(head, body, 'Basic realm="Restricted", charset="UTF-8"')  # the default


def test_authorization_is_forwarded_only_when_asked(env: Env) -> None:
    credentials = basic("alice", "alice-pw")
    head, body = fetch(env, "forwarded.test", credentials)
    assert head.status == 200
    assert seen_fields(body)["authorization"] == credentials.decode()[15:].strip()
    # A location that turns basic auth off forwards what the client sent, as any bare route.
    head, body = fetch(env, "bcrypt.test", b"Authorization: Bearer xyz\r\n", path="/public/x")
    assert head.status == 200
    assert seen_fields(body)["authorization"] == "Bearer xyz"


def test_repeated_requests_on_one_connection(env: Env) -> None:
    """Verified once, then remembered; a refusal keeps the connection."""
    with connect(env) as conn:
        for _ in range(3):
            head, _ = conn.response(get("bcrypt.test", extra=basic("alice", "alice-pw")))
            assert head.status == 200
        head, body = conn.response(get("bcrypt.test", extra=basic("alice", "nope")))
        assert_refused(head, body)
        assert head.get("Connection") == "keep-alive"
        head, _ = conn.response(get("bcrypt.test", extra=basic("bob", "bob-pw")))
        assert head.status == 200


def test_a_post_body_waits_for_the_verification(env: Env) -> None:
    body = b"x" * 100_000
    request = (b"POST /echo HTTP/1.1\r\nHost: bcrypt.test\r\nContent-Length: %d\r\n" % len(body)
               + basic("bob", "bob-pw") + b"\r\n" + body)
    with connect(env) as conn:
        head, answer = conn.response(request)
        assert head.status == 200
        assert json.loads(answer)["body_length"] == len(body)
        # Refused: the body is read and dropped, the connection serves the next request.
        head, answer = conn.response(request.replace(basic("bob", "bob-pw"), b""))
        assert head.status == 401
        head, _ = conn.response(get("bcrypt.test", extra=basic("alice", "alice-pw")))
        assert head.status == 200


def websocket(env: Env, extra: bytes, after_request: bool, path: str = "/echo") -> Head:
    with connect(env) as conn:
        if after_request:
            conn.response(get("ws.test", "/plain", basic("alice", "alice-pw")))
        head, _ = conn.response(ws_request(path, "ws.test", extra=extra))
        if head.status == 101:
            conn.sock.sendall(client_frame(0x1, b"hello"))
            while len(conn.buf) < 7 and conn.fill():
                pass
            assert bytes(conn.buf[2:7]) == b"hello"
            conn.sock.sendall(client_frame(0x8, b"\x03\xe8"))
        return head


@pytest.mark.parametrize("after_request", [False, True])
def test_websocket_handshake(env: Env, after_request: bool) -> None:
    assert websocket(env, basic("alice", "alice-pw"), after_request).status == 101
    assert websocket(env, basic("bob", "bob-pw"), after_request).status == 101
    marker = f"/echo?refused-{after_request}"
    refused = websocket(env, b"", after_request, marker)
    assert refused.status == 401 and refused.get("WWW-Authenticate") == CHALLENGE
    assert websocket(env, basic("alice", "bad"), after_request, marker).status == 401
    with urllib.request.urlopen(f"{env.ws.url}/seen", timeout=5) as r:
        assert [e for e in json.loads(r.read()) if e["path"] == marker] == []


def test_failures_past_the_budget_get_429(env: Env) -> None:
    source = "127.0.0.77"  # a client of its own: the budget is per client IP
    with connect(env, source) as conn:
        statuses = [conn.response(get("bcrypt.test", extra=basic("alice", f"guess{i}")))[0]
                    for i in range(12)]
        assert [h.status for h in statuses[:10]] == [401] * 10
        assert [h.status for h in statuses[10:]] == [429, 429]
        assert 1 <= int(statuses[10].get("Retry-After") or 0) <= 6
        # Past the budget even the right password is not verified (erin's is used nowhere
        # else: not remembered)...
        head, _ = conn.response(get("bcrypt.test", extra=basic("erin", "erin-pw")))
        assert head.status == 429
        # ...but a credential verified before (remembered) still goes through, and a request
        # without credentials is only asked for them.
        head, _ = conn.response(get("bcrypt.test", extra=basic("alice", "alice-pw")))
        assert head.status in (200, 429)
        head, _ = conn.response(get("bcrypt.test"))
        assert head.status == 401


def hash_password(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "charon", "hash-password", *args], input=stdin,
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_hash_password_bcrypt() -> None:
    done = hash_password(stdin="correct horse ë\n")
    assert done.returncode == 0, done.stderr
    hashed = done.stdout.strip()
    assert hashed.startswith("$2b$12$")
    assert bcrypt.checkpw("correct horse ë".encode(), hashed.encode())
    assert not bcrypt.checkpw(b"correct horse", hashed.encode())


def test_hash_password_argon2() -> None:
    done = hash_password("--argon2", stdin="s3cret")
    assert done.returncode == 0, done.stderr
    hashed = done.stdout.strip()
    assert hashed.startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(hashed, "s3cret")


def test_hash_password_refusals() -> None:
    for stdin, args in (("", ()), ("\n", ()), ("x" * 73, ())):
        done = hash_password(*args, stdin=stdin)
        assert done.returncode == 1, (stdin, done)
        assert done.stderr.startswith("charon hash-password: ")
        assert done.stdout == ""
    help_text = subprocess.run([sys.executable, "-m", "charon", "--help"], capture_output=True,
                               text=True, timeout=30, cwd=REPO).stdout
    assert "hash-password" in help_text


def test_hashes_from_the_command_work_in_a_config(tmp_path: Path) -> None:
    hashed = hash_password("--argon2", stdin="pw").stdout.strip()
    config = tmp_path / "c.toml"
    config.write_text(f"""
[server]
listen = ["{HOST}:1"]
[[hosts]]
domains = ["a.test"]
upstream = "http://{HOST}:2"
basic_auth = {{ users = {{ u = "{hashed}" }} }}
""")
    done = subprocess.run([sys.executable, "-m", "charon", "check", str(config)],
                          capture_output=True, text=True, timeout=30, cwd=REPO)
    assert done.returncode == 0, done.stderr


# -- the pieces alone (no process: the parsing, the failure budget, the hash checks) ----------


def test_parse_credentials() -> None:
    from charon.worker.access.basic import parse

    def value(raw: bytes, scheme: bytes = b"Basic") -> bytes:
        return scheme + b" " + base64.b64encode(raw)

    assert parse(value(b"alice:pa:ss")) == ("alice", b"pa:ss")  # the first colon splits
    assert parse(value(b"z\xc3\xab:p", b"bAsIc")) == ("zë", b"p")
    assert parse(value(b":")) == ("", b"")
    for bad in (value(b"alice"), value(b"\xff:x"), b"Basic", b"Basic !!!", b"Bearer x",
                b"Basic YTpi YTpi", b""):
        assert parse(bad) is None, bad


def test_failure_budget() -> None:
    from charon.worker.access.failures import LocalFailureCounter

    counter = LocalFailureCounter(max_clients=2)
    assert [counter.take("a", now=100.0) for _ in range(10)] == [0.0] * 10
    assert counter.blocked("a", now=100.0) == pytest.approx(6.0)
    assert counter.take("a", now=100.0) == pytest.approx(6.0)  # refused: not counted
    assert counter.blocked("b", now=100.0) == 0.0  # per client
    assert counter.blocked("a", now=106.0) == 0.0  # one failure forgiven per 6 s
    assert counter.take("a", now=106.0) == 0.0
    assert counter.take("a", now=106.0) > 0
    counter.take("b", now=106.0)
    counter.take("c", now=106.0)  # a third client: the oldest ("a") is forgotten
    assert counter.blocked("a", now=106.0) == 0.0


def test_verify_hash_kinds() -> None:
    from charon.worker.access.basic import dummy_for, verify

    long = b"p" * 80
    hashed = bcrypt.hashpw(long[:72], bcrypt.gensalt(4)).decode()
    assert verify(long, hashed)  # (bcrypt looks at 72 bytes, as htpasswd's hashes do)
    assert verify(b"pw", bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$"))
    assert not verify(b"p\0w", hashed)
    argon = FAST_ARGON2.hash("pw")
    assert verify(b"pw", argon) and not verify(b"pW", argon)
    dummy = dummy_for(hashed)  # same kind and cost
    assert dummy.startswith("$2b$04$") and dummy_for(hashed) == dummy
    assert argon2.extract_parameters(dummy_for(argon)) == argon2.extract_parameters(argon)


def test_copied_fields_replace_the_clients() -> None:
    from charon.worker.access.forward import with_fields

    head = (b"GET / HTTP/1.1\r\nHost: a.test\r\nremote-user: mallory\r\nX-A: 1\r\n"
            b"REMOTE-USER: eve\r\nVia: 1.1 charon\r\n\r\n")
    names = (b"remote-user", b"remote-groups")
    got = with_fields(head, names, [(b"Remote-User", b"alice"), (b"X-Other", b"1"),
                                    (b"Remote-Groups", b"a,b")])
    assert got == (b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: 1\r\nVia: 1.1 charon\r\n"
                   b"Remote-User: alice\r\nRemote-Groups: a,b\r\n\r\n")
    assert b"mallory" not in with_fields(head, names, []) and b"eve" not in with_fields(
        head, names, [])
    assert with_fields(head, (), [(b"Remote-User", b"alice")]) == head


def test_verification_slots_are_bounded_and_given_back() -> None:
    """A full queue refuses; a verification cancelled while queued (its client left) gives its
    slot back as one that ran does."""
    from charon.worker.access.basic import Verifier

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(8)).decode()

    async def run() -> None:
        pool = Verifier(threads=1, max_waiting=3)
        assert pool.reserve() and pool.reserve() and pool.reserve()
        assert not pool.reserve()
        first = asyncio.ensure_future(pool.check(b"pw", hashed, hashed))
        second = asyncio.ensure_future(pool.check(b"no", hashed, hashed))
        third = asyncio.ensure_future(pool.check(b"pw", None, hashed))
        await asyncio.sleep(0)
        second.cancel()  # (queued behind the first: the one thread is busy)
        assert await first is True
        assert await third is False  # an unknown user: never admitted
        assert pool.waiting == 0
        assert pool.reserve()

    asyncio.run(run())


def test_requests_with_one_credential_share_its_verification() -> None:
    """Eight requests carrying the same credential before it is verified (a client's first
    burst, a browser's parallel connections) take one verification slot and all get through;
    a wrong password's waiters are all refused; when every waiter of a queued verification
    leaves, it is cancelled and its slot given back."""
    from test_access_checks import plan, router

    from charon.config.rules import BasicAuth, Rules
    from charon.worker.access import basic as basic_module
    from charon.worker.http.errors import HttpError

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(8)).decode()
    r = router(Rules(basic_auth=BasicAuth("r", (("ann", hashed),))))

    def waits(password: str, peer: str = "127.0.0.1") -> list:  # type: ignore[type-arg]
        token = base64.b64encode(f"ann:{password}".encode())
        p = plan(r, peer=peer, extra=[(b"Authorization", b"Basic " + token)])
        assert p.waits is not None and len(p.waits) == 1
        return [p, p.waits[0]]

    async def run() -> None:
        pool = basic_module.verifier()
        right = [waits("pw") for _ in range(8)]
        wrong = [waits("nope", "127.0.0.9") for _ in range(3)]
        tasks = [asyncio.ensure_future(w(p)) for p, w in right + wrong]
        await asyncio.sleep(0.01)
        assert pool.waiting == 2  # one verification per credential, not eleven
        results = await asyncio.gather(*tasks)
        assert results[:8] == [None] * 8
        assert all(isinstance(e, HttpError) and e.status == 401 for e in results[8:])
        assert pool.waiting == 0
        plan(r, extra=[(b"Authorization", b"Basic " + base64.b64encode(b"ann:pw"))])  # cached

        # Every waiter leaves while the verification is queued behind a busy pool.
        slow = bcrypt.hashpw(b"pw", bcrypt.gensalt(11)).decode()
        assert all(pool.reserve() for _ in range(pool.threads))
        busy = [asyncio.ensure_future(pool.check(b"x", slow, slow)) for _ in range(pool.threads)]
        await asyncio.sleep(0.01)
        left = [asyncio.ensure_future(w(p)) for p, w in [waits("other") for _ in range(3)]]
        await asyncio.sleep(0.01)
        assert pool.waiting == pool.threads + 1
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await asyncio.sleep(0.01)
        assert pool.waiting == pool.threads  # the queued one was dropped
        await asyncio.gather(*busy)
        assert pool.waiting == 0

    asyncio.run(run())


def test_a_respawned_worker_reads_no_htpasswd_file(tmp_path: Path) -> None:
    """Workers start on the config the supervisor checked: an htpasswd file emptied after the
    start does not lock its users out of a worker that replaces a killed one (it would, were
    workers to read the file again), and the supervisor still serves the users it read."""
    import os
    import signal

    from harness import running_charon, wait_until

    htpasswd = tmp_path / "users.htpasswd"
    htpasswd.write_text(f"carol:{_bcrypt('carol-pw')}\n")
    http = Backend("http_backend.py")
    try:
        hosts = f"""
            [[hosts]]
            domains = ["file.test"]
            upstream = "{http.url}"
            basic_auth = {{ htpasswd = "{htpasswd}" }}
            """
        with running_charon(tmp_path, hosts) as charon:
            [first] = charon.worker_pids()
            htpasswd.write_text("")  # (a reload would now refuse: "no users")
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: charon.worker_pids() not in ([], [first]), 20,
                       what="a new worker")
            charon.wait_ready()
            with RawConn(socket.create_connection((HOST, charon.port), 10)) as conn:
                head, _ = conn.response(get("file.test", extra=basic("carol", "carol-pw")))
                assert head.status == 200, head.raw
                head, body = conn.response(get("file.test", extra=basic("carol", "wrong")))
                assert_refused(head, body, 'Basic realm="Restricted", charset="UTF-8"')
    finally:
        http.stop()
