"""The live log: /logs on the admin listener, its filters, backlog, access checks, slow
subscribers, and the `charon logs` client. Real Charon processes and backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from harness import REPO, Backend, Charon, free_port

from charon.admin.logs import LiveLogSection
from charon.events.schema import REQUEST

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
TOKEN = "t0ken-for-tests"
ALLOWED = "http://dash.example:8443"


def hosts_toml(backend: Backend, dead_port: int) -> str:
    return f"""
        [[hosts]]
        domains = ["alpha.test"]
        upstream = "{backend.url}"

        [[hosts]]
        domains = ["beta.test"]
        upstream = "{backend.url}"

        [[hosts]]
        domains = ["dead.test"]
        upstream = "http://127.0.0.1:{dead_port}"
        timeouts = {{ connect = "2s" }}
        """


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend("logs_backend.py")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def charon(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Charon]:
    c = Charon(tmp_path_factory.mktemp("logs"), hosts_toml(backend, free_port()), workers=1)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Charon]:
    """A Charon whose admin listener wants a token and allows one more origin."""
    c = Charon(
        tmp_path_factory.mktemp("logs-guarded"), hosts_toml(backend, free_port()), workers=1,
        extra_toml=f'token = "{TOKEN}"\nallowed_origins = ["{ALLOWED}"]\n',
    )
    try:
        c.start()
        yield c
    finally:
        c.stop()


# -- helpers -----------------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class LogStream:
    """A /logs WebSocket and the records read from it so far."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.records: list[dict[str, Any]] = []

    async def until(self, done: Callable[[dict[str, Any]], bool],
                    timeout: float = 5.0) -> list[dict[str, Any]]:
        """Read until a record satisfies `done`; every record read so far."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no matching record within {timeout}s; got {self.records}")
            try:
                message = await self.ws.receive(timeout=remaining)
            except TimeoutError:
                continue
            if message.type != aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"the stream ended: {message}; got {self.records}")
            record = json.loads(message.data)
            self.records.append(record)
            if done(record):
                return self.records

    async def quiet(self, seconds: float) -> list[dict[str, Any]]:
        """Whatever arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = await self.ws.receive(timeout=remaining)
            except TimeoutError:
                break
            assert message.type == aiohttp.WSMsgType.TEXT, message
            self.records.append(json.loads(message.data))
        return self.records


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


@contextlib.asynccontextmanager
async def log_stream(s: aiohttp.ClientSession, c: Charon, headers: dict[str, str] | None = None,
                     **params: str) -> AsyncIterator[LogStream]:
    ws = await s.ws_connect(f"http://{HOST}:{c.admin_port}/logs", params=params,
                            headers=headers or {})
    try:
        yield LogStream(ws)
    finally:
        await ws.close()


async def handshake_status(c: Charon, headers: dict[str, str] | None = None,
                           **params: str) -> int:
    """The status of a /logs WebSocket handshake: 101, or the refusal."""
    async with session() as s:
        try:
            ws = await s.ws_connect(f"http://{HOST}:{c.admin_port}/logs", params=params,
                                    headers=headers or {})
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def get(s: aiohttp.ClientSession, c: Charon, host: str, path: str) -> int:
    async with s.get(f"http://{HOST}:{c.port}{path}", headers={"Host": host}) as r:
        await r.read()
        return r.status


def paths(records: list[dict[str, Any]]) -> list[str]:
    return [r["path"] for r in records]


def tag() -> str:
    return uuid.uuid4().hex[:8]


# -- filters -----------------------------------------------------------------------------------


def test_request_record_fields(charon: Charon) -> None:
    async def go() -> None:
        t = tag()
        async with session() as s, log_stream(s, charon, backlog="0") as log:
            before = time.time()
            assert await get(s, charon, "alpha.test", f"/f-{t}?q=1") == 200
            records = await log.until(lambda r: r.get("path") == f"/f-{t}?q=1")
        record = records[-1]
        assert record["kind"] == "request"
        assert record["host"] == "alpha.test"
        assert record["method"] == "GET"
        assert record["status"] == 200
        assert record["client_ip"] == HOST
        assert record["response_bytes"] == len(f"ok /f-{t}")
        assert 0 <= record["duration"] < 5
        assert before - 1 <= record["time"] <= time.time() + 1
        assert record["worker"] == 0

    run(go())


