"""The admin listener as an operator meets it (issue 15): no Server header naming aiohttp and
Python; the live-log token never in a URL (a header, or from the page a WebSocket subprotocol,
the page keeping it in session storage); records of several workers in time order.

Real processes on 127.0.0.1: Charon, a backend, headless Chromium (driven as in
test_live_log_page) and raw sockets for what aiohttp's own client would not send."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from harness import HOST, Backend, Charon, raw_request
from test_live_log_page import CHROMIUM, Browser, Page, with_page

pytestmark = pytest.mark.timeout(90)

TOKEN = "adm1n-T0ken"


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend("logs_backend.py")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Charon]:
    """Two workers (for the ordering) and a token."""
    c = Charon(tmp_path_factory.mktemp("operator-admin"), f"""
        [[hosts]]
        domains = ["alpha.test"]
        upstream = "{backend.url}"
        """, workers=2, extra_toml=f'token = "{TOKEN}"\n')
    try:
        c.start()
        yield c
    finally:
        c.stop()


def token_protocol(token: str) -> str:
    return "charon-token." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def head_of(answer: bytes) -> dict[str, str]:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    fields[":status"] = head[0].split(" ")[1]
    return fields


def handshake(c: Charon, target: str, extra: str = "") -> dict[str, str]:
    """A raw /logs WebSocket handshake: the answer's status and fields."""
    with socket.create_connection((HOST, c.admin_port), timeout=5) as s:
        s.sendall((
            f"GET {target} HTTP/1.1\r\nHost: {HOST}:{c.admin_port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return head_of(answer)


# -- the Server header -------------------------------------------------------------------------


def test_no_server_header_naming_aiohttp_or_python(guarded: Charon) -> None:
    port = guarded.admin_port
    answers = {
        path: raw_request(port, f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
                                f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        for path in ("/", "/healthz", "/metrics", "/logs/check", "/no-such-page")
    }
    # aiohttp's own parser answers this one, before any handler or signal.
    answers["malformed"] = raw_request(port, b"GET / HTTP/1.1\r\nBad header line\r\n\r\n")
    answers["oversized"] = raw_request(
        port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    answers["101"] = b""
    statuses = {}
    for name, answer in answers.items():
        if name == "101":
            fields = handshake(guarded, "/logs?backlog=0", f"Authorization: Bearer {TOKEN}\r\n")
        else:
            fields = head_of(answer)
        statuses[name] = fields[":status"]
        assert fields.get("server") == "charon", (name, fields)
    assert statuses == {"/": "200", "/healthz": "200", "/metrics": "200", "/logs/check": "204",
                        "/no-such-page": "404", "malformed": "400", "oversized": "400",
                        "101": "101"}


# -- the token ---------------------------------------------------------------------------------


def test_token_by_header_or_subprotocol_never_by_url(guarded: Charon) -> None:
    assert handshake(guarded, f"/logs?token={TOKEN}")[":status"] == "401"
    assert handshake(guarded, "/logs", f"Authorization: Bearer {TOKEN}\r\n")[":status"] == "101"
    # The page's way: its own subprotocol and the token's; the answer chooses its own.
    fields = handshake(
        guarded, "/logs", f"Sec-WebSocket-Protocol: charon-logs, {token_protocol(TOKEN)}\r\n")
    assert (fields[":status"], fields.get("sec-websocket-protocol")) == ("101", "charon-logs")
    wrong = handshake(
        guarded, "/logs", f"Sec-WebSocket-Protocol: charon-logs, {token_protocol('nope')}\r\n")
    assert wrong[":status"] == "401"
    # The token's subprotocol alone: accepted, and not written to the log as an unknown offer.
    alone = handshake(guarded, "/logs", f"Sec-WebSocket-Protocol: {token_protocol(TOKEN)}\r\n")
    assert alone[":status"] == "101"
    time.sleep(0.3)
    assert token_protocol(TOKEN) not in guarded.log() and TOKEN not in guarded.log()

    def check(headers: str) -> str:
        answer = raw_request(guarded.admin_port, f"GET /logs/check HTTP/1.1\r\nHost: {HOST}\r\n"
                                                 f"Connection: close\r\n{headers}\r\n".encode())
        return head_of(answer)[":status"]

    assert check("") == "401"
    assert check("Authorization: Bearer nope\r\n") == "401"
    assert check(f"Authorization: Bearer {TOKEN}\r\n") == "204"


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} is not installed")
def test_page_keeps_the_token_out_of_the_url(
    guarded: Charon, tmp_path_factory: pytest.TempPathFactory
) -> None:
    profile = tmp_path_factory.mktemp("chromium-admin") / "profile"
    browser = Browser(profile)
    base = f"http://{HOST}:{guarded.admin_port}/"

    async def urls(page: Page) -> list[str]:
        history = await page.call("Page.getNavigationHistory")
        return [entry["url"] for entry in history["entries"]]

    async def request(s: aiohttp.ClientSession, path: str) -> None:
        async with s.get(f"http://{HOST}:{guarded.port}{path}",
                         headers={"Host": "alpha.test"}) as r:
            await r.read()

    async def test(page: Page, s: aiohttp.ClientSession) -> None:
        await page.open(base)
        await page.wait_text("needs a token")
        await page.js("""(() => {
            document.getElementById('token').value = 'wrong';
            document.getElementById('token-form').requestSubmit();
        })()""")
        await page.wait_text("The token was refused")
        await page.js(f"""(() => {{
            document.getElementById('token').value = '{TOKEN}';
            document.getElementById('token-form').requestSubmit();
        }})()""")
        await page.live()
        await request(s, "/after-the-form")
        await page.wait_text("/after-the-form")
        assert await page.js("sessionStorage.getItem('charon-admin-token')") == TOKEN
        assert await page.js("document.getElementById('token').value") == ""
        assert await page.js("location.href") == base
        # A reload in the same tab: no question asked.
        await page.call("Page.reload")
        await page.wait_for("document.readyState === 'complete'")
        await page.live()
        assert await page.js("document.getElementById('token-form').hidden")
        # An old bookmark with ?token=: moved to session storage, gone from the address and
        # the history entry; the filters stay.
        await page.js("sessionStorage.clear()")
        await page.open(f"{base}?token={TOKEN}&host=alpha.test")
        await page.live()
        assert await page.js("location.search") == "?host=alpha.test"
        await request(s, "/after-the-bookmark")
        await page.wait_text("/after-the-bookmark")
        assert await page.js("sessionStorage.getItem('charon-admin-token')") == TOKEN
        assert not [url for url in await urls(page) if TOKEN in url], await urls(page)

    try:
        with_page(browser, test)
    finally:
        browser.stop()


# -- time order ----------------------------------------------------------------------------------


def test_records_of_several_workers_arrive_in_time_order(guarded: Charon) -> None:
    """Load spread over both workers while a subscriber reads: every record comes in time
    order. (Without ordering each worker's 50 ms batches interleave out of order.)"""

    async def go() -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            ws = await s.ws_connect(
                f"http://{HOST}:{guarded.admin_port}/logs",
                params={"backlog": "0", "kind": "request", "path": "/order-"},
                headers={"Authorization": f"Bearer {TOKEN}"})

            async def read() -> None:
                async for message in ws:
                    records.append(message.json())

            reader = asyncio.create_task(read())

            async def client(n: int) -> None:
                # A connection of its own per request: the workers share the accepts.
                connector = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=connector, timeout=timeout) as c:
                    for i in range(40):
                        async with c.get(f"http://{HOST}:{guarded.port}/order-{n}-{i}",
                                         headers={"Host": "alpha.test"}) as r:
                            await r.read()

            await asyncio.gather(*(client(n) for n in range(8)))
            deadline = time.monotonic() + 10
            while len(records) < 320 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await ws.close()
            reader.cancel()
        return records

    records = asyncio.run(go())
    assert len(records) == 320, len(records)
    assert {r["worker"] for r in records} == {0, 1}, "the load did not reach both workers"
    times = [r["time"] for r in records]
    late = [(a, b) for a, b in zip(times, times[1:], strict=False) if b < a]
    assert not late, f"{len(late)} records came after a newer one"


def test_time_order_window_alone() -> None:
    """TimeOrder on a real loop: events fed out of order leave in order, once due."""
    from charon.admin.ordering import TimeOrder

    async def go() -> list[float]:
        out: list[float] = []
        order = TimeOrder(lambda events: out.extend(e[1] for _, e in events), window=0.1)
        now = time.time()
        order.add(0, [["req", now - 0.03], ["req", now - 0.01]])
        order.add(1, [["req", now - 0.05], ["req", now - 0.02]])
        assert out == []  # held within the window
        await asyncio.sleep(0.3)
        order.add(1, [["req", now - 0.04]])  # later than the window: out at once, not held
        await asyncio.sleep(0.05)
        return out

    now_out = asyncio.run(go())
    assert now_out[:4] == sorted(now_out[:4]) and len(now_out) == 5
