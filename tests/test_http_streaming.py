"""Bodies, keep-alive, pipelining, HTTP/1.0, HEAD, 1xx and Expect (decisions 3, 4, 9).

Big transfers are 64 MiB; with CHARON_BIG=1 they are 1 GiB (too slow for CI). While they run,
the worker's VmRSS is sampled: the proxy must stream, never buffer a whole body.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from backends.http_backend import pattern
from backends.raw_backend import GZIP_CONTENT
from harness import Backend, Charon, running_charon
from httpwire import Client, Hasher, request, vm_rss_kib

BIG = (1 << 30) if os.environ.get("CHARON_BIG") == "1" else (64 << 20)
RSS_LIMIT_KIB = 150 * 1024


@dataclass
class Setup:
    charon: Charon
    port: int


@pytest.fixture(scope="module")
def hosts_toml() -> Iterator[str]:
    http = Backend("http_backend.py", "--name", "h")
    raw = Backend("raw_backend.py")
    try:
        yield f"""
            [[hosts]]
            domains = ["h.test"]
            upstream = "{http.url}"

            [[hosts]]
            domains = ["raw.test"]
            upstream = "{raw.url}"
            """
    finally:
        http.stop()
        raw.stop()


@pytest.fixture(scope="module")
def env(hosts_toml: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with running_charon(tmp_path_factory.mktemp("streaming"), hosts_toml, workers=1) as charon:
        yield Setup(charon, charon.port)


@pytest.fixture
def own_env(hosts_toml: str, tmp_path: Path) -> Iterator[Setup]:
    """A Charon of its own, for tests whose failure would leave the worker's pools broken."""
    with running_charon(tmp_path, hosts_toml, workers=1) as charon:
        yield Setup(charon, charon.port)


@cache
def pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for block in pattern(n):
        digest.update(block)
    return digest.hexdigest()


class RssSampler:
    """Samples the peak VmRSS of the worker processes in a thread while a transfer runs."""

    def __init__(self, charon: Charon) -> None:
        self.pids = charon.worker_pids()
        assert self.pids, "no worker process"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    self.peak = max(self.peak, vm_rss_kib(pid))
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def check(self) -> None:
        assert 0 < self.peak < RSS_LIMIT_KIB, f"worker VmRSS peaked at {self.peak} KiB"


def _send_body(client: Client, size: int, chunked: bool) -> None:
    for block in pattern(size):
        if chunked:
            client.send(b"%x\r\n%s\r\n" % (len(block), block))
        else:
            client.send(block)
    if chunked:
        client.send(b"0\r\n\r\n")