def test_host_filter(charon: Charon) -> None:
    async def go() -> None:
        t = tag()
        async with session() as s, log_stream(s, charon, host="alpha.test", backlog="0") as log:
            for i, host in enumerate(["beta.test", "alpha.test", "beta.test", "alpha.test"]):
                await get(s, charon, host, f"/h-{t}/{i}")
            records = await log.until(lambda r: r.get("path") == f"/h-{t}/3")
        assert paths(records) == [f"/h-{t}/1", f"/h-{t}/3"]
        assert {r["host"] for r in records} == {"alpha.test"}

    run(go())


def test_status_class_and_code_filters(charon: Charon) -> None:
    async def go() -> None:
        t = tag()
        async with session() as s, \
                log_stream(s, charon, status="4xx", backlog="0", path="/status/") as fours, \
                log_stream(s, charon, status="503", backlog="0") as exact:
            for code in (200, 404, 500, 503, 302, 410):
                await get(s, charon, "alpha.test", f"/status/{code}?{t}")
            got = await fours.until(lambda r: r.get("path") == f"/status/410?{t}")
            five = await exact.until(lambda r: r.get("path") == f"/status/503?{t}")
        assert [r["status"] for r in got] == [404, 410]
        assert [(r["status"], r["path"]) for r in five] == [(503, f"/status/503?{t}")]

    run(go())


def test_path_prefix_filter(charon: Charon) -> None:
    async def go() -> None:
        t = tag()
        async with session() as s, log_stream(s, charon, path=f"/api-{t}/", backlog="0") as log:
            for path in (f"/api-{t}/a", f"/api-{t}x", "/other", f"/api-{t}/b?x=1"):
                await get(s, charon, "beta.test", path)
            records = await log.until(lambda r: r.get("path") == f"/api-{t}/b?x=1")
        assert paths(records) == [f"/api-{t}/a", f"/api-{t}/b?x=1"]

    run(go())


def test_client_filter(charon: Charon) -> None:
    """Requests from 127.0.0.2 and 127.0.0.1; the filter keeps one client's."""
    async def go() -> None:
        t = tag()
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with session() as s, aiohttp.ClientSession(connector=other) as s2, \
                log_stream(s, charon, client="127.0.0.2", backlog="0") as log:
            await get(s, charon, "alpha.test", f"/c-{t}/1")
            await get(s2, charon, "alpha.test", f"/c-{t}/2")
            await get(s, charon, "alpha.test", f"/c-{t}/3")
            await get(s2, charon, "alpha.test", f"/c-{t}/4")
            records = await log.until(lambda r: r.get("path") == f"/c-{t}/4")
        assert paths(records) == [f"/c-{t}/2", f"/c-{t}/4"]
        assert {r["client_ip"] for r in records} == {"127.0.0.2"}

    run(go())


def test_kind_filter_and_websocket_records(charon: Charon) -> None:
    async def go() -> None:
        t = tag()
        async with session() as s, \
                log_stream(s, charon, kind="ws_open,ws_close", backlog="0") as tunnels, \
                log_stream(s, charon, kind="request", backlog="0", path=f"/ws?{t}") as requests:
            await get(s, charon, "alpha.test", f"/ws-plain-{t}")  # a request: filtered out
            ws = await s.ws_connect(f"http://{HOST}:{charon.port}/ws?{t}",
                                    headers={"Host": "beta.test"}, protocols=("logs.v1",))
            for text in ("hello", "world"):
                await ws.send_str(text)
                assert (await ws.receive(timeout=5)).data == text
            await ws.send_str("close 4001")
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4001
            await ws.close()
            records = await tunnels.until(lambda r: r["kind"] == "ws_close")
            upgrade = await requests.until(lambda r: True)
        assert [r["kind"] for r in records] == ["ws_open", "ws_close"]
        opened, closed = records
        assert opened["host"] == closed["host"] == "beta.test"
        assert opened["client_ip"] == closed["client_ip"] == HOST
        assert opened["path"] == closed["path"] == f"/ws?{t}"
        assert opened["subprotocol"] == closed["subprotocol"] == "logs.v1"
        assert closed["close_code"] == 4001
        assert (closed["messages_in"], closed["messages_out"]) == (3, 2)
        # payload bytes: the three messages in, the two echoes out (plus Close frame payloads)
        assert closed["bytes_in"] >= len("helloworldclose 4001")
        assert closed["bytes_out"] >= len("helloworld")
        assert closed["closed_by"] in ("client", "backend")
        assert 0 <= closed["duration"] < 10
        # The upgrade itself is a request record, with status 101.
        assert [(r["kind"], r["status"], r["host"]) for r in upgrade] == [
            ("request", 101, "beta.test")
        ]

    run(go())


