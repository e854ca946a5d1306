"""`plan.waits` on the HTTP path: work a route's rules leave before the request goes on (basic
auth's verification, forward auth's request). A worker's HTTP path runs in this process (its
WorkerContext and ClientConnection on a uvloop loop, a real listening socket) with a rules maker
that adds a check of the test's own, in front of a real backend (http_backend.py) that tells
what it received; clients are raw sockets. For auth14: `WaitingMaker` shows how to put a
check of one's own in front of a route without the config parser."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop
from harness import HOST, Backend
from test_websocket_handshake import client_frame, ws_request

from charon.config.loader import load_config_text
from charon.config.model import ProxyHost
from charon.config.rules import Rules
from charon.events.publisher import EventPublisher
from charon.worker.access.checks import Check, RouteChecks
from charon.worker.access.maker import AccessMaker
from charon.worker.context import WorkerContext
from charon.worker.http.client import ClientConnection
from charon.worker.http.errors import HttpError
from charon.worker.http.request import RequestPlan
from charon.worker.routing import config_router
from charon.worker.telemetry import Telemetry

Wait = Callable[[RequestPlan], Awaitable["HttpError | None"]]


class WaitingMaker(AccessMaker):
    """Every route's rules: the usual checks, then `check` (the test's)."""

    def __init__(self, check: Check) -> None:
        super().__init__()
        self.check = check

    def route_rules(self, rules: Rules, host: ProxyHost, zone: str) -> RouteChecks:
        usual = super().route_rules(rules, host, zone)
        checks = [*(usual.checks if usual is not None else ()), self.check]
        return RouteChecks(rules, checks, may_wait=True)


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    backend = Backend("http_backend.py", "--name", "waits")
    yield backend
    backend.stop()


class Worker:
    """The HTTP path of one worker, serving on a free port of 127.0.0.1 in this process."""

    def __init__(self, backend: Backend, wait: Wait) -> None:
        self.backend = backend
        self.wait = wait
        self.calls: list[bytes] = []  # the path of each request the check saw
        self.cancelled = 0

    def check(self, plan: RequestPlan, headers: list[tuple[bytes, bytes]]) -> None:
        self.calls.append(plan.path)

        async def counted(plan: RequestPlan) -> HttpError | None:
            try:
                return await self.wait(plan)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

        plan.waits = [*(plan.waits or ()), counted]

    async def __aenter__(self) -> Worker:
        loop = asyncio.get_running_loop()
        config = load_config_text(
            # (A rule, so the route is not bare: a bare route's rules are not even made.)
            f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{self.backend.url}"\n'
            'deny = ["192.0.2.1"]\n', "w.toml")
        ctx = self.ctx = WorkerContext(loop, config, Telemetry(EventPublisher(loop, None, 0)))
        ctx.router = config_router(config, ctx.pool, groups=ctx.groups,
                                   rules=WaitingMaker(self.check))
        self.server = await loop.create_server(lambda: ClientConnection(ctx), HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for conn in list(self.ctx.connections):
            conn.close()
        self.ctx.close_idle_upstreams()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(coro(), 20))


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {n.strip().lower(): v.strip() for n, _, v in (x.partition(":") for x in lines[1:-2])}
    body = await reader.readexactly(int(fields.get("content-length", "0")))
    return int(lines[0].split(" ")[1]), fields, body


def after(seconds: float, answer: HttpError | None = None) -> Wait:
    async def wait(plan: RequestPlan) -> HttpError | None:
        await asyncio.sleep(seconds)
        return answer

    return wait


def test_a_wait_that_lets_the_request_through(backend: Backend) -> None:
    async def go() -> None:
        async with Worker(backend, after(0.2)) as w:
            reader, writer = await asyncio.open_connection(HOST, w.port)
            body = b"x" * 300_000  # more than is held before reading pauses
            writer.write(b"POST /echo/a HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                         % (HOST.encode(), len(body)) + body)
            status, _, answer = await response(reader)
            assert status == 200
            seen: dict[str, Any] = json.loads(answer)
            assert seen["raw_path"] == "/echo/a" and seen["body_length"] == len(body)
            writer.write(b"GET /echo/b HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST.encode())
            status, _, answer = await response(reader)
            assert status == 200 and json.loads(answer)["raw_path"] == "/echo/b"
            assert w.calls == [b"/echo/a", b"/echo/b"]
            writer.close()

    run(go)


def test_a_wait_that_answers_keeps_the_connection(backend: Backend) -> None:
    refusal = HttpError(401, "authentication required", close=False, denied="auth",
                        fields=b'WWW-Authenticate: Basic realm="t"\r\n')

    async def go() -> None:
        async with Worker(backend, after(0.1, refusal)) as w:
            reader, writer = await asyncio.open_connection(HOST, w.port)
            writer.write(b"POST /echo/secret HTTP/1.1\r\nHost: %s\r\nContent-Length: 5\r\n\r\n"
                         b"hello" % HOST.encode())
            status, fields, _ = await response(reader)
            assert status == 401 and fields["www-authenticate"] == 'Basic realm="t"'
            assert fields["connection"] == "keep-alive"
            # A body still on its way when the answer went: read, dropped, then the next one.
            writer.write(b"POST /echo/late HTTP/1.1\r\nHost: %s\r\nContent-Length: 100000\r\n"
                         b"\r\n" % HOST.encode())
            await asyncio.sleep(0.15)  # the answer goes before the body comes
            status, _, _ = await response(reader)
            assert status == 401
            writer.write(b"y" * 100_000)
            w.wait = after(0)
            writer.write(b"GET /echo/next HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST.encode())
            status, _, answer = await response(reader)
            assert status == 200 and json.loads(answer)["raw_path"] == "/echo/next"
            writer.close()

    run(go)


def test_a_client_that_leaves_cancels_the_wait(backend: Backend) -> None:
    async def go() -> None:
        async with Worker(backend, after(30)) as w:
            with socket.create_connection((HOST, w.port), 5) as s:
                s.sendall(b"GET /echo/gone HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST.encode())
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    if w.calls:
                        break
                # A reset, not a FIN: a client that half-closes still gets its answer.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            for _ in range(100):
                await asyncio.sleep(0.02)
                if w.cancelled:
                    break
            assert w.cancelled == 1

    run(go)


def test_a_failing_wait_is_a_500(backend: Backend) -> None:
    async def broken(plan: RequestPlan) -> HttpError | None:
        raise RuntimeError("a bug")

    async def go() -> None:
        async with Worker(backend, broken) as w:
            reader, writer = await asyncio.open_connection(HOST, w.port)
            writer.write(b"GET /echo/x HTTP/1.1\r\nHost: %s\r\n\r\n" % HOST.encode())
            status, _, _ = await response(reader)
            assert status == 500
            writer.close()

    run(go)


def test_a_websocket_handshake_waits_then_opens() -> None:
    ws_backend = Backend("ws_backend.py")

    async def go() -> None:
        async with Worker(ws_backend, after(0.1)) as w:
            reader, writer = await asyncio.open_connection(HOST, w.port)
            writer.write(ws_request("/echo", HOST))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 "), head
            writer.write(client_frame(0x1, b"hi"))
            frame = await reader.readexactly(4)
            assert frame == b"\x81\x02hi"
            writer.write(client_frame(0x8, b"\x03\xe8"))
            writer.close()
            assert w.calls == [b"/echo"]

    try:
        run(go)
    finally:
        ws_backend.stop()
