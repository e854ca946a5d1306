"""The demo backend, run as a real subprocess exactly as `charon demo` starts it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
RECV_TIMEOUT = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Backend:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, stderr_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.stderr_path = stderr_path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")


def _wait_healthy(backend: Backend) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if backend.proc.poll() is not None:
            pytest.fail(f"backend exited with {backend.proc.returncode}:\n{backend.stderr()}")
        try:
            with urllib.request.urlopen(backend.base + "/healthz", timeout=1) as resp:
                if resp.status == 200 and resp.read() == b"ok":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    pytest.fail(f"backend not healthy within {START_TIMEOUT}s:\n{backend.stderr()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


@contextlib.contextmanager
def running_backend() -> Iterator[Backend]:
    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        stderr_path = Path(tmp) / "stderr.txt"
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "charon.demo.backend",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        backend = Backend(proc, port, stderr_path)
        try:
            _wait_healthy(backend)
            yield backend
        finally:
            _stop(proc)


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with running_backend() as b:
        yield b


async def _recv_json(
    ws: aiohttp.ClientWebSocketResponse, until: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Next JSON text message matching `until`, skipping others (e.g. join notices)."""
    while True:
        msg = await ws.receive(timeout=RECV_TIMEOUT)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
        payload = json.loads(msg.data)
        if until(payload):
            return dict(payload)


def test_index_page(backend: Backend) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as session, session.get(backend.base + "/") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            assert resp.charset == "utf-8"
            body = await resp.text()
            assert "Charon demo" in body
            assert "chat.v1" in body

    asyncio.run(run())


def test_healthz_and_plain_get_on_ws(backend: Backend) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.get(backend.base + "/healthz") as resp:
                assert resp.status == 200
                assert await resp.text() == "ok"
            async with session.get(backend.base + "/ws") as resp:
                assert resp.status == 426

    asyncio.run(run())


def test_api_info_reflects_request(backend: Backend) -> None:
    headers = {"X-Charon-Test": "hello 123", "X-Forwarded-For": "203.0.113.7"}

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.get(backend.base + "/api/info", headers=headers) as resp:
                assert resp.status == 200
                assert resp.content_type == "application/json"
                info = await resp.json()
            # encoded=True: neither yarl nor aiohttp may touch "..", "%2F" or the query.
            url = yarl.URL(backend.base + "/a/../b%2F?x=1", encoded=True)
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200
                odd = await resp.json()
        return info, odd

    info, odd = asyncio.run(run())
    assert info["method"] == "GET"
    assert info["raw_path"] == "/api/info"
    assert info["headers"]["X-Charon-Test"] == "hello 123"
    assert info["headers"]["X-Forwarded-For"] == "203.0.113.7"
    assert ["X-Charon-Test", "hello 123"] in info["raw_headers"]
    assert info["remote"] == "127.0.0.1"
    assert info["backend_pid"] == backend.proc.pid

    assert odd["raw_path"] == "/a/../b%2F?x=1"
    assert odd["query_string"] == "x=1"
    assert odd["headers"]["X-Charon-Test"] == "hello 123"


def test_api_info_other_methods(backend: Backend) -> None:
    async def run() -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(backend.base + "/api/info", data=b"12345") as resp,
        ):
            assert resp.status == 200
            return dict(await resp.json())

    info = asyncio.run(run())
    assert info["method"] == "POST"
    assert info["body_bytes"] == 5


def test_ws_chat_broadcast_and_binary_echo(backend: Backend) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            a = await session.ws_connect(backend.base + "/ws", protocols=("chat.v1",))
            welcome_a = await _recv_json(a, lambda m: True)
            assert welcome_a["system"] == "welcome"
            assert welcome_a["online"] == 1
            a_id = welcome_a["you"]

            b = await session.ws_connect(backend.base + "/ws", protocols=("chat.v1",))
            welcome_b = await _recv_json(b, lambda m: True)
            assert welcome_b["system"] == "welcome"
            assert welcome_b["online"] == 2
            b_id = welcome_b["you"]
            assert a_id != b_id
            join = await _recv_json(a, lambda m: True)
            assert join == {"system": "join", "id": b_id, "online": 2, "at": join["at"]}

            assert a.protocol == "chat.v1"
            assert b.protocol == "chat.v1"

            await a.send_str("hello <b>world</b>")
            for ws in (a, b):
                msg = await _recv_json(ws, lambda m: "from" in m)
                assert msg["from"] == a_id
                assert msg["text"] == "hello <b>world</b>"
                assert "T" in msg["at"]

            # Binary goes back to the sender only: B's next message must be the text after it.
            payload = bytes(range(256)) * 4
            await a.send_bytes(payload)
            echoed = await a.receive(timeout=RECV_TIMEOUT)
            assert echoed.type == aiohttp.WSMsgType.BINARY
            assert echoed.data == payload
            await a.send_str("after binary")
            nxt = await b.receive(timeout=RECV_TIMEOUT)
            assert nxt.type == aiohttp.WSMsgType.TEXT
            assert json.loads(nxt.data)["text"] == "after binary"
            assert (await _recv_json(a, lambda m: True))["text"] == "after binary"

            await b.close()
            leave = await _recv_json(a, lambda m: True)
            assert leave["system"] == "leave"
            assert leave["id"] == b_id
            assert leave["online"] == 1
            await a.close()

    asyncio.run(run())


def test_ws_without_subprotocol_still_works(backend: Backend) -> None:
    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(backend.base + "/ws") as ws,
        ):
            assert ws.protocol is None
            assert (await _recv_json(ws, lambda m: True))["system"] == "welcome"
            await ws.send_str("echo")
            assert (await _recv_json(ws, lambda m: "from" in m))["text"] == "echo"

    asyncio.run(run())


def test_sigterm_exits_cleanly_with_open_websocket() -> None:
    with running_backend() as b:

        async def run() -> None:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(b.base + "/ws", protocols=("chat.v1",)) as ws,
            ):
                assert (await _recv_json(ws, lambda m: True))["system"] == "welcome"
                os.kill(b.proc.pid, signal.SIGTERM)
                msg = await ws.receive(timeout=STOP_TIMEOUT)
                assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
                assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY

        asyncio.run(run())
        assert b.proc.wait(timeout=STOP_TIMEOUT) == 0, b.stderr()
        assert "Traceback" not in b.stderr()