def test_upstream_error_record_keeps_its_kind(charon: Charon) -> None:
    """UPSTREAM_ERROR has its own `kind` field (connect, timeout...): it must not replace the
    record's kind; it is sent as `error`."""
    async def go() -> None:
        t = tag()
        async with session() as s, \
                log_stream(s, charon, kind="upstream_error,request", host="dead.test",
                           backlog="0") as log:
            assert await get(s, charon, "dead.test", f"/dead-{t}") == 502
            records = await log.until(lambda r: r["kind"] == "request")
        assert [(r["kind"], r["status"]) for r in records] == [("upstream_error", 502),
                                                                ("request", 502)]
        assert records[0]["error"] == "connect"
        assert records[0]["path"] == f"/dead-{t}"

    run(go())


def test_backlog_on_connect(charon: Charon) -> None:
    async def go() -> None:
        t = tag()
        prefix = f"/bl-{t}/"
        async with session() as s:
            async with log_stream(s, charon, path=prefix, backlog="0") as live:
                for i in range(5):
                    await get(s, charon, "alpha.test", f"{prefix}{i}")
                await live.until(lambda r: r.get("path") == f"{prefix}4")
            async with log_stream(s, charon, path=prefix, backlog="3") as three:
                assert paths(await three.until(lambda r: r["path"] == f"{prefix}4")) == [
                    f"{prefix}2", f"{prefix}3", f"{prefix}4"]
            async with log_stream(s, charon, path=prefix) as default:  # default: up to 100
                got = await default.until(lambda r: r["path"] == f"{prefix}4")
                assert paths(got) == [f"{prefix}{i}" for i in range(5)]
            async with log_stream(s, charon, path=prefix, backlog="0") as none:
                await get(s, charon, "alpha.test", f"{prefix}new")
                got = await none.until(lambda r: True)
                assert paths(got) == [f"{prefix}new"]
            # A large backlog is capped at the ring's size, not refused.
            async with log_stream(s, charon, path=prefix, backlog="100000") as big:
                got = await big.until(lambda r: r["path"] == f"{prefix}new")
                assert len(got) == 6

    run(go())


@pytest.mark.parametrize(
    "params", [{"backlog": "many"}, {"backlog": "-1"}, {"status": "6xx"}, {"status": "ok"},
               {"kind": "request,bogus"}],
)
def test_bad_filters_are_refused(charon: Charon, params: dict[str, str]) -> None:
    assert run(handshake_status(charon, **params)) == 400


def test_metrics_events_are_not_logged(charon: Charon) -> None:
    """METRICS arrive once a second per worker: none of them reaches the stream."""
    async def go() -> list[dict[str, Any]]:
        async with session() as s, log_stream(s, charon, backlog="500") as log:
            return await log.quiet(1.3)

    records = run(go())
    kinds = {r["kind"] for r in records}
    assert kinds <= {"request", "ws_open", "ws_close", "upstream_error", "worker_exit", "reload"}
    assert "metrics" not in kinds


# -- access ------------------------------------------------------------------------------------


