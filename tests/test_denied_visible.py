"""A refused request is visible: charon_requests_denied_total{host,reason}, the live log's
request record (`denied`), the access log line (`denied=REASON`). A real `charon run` with two
workers in front of ws_backend.py."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOST, Backend, Charon, running_charon, wait_until
from test_live_logs import log_stream, session
from test_metrics import value, wait_metrics
from test_websocket_handshake import ws_request

DENIALS = 6


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    backend = Backend("ws_backend.py")
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def charon(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Charon]:
    tmp = tmp_path_factory.mktemp("denied")
    hosts = f"""
        [[hosts]]
        domains = ["deny.test"]
        upstream = "{backend.url}"
        deny = ["127.0.0.0/8"]

        [[hosts]]
        domains = ["small.test"]
        upstream = "{backend.url}"
        max_body_size = "1k"
        """
    server = f'access_log = "{tmp / "access.log"}"'
    with running_charon(tmp, hosts, workers=2, server_toml=server) as c:
        yield c


def answer(port: int, request: bytes) -> bytes:
    """The response's bytes, to the proxy's close or a short quiet spell."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(request)
        s.settimeout(1)
        out = b""
        try:
            while b"\r\n\r\n" not in out or not out.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except TimeoutError:
            pass
        return out


def get(host: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def access_log(charon: Charon) -> list[str]:
    path = Path(str(charon.config_path).replace(charon.config_path.name, "access.log"))
    return path.read_text().splitlines() if path.exists() else []


def test_the_metric_counts_each_reason_per_host(charon: Charon) -> None:
    for i in range(DENIALS - 1):
        assert answer(charon.port, get("deny.test", f"/plain?m{i}")).startswith(b"HTTP/1.1 403")
    # A WebSocket handshake refused counts the same (it went through the front door).
    assert answer(charon.port, ws_request("/echo?m", "deny.test")).startswith(b"HTTP/1.1 403")
    big = b"POST /plain HTTP/1.1\r\nHost: small.test\r\nContent-Length: 5000\r\n\r\n"
    assert answer(charon.port, big).startswith(b"HTTP/1.1 413")
    samples = wait_metrics(
        charon,
        lambda s: value(s, "charon_requests_denied_total", host="deny.test", reason="acl")
        == DENIALS,
        "the denied metric",
    )
    assert value(samples, "charon_requests_denied_total", host="small.test",
                 reason="body_size") == 1
    assert value(samples, "charon_requests_denied_total", host="small.test", reason="acl") == 0
    assert value(samples, "charon_http_requests_total", host="deny.test", method="GET",
                 code="403") == DENIALS


def test_the_live_log_record_says_why(charon: Charon) -> None:
    t = uuid.uuid4().hex[:8]

    async def go() -> None:
        async with session() as s, log_stream(s, charon, backlog="0") as log:
            await asyncio.to_thread(answer, charon.port, get("deny.test", f"/d-{t}"))
            await asyncio.to_thread(answer, charon.port, get("small.test", f"/plain?{t}"))
            records = await log.until(lambda r: r.get("path") == f"/d-{t}")
            records = await log.until(lambda r: r.get("path") == f"/plain?{t}")
        denied = next(r for r in records if r.get("path") == f"/d-{t}")
        assert denied["kind"] == "request"
        assert (denied["host"], denied["status"], denied["denied"]) == ("deny.test", 403, "acl")
        assert denied["client_ip"] == HOST and denied["method"] == "GET"
        allowed = next(r for r in records if r.get("path") == f"/plain?{t}")
        assert allowed["status"] == 200 and not allowed.get("denied")

    asyncio.run(go())


def test_the_access_log_line_says_why(charon: Charon) -> None:
    t = uuid.uuid4().hex[:8]
    answer(charon.port, get("deny.test", f"/a-{t}"))
    answer(charon.port, get("small.test", f"/plain?a-{t}"))

    def logged() -> bool:
        lines = access_log(charon)
        return any(f"/a-{t}" in line for line in lines) and any(
            f"/plain?a-{t}" in line for line in lines)

    wait_until(logged, 5, what="the access log lines")
    lines = access_log(charon)
    denied = next(line for line in lines if f"/a-{t}" in line)
    assert " 403 " in denied and denied.endswith(" denied=acl"), denied
    assert " deny.test " in denied
    allowed = next(line for line in lines if f"/plain?a-{t}" in line)
    assert "denied=" not in allowed
