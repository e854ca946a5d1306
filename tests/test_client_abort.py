"""A request whose client leaves before the response: logged and counted with nginx's 499, in the
access log, the live log and charon_http_requests_total. Real processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from harness import HOST, Backend, Charon, wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def charon(tmp_path: Path, backend_factory: Callable[..., Backend]) -> Iterator[Charon]:
    backend = backend_factory("sup_backend.py")
    c = Charon(
        tmp_path, f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{backend.url}"\n',
        server_toml=f'access_log = "{tmp_path / "access.log"}"',
    )
    c.backend = backend  # type: ignore[attr-defined]
    try:
        c.start()
        yield c
    finally:
        c.stop()


def sleeping(backend: Backend) -> int:
    with urllib.request.urlopen(f"{backend.url}/sleeping", timeout=5) as r:
        return int(r.read())


def requests_with_code(charon: Charon, code: str) -> float:
    url = f"http://{HOST}:{charon.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return sum(
        s.value for family in text_string_to_metric_families(text) for s in family.samples
        if s.name == "charon_http_requests_total" and s.labels.get("code") == code
    )


async def backlog_records(charon: Charon) -> list[dict[str, object]]:
    """The live log's backlog: what a subscriber gets on connect."""
    records = []
    async with aiohttp.ClientSession() as s, s.ws_connect(
        f"http://{HOST}:{charon.admin_port}/logs", params={"backlog": "50"}
    ) as ws:
        while True:
            try:
                message = await ws.receive(timeout=1.0)
            except TimeoutError:
                return records
            assert message.type == aiohttp.WSMsgType.TEXT, message
            records.append(json.loads(message.data))


def test_a_request_the_client_abandons_is_logged_and_counted_as_499(
    charon: Charon, tmp_path: Path
) -> None:
    backend: Backend = charon.backend  # type: ignore[attr-defined]
    path = f"/sleep/5?left-{uuid.uuid4().hex[:8]}"
    with socket.create_connection((HOST, charon.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        wait_until(lambda: sleeping(backend) == 1, 10, what="the request to reach the backend")
        # A reset, as a browser's aborted fetch or a killed client gives: a FIN alone could be
        # a half-close, after which the client still reads its response.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # The proxy gives up the backend request too.
    wait_until(lambda: sleeping(backend) == 0, 10, what="the backend request to be cut")

    access = tmp_path / "access.log"
    wait_until(lambda: access.exists() and path in access.read_text(), 10,
               what="the access log line")
    (line,) = [line for line in access.read_text().splitlines() if path in line]
    assert f'"GET {path}" 499 0 ' in line, line

    wait_until(lambda: requests_with_code(charon, "499") == 1, 10, what="the 499 in the metric")

    records = [r for r in asyncio.run(backlog_records(charon)) if r.get("path") == path]
    assert [(r["kind"], r["status"]) for r in records] == [("request", 499)], records


def test_a_response_the_client_abandons_midway_is_logged_with_its_status_and_bytes(
    tmp_path: Path, backend_factory: Callable[..., Backend]
) -> None:
    """nginx's convention: 499 only when nothing was answered; a response cut after its head
    keeps its status, with the body bytes that were relayed."""
    raw = backend_factory("raw_backend.py")
    access = tmp_path / "access.log"
    c = Charon(tmp_path, f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{raw.url}"\n',
               server_toml=f'access_log = "{access}"')
    try:
        c.start()
        path = f"/stall?left-{uuid.uuid4().hex[:8]}"  # 200, 10 of 100 body bytes, then silence
        with socket.create_connection((HOST, c.port), timeout=5) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            got = b""
            while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < 10:
                chunk = sock.recv(65536)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 "), got
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_until(lambda: access.exists() and path in access.read_text(), 10,
                   what="the access log line")
        (line,) = [line for line in access.read_text().splitlines() if path in line]
        assert f'"GET {path}" 200 10 ' in line, line
    finally:
        c.stop()