def test_origin_checks(charon: Charon) -> None:
    own = f"http://{HOST}:{charon.admin_port}"
    assert run(handshake_status(charon)) == 101  # no Origin: the CLI, scripts
    assert run(handshake_status(charon, headers={"Origin": own})) == 101
    assert run(handshake_status(charon, headers={"Origin": "http://evil.example"})) == 403
    assert run(handshake_status(charon, headers={"Origin": f"http://{HOST}:1"})) == 403
    assert run(handshake_status(charon, headers={"Origin": "null"})) == 403
    # A DNS-rebinding page: its Origin matches the Host it sent, but that Host is a name.
    rebind = f"rebind.example:{charon.admin_port}"
    assert run(handshake_status(
        charon, headers={"Origin": f"http://{rebind}", "Host": rebind})) == 403
    local = f"localhost:{charon.admin_port}"
    local_page = {"Origin": f"http://{local}", "Host": local}
    assert run(handshake_status(charon, headers=local_page)) == 101


def test_token_required_when_configured(guarded: Charon) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert run(handshake_status(guarded)) == 401
    assert run(handshake_status(guarded, headers={"Authorization": "Bearer wrong"})) == 401
    assert run(handshake_status(guarded, headers=bearer)) == 101
    # Never in the URL (it would stay in browser history and logs); see test_operator_admin.
    assert run(handshake_status(guarded, token=TOKEN)) == 401
    # The origin check still applies with a token; a listed origin is allowed.
    assert run(handshake_status(
        guarded, headers={**bearer, "Origin": "http://evil.example"})) == 403
    assert run(handshake_status(guarded, headers={**bearer, "Origin": ALLOWED})) == 101

    async def pages() -> dict[str, int]:
        base = f"http://{HOST}:{guarded.admin_port}"
        out = {}
        async with session() as s:
            for name, url, headers in [
                ("page", f"{base}/", {}),
                ("page+query", f"{base}/?token={TOKEN}", {}),
                ("page+header", f"{base}/", bearer),
                ("healthz", f"{base}/healthz", {}),
                ("metrics", f"{base}/metrics", {}),
            ]:
                async with s.get(url, headers=headers) as r:
                    out[name] = r.status
        return out

    statuses = run(pages())
    # The page holds no data: it is served to anyone, and asks for the token itself.
    assert statuses["page"] == statuses["page+query"] == statuses["page+header"] == 200
    assert statuses["healthz"] == 200
    assert statuses["metrics"] != 401  # the token guards the live log only


def test_worker_exit_record(guarded: Charon) -> None:
    async def go() -> dict[str, Any]:
        async with session() as s, log_stream(
            s, guarded, headers={"Authorization": f"Bearer {TOKEN}"}, kind="worker_exit",
            backlog="0",
        ) as log:
            (pid,) = guarded.worker_pids()
            os.kill(pid, signal.SIGKILL)
            records = await log.until(lambda r: True, timeout=10)
            record = records[0]
            assert record["pid"] == pid
            return record

    record = run(go())
    assert record["kind"] == "worker_exit"
    assert record["worker_id"] == 0
    assert record["status"] == "signal SIGKILL"
    assert record["worker"] == -1  # from the supervisor itself
    guarded.wait_ready()


# -- a slow subscriber -------------------------------------------------------------------------


def _ws_frames(data: bytearray) -> Iterator[tuple[int, bytes]]:
    """Complete unmasked server frames at the front of `data` (consumed)."""
    while len(data) >= 2:
        length, head = data[1] & 0x7F, 2
        if length == 126:
            if len(data) < 4:
                return
            length, head = struct.unpack_from("!H", data, 2)[0], 4
        elif length == 127:
            if len(data) < 10:
                return
            length, head = struct.unpack_from("!Q", data, 2)[0], 10
        if len(data) < head + length:
            return
        opcode = data[0] & 0x0F
        payload = bytes(data[head:head + length])
        del data[:head + length]
        yield opcode, payload