# BIG (64 MiB, or 1 GiB with CHARON_BIG=1) is in the test ids.
@pytest.mark.parametrize("big", [BIG], ids=[f"{BIG >> 20}MiB"])
@pytest.mark.parametrize("delay", [0, 0.5], ids=["fast-backend", "backend-reads-late"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_big_upload(env: Setup, chunked: bool, delay: float, big: int) -> None:
    size = big if delay == 0 else min(big, 16 << 20)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    with RssSampler(env.charon) as rss, Client(env.port, timeout=10) as client:
        client.send(
            f"POST /upload?delay={delay} HTTP/1.1\r\nHost: h.test\r\n{framing}\r\n\r\n".encode()
        )
        _send_body(client, size, chunked)
        resp = client.read_response()
    assert resp.status == 200, resp.head + resp.body
    assert resp.json()["length"] == size
    assert resp.json()["sha256"] == pattern_sha256(size)
    rss.check()


@pytest.mark.parametrize("big", [BIG], ids=[f"{BIG >> 20}MiB"])
@pytest.mark.parametrize("slow_reader", [False, True], ids=["fast-client", "client-reads-late"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_big_download(env: Setup, chunked: bool, slow_reader: bool, big: int) -> None:
    size = big if not slow_reader else min(big, 16 << 20)
    query = "?chunked=1" if chunked else ""
    sink = Hasher()
    with RssSampler(env.charon) as rss, Client(env.port, timeout=10) as client:
        client.send(f"GET /bytes/{size}{query} HTTP/1.1\r\nHost: h.test\r\n\r\n".encode())
        if slow_reader:
            time.sleep(0.5)  # the backend goes on sending: the proxy must stop reading it
        resp = client.read_response(sink=sink)
        # The connection is still usable afterwards.
        client.send(b"GET /echo HTTP/1.1\r\nHost: h.test\r\n\r\n")
        assert client.read_response().status == 200
    assert resp.status == 200
    if chunked:
        assert resp.framing == "chunked"
    else:
        assert resp.framing == "length"
        assert resp.header("Content-Length") == str(size)
    assert sink.length == size
    assert sink.hexdigest() == pattern_sha256(size)
    rss.check()


BLOB = 100000  # one backend read (uvloop reads up to 256000 bytes), above the 64 KiB high-water


def _proxy_wrote(proxy_port: int, client_port: int) -> int:
    """Bytes the proxy handed to the kernel on a connection whose client reads nothing: the
    proxy side's send queue plus the client side's receive queue (ss, else /proc/net/tcp)."""
    if shutil.which("ss"):
        out = subprocess.run(
            ["ss", "-tnH", f"( sport = :{proxy_port} and dport = :{client_port} ) or "
             f"( sport = :{client_port} and dport = :{proxy_port} )"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout
        queues = {}
        for line in out.splitlines():
            _, recv_q, send_q, local, _ = line.split(None, 4)
            queues[int(local.rsplit(":", 1)[1])] = (int(recv_q), int(send_q))
        return queues[proxy_port][1] + queues[client_port][0]
    found = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local = int(fields[1].split(":")[1], 16)
            remote = int(fields[2].split(":")[1], 16)
            if (local, remote) in ((proxy_port, client_port), (client_port, proxy_port)):
                tx, rx = fields[4].split(":")
                found[local] = (int(rx, 16), int(tx, 16))
    return found[proxy_port][1] + found[client_port][0]


@contextlib.contextmanager
def _client_over_high_water(port: int) -> Iterator[Client]:
    """A client whose connection the proxy has just paused for writing, in the same backend
    read that completed a response.

    The client reads nothing and asks raw.test for one BLOB at a time (each arrives in one
    backend read, so every read completes a response). Once the kernel buffers are full, the
    proxy keeps the rest in its transport buffer; the response that takes that buffer over
    uvloop's 64 KiB high-water mark is the one whose last read made the proxy pause the
    backend connection. What the proxy wrote is in the two sockets' queues; what it could not
    write yet is in its transport buffer.
    """
    head = len(request(port, b"GET /blob?size=%d HTTP/1.1\r\nHost: raw.test\r\n"
                       b"Connection: close\r\n\r\n" % BLOB).head)
    client = Client(port, timeout=5)
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        own = client.sock.getsockname()[1]
        expected = 0
        for _ in range(400):  # the kernel holds a few MiB at most
            client.send(b"GET /blob?size=%d HTTP/1.1\r\nHost: raw.test\r\n\r\n" % BLOB)
            expected += head + BLOB
            written = -1
            for _ in range(40):  # until the proxy stopped writing
                time.sleep(0.005)
                now = _proxy_wrote(port, own)
                if now in (written, expected):
                    break
                written = now
            if expected - now > 64 * 1024 + 4096:
                break
        else:
            raise AssertionError("the proxy never had to buffer for the stalled client")
        yield client
    finally:
        client.abort()


def test_pooled_backend_connection_not_left_paused(own_env: Setup) -> None:
    """A response that completes in the very backend read whose forwarding took the client's
    write buffer over its high-water mark (so the proxy paused reading the backend) must not
    go back to the pool paused: the next request on that connection would never have its
    response read (until the first-byte timeout)."""
    with _client_over_high_water(own_env.port), Client(own_env.port, timeout=3) as other:
        # The paused connection is the pool's most recently released one: it is used next.
        other.send(b"GET /ok HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        try:
            resp = other.read_response()
        except TimeoutError:
            pytest.fail("the pooled backend connection was left paused: no response read")
        assert resp.body.startswith(b"conn=")


def test_next_pipelined_exchange_respects_client_backpressure(own_env: Setup) -> None:
    """After a response that ended with the client's write buffer over its high-water mark,
    the next exchange on that client connection must not read its backend at full speed:
    with the client reading nothing, its whole body would pile up in the worker's memory."""
    pid = own_env.charon.worker_pids()[0]
    with _client_over_high_water(own_env.port) as client:
        before = vm_rss_kib(pid)
        client.send(b"GET /bytes/%d HTTP/1.1\r\nHost: h.test\r\n\r\n" % (96 << 20))
        time.sleep(1.0)
        after = vm_rss_kib(pid)
    assert after - before < 32 * 1024, f"worker VmRSS grew {before} -> {after} KiB"


def test_keep_alive_reuse(env: Setup) -> None:
    with Client(env.port) as client:
        for i in range(5):
            body = b"x" * (i * 1000)
            client.send(
                b"POST /echo/%d HTTP/1.1\r\nHost: h.test\r\nContent-Length: %d\r\n\r\n%s"
                % (i, len(body), body)
            )
            resp = client.read_response()
            assert resp.status == 200
            assert resp.json()["raw_path"] == f"/echo/{i}"
            assert resp.json()["body_length"] == len(body)
        client.send(
            b"POST /echo/chunked HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        assert client.read_response().json()["body_length"] == 3
        client.send(b"GET /bytes/100?chunked=1 HTTP/1.1\r\nHost: h.test\r\n\r\n")
        resp = client.read_response()
        assert resp.body == b"".join(pattern(100))
        client.send(b"GET /ok HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        assert client.read_response().body.startswith(b"conn=")
        client.send(b"GET /echo/last HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n")
        resp = client.read_response()
        assert resp.header("Connection") == "close"
        assert client.closed_within(2)


def test_pipelined_requests_answered_in_order(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(
            b"GET /sleep/0.3 HTTP/1.1\r\nHost: h.test\r\n\r\n"
            b"POST /echo/2 HTTP/1.1\r\nHost: h.test\r\nContent-Length: 4\r\n\r\nbody"
            b"GET /bytes/7?chunked=1 HTTP/1.1\r\nHost: h.test\r\n\r\n"
            b"HEAD /bytes/9 HTTP/1.1\r\nHost: h.test\r\n\r\n"
            b"GET /ok HTTP/1.1\r\nHost: raw.test\r\n\r\n"
            b"GET /echo/6 HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n"
        )
        assert client.read_response().body == b"slept"
        second = client.read_response().json()
        assert (second["raw_path"], second["body_length"]) == ("/echo/2", 4)
        assert client.read_response().body == b"".join(pattern(7))
        head = client.read_response(head_request=True)
        assert head.header("Content-Length") == "9"
        assert client.read_response().body.startswith(b"conn=")
        assert client.read_response().json()["raw_path"] == "/echo/6"
        assert client.closed_within(2)


def test_pipelined_requests_then_half_close(env: Setup) -> None:
    """A client that sends its requests and shuts down its side still gets every answer."""
    with Client(env.port) as client:
        client.send(
            b"GET /echo/1 HTTP/1.1\r\nHost: h.test\r\n\r\n"
            b"GET /echo/2 HTTP/1.1\r\nHost: h.test\r\n\r\n"
        )
        client.sock.shutdown(socket.SHUT_WR)
        assert client.read_response().json()["raw_path"] == "/echo/1"
        assert client.read_response().json()["raw_path"] == "/echo/2"
        assert client.closed_within(2)


def test_many_pipelined_requests(env: Setup) -> None:
    """More pipelined requests than the proxy parses ahead: all answered, in order."""
    count = 40
    with Client(env.port, timeout=10) as client:
        client.send(
            b"".join(b"GET /echo/%d HTTP/1.1\r\nHost: h.test\r\n\r\n" % i for i in range(count))
        )
        for i in range(count):
            assert client.read_response().json()["raw_path"] == f"/echo/{i}"


def test_http10_client_gets_close_delimited_body(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(b"GET /bytes/100000?chunked=1 HTTP/1.0\r\nHost: h.test\r\n\r\n")
        resp = client.read_response()
        assert resp.status == 200
        assert not resp.has("Transfer-Encoding")
        assert not resp.has("Content-Length")
        assert resp.framing == "close"
        assert resp.header("Connection") == "close"
        assert resp.body == b"".join(pattern(100000))


def test_http10_keep_alive_client_with_chunked_backend_response(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(
            b"GET /bytes/5000?chunked=1 HTTP/1.0\r\nHost: h.test\r\nConnection: keep-alive\r\n\r\n"
        )
        resp = client.read_response()
        assert not resp.has("Transfer-Encoding")
        assert resp.header("Connection") == "close"  # the body ends with the connection
        assert resp.framing == "close"
        assert resp.body == b"".join(pattern(5000))


def test_http10_keep_alive_with_content_length(env: Setup) -> None:
    with Client(env.port) as client:
        for _ in range(2):
            client.send(
                b"GET /bytes/10 HTTP/1.0\r\nHost: h.test\r\nConnection: keep-alive\r\n\r\n"
            )
            resp = client.read_response()
            assert resp.body == b"".join(pattern(10))
            assert resp.header("Connection") == "keep-alive"
        client.send(b"GET /bytes/10 HTTP/1.0\r\nHost: h.test\r\n\r\n")
        assert client.read_response().framing == "length"
        assert client.closed_within(2)


@pytest.mark.parametrize("host", ["h.test", "raw.test"])
def test_head_has_no_body(env: Setup, host: str) -> None:
    target = b"/bytes/1000" if host == "h.test" else b"/head"
    with Client(env.port) as client:
        client.send(b"HEAD %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, host.encode()))
        resp = client.read_response(head_request=True)
        assert resp.status == 200
        assert resp.header("Content-Length") in ("1000", "5")
        # Nothing follows the head: the next bytes are the next response's.
        client.send(b"GET /echo/after-head HTTP/1.1\r\nHost: h.test\r\n\r\n")
        nxt = client.read_response()
        assert nxt.version == b"HTTP/1.1" and nxt.status == 200, nxt.head
        assert nxt.json()["raw_path"] == "/echo/after-head"


def test_head_of_chunked_response_has_no_body(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(b"HEAD /bytes/1000?chunked=1 HTTP/1.1\r\nHost: h.test\r\n\r\n")
        resp = client.read_response(head_request=True)
        assert resp.status == 200
        client.send(b"GET /echo/x HTTP/1.1\r\nHost: h.test\r\n\r\n")
        assert client.read_response().json()["raw_path"] == "/echo/x"


@pytest.mark.parametrize("code", [204, 304])
def test_no_body_statuses(env: Setup, code: int) -> None:
    with Client(env.port) as client:
        client.send(b"GET /status/%d HTTP/1.1\r\nHost: h.test\r\n\r\n" % code)
        resp = client.read_response()
        assert resp.status == code
        assert not resp.has("Transfer-Encoding")
        client.send(b"GET /echo/y HTTP/1.1\r\nHost: h.test\r\n\r\n")
        assert client.read_response().json()["raw_path"] == "/echo/y"


def test_204_never_carries_content_length(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(b"GET /204-length HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        resp = client.read_response()
        assert resp.status == 204
        assert not resp.has("Content-Length"), resp.head
        client.send(b"GET /ok HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        assert client.read_response().body.startswith(b"conn=")


@pytest.mark.parametrize("target", ["/te-gzip", "/te-gzip-close"])
def test_backend_transfer_coding_stays_declared(env: Setup, target: str) -> None:
    """llhttp removes only the chunked coding: a gzip transfer coding must reach the client
    declared, with the whole body (close-delimited when chunked is not the final coding)."""
    with Client(env.port) as client:
        client.send(f"GET {target} HTTP/1.1\r\nHost: raw.test\r\n\r\n".encode())
        resp = client.read_response()
    assert resp.status == 200
    assert resp.header("Transfer-Encoding") == "gzip, chunked"
    assert resp.framing == "chunked"
    assert gzip.decompress(resp.body) == GZIP_CONTENT


def test_early_hints_forwarded_to_http11_client(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(b"GET /early-hints HTTP/1.1\r\nHost: raw.test\r\n\r\n")
        resp = client.read_response()
        assert [r.status for r in resp.interim] == [103]
        assert resp.interim[0].head == (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        )
        assert resp.status == 200
        assert resp.body == b"final"


def test_early_hints_not_forwarded_to_http10_client(env: Setup) -> None:
    with Client(env.port) as client:
        client.send(b"GET /early-hints HTTP/1.0\r\nHost: raw.test\r\n\r\n")
        data = client.read_all()
    assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
    assert b"103" not in data and b"Link:" not in data
    assert data.endswith(b"\r\n\r\nfinal")


def test_expect_100_continue_reaches_backend_and_client(env: Setup) -> None:
    with Client(env.port, timeout=3) as client:
        client.send(
            b"POST /continue HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        # The body is sent only once the backend's 100 Continue came through the proxy.
        interim = client.read_head()
        assert interim.head == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"hello")
        resp = client.read_response()
        assert resp.status == 200
        assert resp.body == b"expect=1 length=5"


def test_request_without_expect_gets_no_100(env: Setup) -> None:
    resp = request(
        env.port,
        b"POST /continue HTTP/1.1\r\nHost: raw.test\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nabc",
    )
    assert resp.interim == []
    assert resp.body == b"expect=0 length=3"