def test_slow_subscriber_gets_a_dropped_notice_and_does_not_delay_others() -> None:
    """The section on its own admin listener, with a small queue: one subscriber never reads
    (a tiny receive buffer), another does. Records are fed through the sink as the hub would."""

    async def go() -> None:
        # No time-order window: records go out as they are fed, so the drops begin while the
        # sink is timed (with one, they come in bursts, 0.2 s later).
        section = LiveLogSection(queue_size=16, backlog_size=50, order_window=0.0)
        app = web.Application()
        section.add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, HOST, port).start()
        loop = asyncio.get_running_loop()
        slow = socket.socket()
        try:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.setblocking(False)
            await loop.sock_connect(slow, (HOST, port))
            await loop.sock_sendall(slow, (
                f"GET /logs?backlog=0 HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode())
            received = bytearray()
            while b"\r\n\r\n" not in received:
                received += await loop.sock_recv(slow, 4096)
            head, _, rest = bytes(received).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            received = bytearray(rest)

            async with aiohttp.ClientSession() as s:
                fast = await s.ws_connect(f"http://{HOST}:{port}/logs?backlog=0")
                fast_got: list[dict[str, Any]] = []
                last_seen = asyncio.Event()

                async def read_fast() -> None:
                    async for message in fast:
                        record = json.loads(message.data)
                        fast_got.append(record)
                        if record.get("path") == "/last":
                            last_seen.set()

                reader = asyncio.create_task(read_fast())
                assert section.subscribers == 2
                slow_sub = section._subscribers[0]  # the first to connect

                def event(path: str) -> list[Any]:
                    return [REQUEST, time.time(), "alpha.test", "GET", 200, 0.001, 10, HOST, path]

                # Feed 8 records per turn of the loop until the slow one has dropped a while;
                # time the sink while it drops: it must not wait for the slow one.
                fed = 0
                sink_time = 0.0
                sink_calls = 0
                while fed < 40000 and not (slow_sub.dropped > 200):
                    for _ in range(8):
                        dropping = slow_sub.dropped > 0
                        started = time.perf_counter()
                        section.on_event(0, 1, event(f"/flood/{fed}/" + "x" * 1500))
                        if dropping:
                            sink_time += time.perf_counter() - started
                            sink_calls += 1
                        fed += 1
                    await asyncio.sleep(0)
                assert slow_sub.dropped > 200, f"the slow subscriber never dropped ({fed} fed)"
                assert sink_time / sink_calls < 0.002, f"{sink_time / sink_calls:.4f}s per event"

                started = time.monotonic()
                section.on_event(0, 1, event("/last"))
                await asyncio.wait_for(last_seen.wait(), 5)
                delay = time.monotonic() - started
                assert delay < 1.0, f"the fast subscriber waited {delay:.2f}s"
                assert not any(r["kind"] == "dropped" for r in fast_got)
                assert len(fast_got) == fed + 1  # all of them, in order
                assert [r["path"].split("/")[2] for r in fast_got[:-1]] == [
                    str(i) for i in range(fed)]

                # The slow one now reads: what was queued before the loss, then the notice of
                # it (/last was lost too), then what comes after it.
                dropped_total = slow_sub.dropped
                texts: list[dict[str, Any]] = []

                async def read_slow(until: Callable[[dict[str, Any]], bool]) -> None:
                    nonlocal received
                    deadline = time.monotonic() + 15
                    while not any(until(r) for r in texts):
                        assert time.monotonic() < deadline, "the slow subscriber never caught up"
                        chunk = await asyncio.wait_for(loop.sock_recv(slow, 1 << 20), 5)
                        assert chunk, "the server closed the slow subscriber"
                        received += chunk
                        texts.extend(json.loads(payload) for opcode, payload
                                     in _ws_frames(received) if opcode == 1)

                await read_slow(lambda r: r["kind"] == "dropped")
                section.on_event(0, 1, event("/after"))
                await read_slow(lambda r: r.get("path") == "/after")
                notice = texts[-2]
                assert notice.keys() == {"kind", "count", "by", "since", "time"}, notice
                assert (notice["kind"], notice["count"], notice["by"]) == (
                    "dropped", dropped_total, "stream")
                assert time.time() - 600 < notice["since"] <= notice["time"] <= time.time()
                assert texts[-1]["path"] == "/after"
                numbers = [int(r["path"].split("/")[2]) for r in texts[:-2]]
                assert numbers == list(range(len(numbers)))  # in order, none missing before
                assert len(numbers) + dropped_total == fed + 1  # the +1: /last
                assert not any(r["kind"] == "dropped" for r in texts[:-2])
                await fast.close()
                reader.cancel()
        finally:
            slow.close()
            await runner.cleanup()

    run(go())


# -- charon logs -------------------------------------------------------------------------------


class Lines:
    """A subprocess's stdout lines, read by a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []  # every line taken by wait_for
        assert proc.stdout is not None
        threading.Thread(target=self._read, args=(proc.stdout,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)

    def wait_for(self, match: Callable[[str], bool], poke: Callable[[int], None],
                 timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        attempt = 0
        while time.monotonic() < deadline:
            poke(attempt)
            attempt += 1
            end = min(time.monotonic() + 0.5, deadline)
            while time.monotonic() < end:
                try:
                    line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
                except queue.Empty:
                    break
                self.seen.append(line)
                if match(line):
                    return line
        raise AssertionError("no matching line from charon logs")


def charon_logs(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "charon", "logs", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def proxy_get(c: Charon, host: str, path: str) -> None:
    with socket.create_connection((HOST, c.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        while sock.recv(65536):
            pass


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=5)
    return proc.returncode, err


def test_cli_json(charon: Charon) -> None:
    t = tag()
    proc = charon_logs("--admin", f"{HOST}:{charon.admin_port}", "--json", "--kind", "request",
                       "--backlog", "0")
    try:
        out = Lines(proc)
        line = out.wait_for(
            lambda text: f"/cli-{t}/" in text,
            lambda n: proxy_get(charon, "alpha.test", f"/cli-{t}/{n}"),
        )
        record = json.loads(line)
        assert record["kind"] == "request"
        assert record["host"] == "alpha.test"
        assert record["status"] == 200
        assert record["path"].startswith(f"/cli-{t}/")
        # Connected: an upstream error (a record of another kind), then a request.
        proxy_get(charon, "dead.test", f"/cli-dead-{t}")
        proxy_get(charon, "alpha.test", f"/cli-end-{t}")
        out.wait_for(lambda text: f"/cli-end-{t}" in text, lambda n: None)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert "Traceback" not in err
    kinds = [json.loads(text)["kind"] for text in out.seen]
    assert set(kinds) == {"request"}
    assert any(f"/cli-dead-{t}" in text for text in out.seen)  # its request record, 502


def test_cli_readable_lines(charon: Charon) -> None:
    t = tag()
    proc = charon_logs("--admin", f"{HOST}:{charon.admin_port}", "--host", "alpha.test",
                       "--backlog", "0")
    try:
        out = Lines(proc)
        line = out.wait_for(lambda text: f"cli-h-{t}" in text,
                            lambda n: (proxy_get(charon, "beta.test", f"/cli-beta-{t}"),
                                       proxy_get(charon, "alpha.test", f"/status/404?cli-h-{t}")))
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert not any("beta" in text for text in out.seen)
    assert "\x1b" not in line  # stdout is not a terminal: no colors
    assert f"alpha.test {HOST} GET /status/404?cli-h-{t} → 404 " in line
    assert line.rstrip().endswith(" 10 B")


def test_open_streams_do_not_hold_up_a_stop(tmp_path: Path, backend: Backend) -> None:
    """Charon stops promptly with a `charon logs` attached; the client says the stream ended."""
    c = Charon(tmp_path, hosts_toml(backend, free_port()), workers=1)
    proc: subprocess.Popen[str] | None = None
    try:
        c.start()
        proc = charon_logs("--admin", f"{HOST}:{c.admin_port}", "--json")
        Lines(proc).wait_for(lambda text: "/attached" in text,
                             lambda n: proxy_get(c, "alpha.test", "/attached"))
        started = time.monotonic()
        assert c.stop() == 0
        assert time.monotonic() - started < 8
        code, err = stop_after_exit(proc)
    finally:
        c.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert code == 1
    assert "stream from" in err and "ended (close code 1001)" in err, err


def test_cli_cannot_connect() -> None:
    proc = charon_logs("--admin", f"{HOST}:{free_port()}")
    code, err = stop_after_exit(proc)
    assert code == 1
    assert "charon logs: cannot connect to" in err
    assert "Traceback" not in err


def test_cli_needs_the_token(guarded: Charon) -> None:
    code, err = stop_after_exit(charon_logs("--admin", f"{HOST}:{guarded.admin_port}"))
    assert code == 1
    assert "401" in err and "--token" in err
    assert "Traceback" not in err


def stop_after_exit(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)
        raise AssertionError("charon logs did not exit") from None
    return proc.returncode, err
