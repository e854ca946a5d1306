"""wss:// through Charon's TLS listener (issue 12): the same tunnel as ws:// (echo with a
subprotocol and permessage-deflate, large messages, many in flight, close codes), WebSockets that
outlive a reload changing the certificate files, and the Autobahn quick profile over TLS.

The client is `websockets` with an ssl context trusting only the test CA; the backend is
tests/backends/ws_backend.py."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_autobahn
from harness import HOST, Backend, free_port, wait_until
from test_autobahn import AB_VENV, AUTOBAHN, _run_suite, _script
from test_websocket_handshake import last_close, run, ws_connect
from tlsca import Leaf, TestCA
from tlsenv import TlsCharon, client_context, handshake, running_tls_charon, same_certificate
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

MiB = 1024 * 1024
NAME = "ws.example.com"


def wss_connect(port: int, path: str, ctx: ssl.SSLContext, name: str = NAME,
                **kwargs: Any) -> connect:
    """A `websockets` client over TLS to 127.0.0.1:port, with SNI and Host `name`."""
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("close_timeout", 2)
    kwargs.setdefault("proxy", None)
    return connect(f"wss://{name}:{port}{path}", host=HOST, port=port, ssl=ctx,
                   server_hostname=name, **kwargs)


def _hosts(ws: Backend, leaf: Leaf) -> str:
    return f"""
        [[hosts]]
        domains = ["{NAME}", "{HOST}"]
        upstream = "{ws.url}"
        tls = {{ cert = "{leaf.cert_path}", key = "{leaf.key_path}" }}
        """


@dataclass
class Env:
    ca: TestCA
    leaf: Leaf
    ws: Backend
    charon: TlsCharon
    ctx: ssl.SSLContext


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("tls-ws")
    ca = TestCA(tmp / "ca")
    leaf = ca.issue([NAME, HOST])
    ws = Backend("ws_backend.py")
    try:
        with running_tls_charon(tmp, _hosts(ws, leaf)) as charon:
            yield Env(ca, leaf, ws, charon, client_context(ca))
    finally:
        ws.stop()


# -- echo ------------------------------------------------------------------------------------


def test_wss_echo_with_subprotocol_and_permessage_deflate(env: Env) -> None:
    async def scenario() -> None:
        async with wss_connect(env.charon.tls_port, "/echo", env.ctx,
                               subprotocols=["v9.chat", "v2.chat"]) as ws:
            assert ws.subprotocol == "v2.chat"
            assert ws.response is not None
            assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
            for message in ("hello over TLS", "héllo ✓" * 100, "", b"\x00\xff" * 5000, b""):
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 5) == message

    run(scenario())


@pytest.mark.parametrize("compression", [None, "deflate"])
def test_wss_large_messages(env: Env, compression: str | None) -> None:
    data = os.urandom(MiB)
    text = "x" * MiB  # compresses to almost nothing: the inflated size is what counts

    async def scenario() -> None:
        async with wss_connect(env.charon.tls_port, "/echo", env.ctx, max_size=None,
                               compression=compression) as ws:
            for message in (data, text, data):
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 20) == message

    run(scenario(), timeout=60)


def test_wss_many_messages_in_flight(env: Env) -> None:
    """20 connections, each with 200 messages sent before the first answer is read."""

    async def one(index: int) -> None:
        async with wss_connect(env.charon.tls_port, "/echo", env.ctx) as ws:
            sent = [f"{index}:{i}:" + "m" * (i % 300) for i in range(200)]
            await asyncio.gather(*(ws.send(m) for m in sent))
            got = [await asyncio.wait_for(ws.recv(), 10) for _ in sent]
            assert got == sent

    async def scenario() -> None:
        await asyncio.gather(*(one(i) for i in range(20)))

    run(scenario(), timeout=60)


# -- closing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 4001])
def test_backend_close_code_reaches_client_as_over_ws(env: Env, code: int) -> None:
    async def close_seen(secure: bool) -> tuple[int | None, str | None]:
        opened = (wss_connect(env.charon.tls_port, f"/close/{code}", env.ctx) if secure
                  else ws_connect(env.charon.port, f"/close/{code}"))
        async with opened as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        frame = closed.value.rcvd
        return (frame.code, frame.reason) if frame else (None, None)

    async def scenario() -> None:
        over_tls = await close_seen(True)
        assert over_tls == (code, f"bye {code}")
        assert over_tls == await close_seen(False)

    run(scenario())


def test_client_close_code_reaches_backend(env: Env) -> None:
    cid = f"tls-close-{os.getpid()}"

    async def scenario() -> None:
        async with wss_connect(env.charon.tls_port, f"/echo?id={cid}", env.ctx) as ws:
            await ws.send("bye soon")
            assert await asyncio.wait_for(ws.recv(), 5) == "bye soon"
            await ws.close(4000, "client says bye")

    run(scenario())
    seen = last_close(env.ws, cid)
    assert (seen["code"], seen["reason"]) == (4000, "client says bye")


# -- reload with new certificate files -------------------------------------------------------


def _reload_count(charon: TlsCharon) -> int:
    return int(((charon.health() or {}).get("reloads") or {}).get("count", 0))


@pytest.mark.timeout(90)
def test_wss_survives_reload_that_changes_certificate_files(
        tmp_path: Path, env: Env) -> None:
    """The certificate files are replaced (same paths, a new key) and SIGHUP sent: new
    connections get the new certificate, the WebSockets opened before keep echoing."""
    ca = env.ca
    old = ca.issue([NAME, HOST], file_name="reloaded")
    with running_tls_charon(tmp_path, _hosts(env.ws, old), workers=2) as charon:
        port = charon.tls_port

        async def scenario() -> None:
            opened = [await wss_connect(port, "/echo", env.ctx) for _ in range(4)]
            try:
                for i, ws in enumerate(opened):
                    await ws.send(f"before {i}")
                    assert await asyncio.wait_for(ws.recv(), 5) == f"before {i}"
                before = handshake(port, NAME, env.ctx)
                assert same_certificate(before.certificate, old)

                new = ca.issue([NAME, HOST], file_name="reloaded")  # overwrites the files
                count = _reload_count(charon)
                os.kill(charon.pid, signal.SIGHUP)
                await asyncio.to_thread(
                    wait_until, lambda: _reload_count(charon) > count, 30,
                    what="the reload's result")
                status = (charon.health() or {}).get("reloads", {})
                assert status.get("last_result") == "success", status

                after = handshake(port, NAME, env.ctx)
                assert same_certificate(after.certificate, new), "the old certificate still"
                for round_ in range(3):
                    for i, ws in enumerate(opened):
                        await ws.send(f"after {round_} {i}")
                        assert await asyncio.wait_for(ws.recv(), 5) == f"after {round_} {i}"
                async with wss_connect(port, "/echo", env.ctx) as fresh:
                    await fresh.send("new connection")
                    assert await asyncio.wait_for(fresh.recv(), 5) == "new connection"
            finally:
                for ws in opened:
                    await ws.close()

        run(scenario(), timeout=60)


# -- Autobahn over wss -----------------------------------------------------------------------


class TlsRelay:
    """ws:// in, wss:// out: a plaintext listener on 127.0.0.1 that carries each connection on
    to Charon's TLS listener (the chain verified against the test CA, SNI `name`), byte for
    byte. The Autobahn client takes ws:// URLs only (autobahn_through.sh refuses others, and
    wstest's own wss client verifies nothing), so it talks TLS through this."""

    def __init__(self, target_port: int, ctx: ssl.SSLContext, name: str) -> None:
        self.target_port, self.ctx, self.name = target_port, ctx, name
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.errors: list[str] = []
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(5), "the relay did not start"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, HOST, self.port))
        started.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()
            self.loop.run_until_complete(server.wait_closed())
            self.loop.close()

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter
                     ) -> None:
        try:
            t_reader, t_writer = await asyncio.open_connection(
                HOST, self.target_port, ssl=self.ctx, server_hostname=self.name,
                ssl_handshake_timeout=5)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(repr(exc))
            c_writer.close()
            return
        await asyncio.gather(self._pump(c_reader, t_writer), self._pump(t_reader, c_writer))

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One side's end (EOF or reset) ends both: a TLS stream cannot be half-closed.
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.timeout(600)
def test_autobahn_quick_over_wss_same_verdicts(tmp_path: Path, env: Env,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # CHARON_AUTOBAHN_DIR: the harness when this checkout is not next to ../shared (a worktree)
    harness = Path(os.environ.get("CHARON_AUTOBAHN_DIR") or AUTOBAHN)
    if not harness.is_dir():
        pytest.skip(f"the Autobahn harness is not there: {harness} is missing "
                    "(set CHARON_AUTOBAHN_DIR)")
    monkeypatch.setattr(test_autobahn, "AUTOBAHN", harness)
    if not (AB_VENV / "bin" / "wstest").exists():
        setup = _script("setup_autobahn.sh", timeout=900)
        assert setup.returncode == 0, f"setup_autobahn.sh failed:\n{setup.stdout}\n{setup.stderr}"
    backend_port = free_port()
    started = _script("backend.sh", "start", str(backend_port), timeout=30)
    assert started.returncode == 0, f"backend.sh start failed:\n{started.stderr}"
    try:
        direct = _run_suite(f"ws://{HOST}:{backend_port}/", tmp_path / "direct", "direct",
                            backend_port)
        hosts = f"""
            [[hosts]]
            domains = ["{NAME}", "{HOST}"]
            upstream = "http://{HOST}:{backend_port}"
            tls = {{ cert = "{env.leaf.cert_path}", key = "{env.leaf.key_path}" }}
            """
        with running_tls_charon(tmp_path, hosts) as charon:
            relay = TlsRelay(charon.tls_port, env.ctx, NAME)
            try:
                through = _run_suite(f"ws://{HOST}:{relay.port}/", tmp_path / "wss",
                                     "charon-wss", backend_port)
            finally:
                relay.stop()
            assert not relay.errors, relay.errors
    finally:
        _script("backend.sh", "stop", str(backend_port), timeout=30)

    assert direct["total"]["total"] >= 200, "the direct run ran too few cases"
    worse = []
    for case, want in direct["cases"].items():
        got = through["cases"].get(case)
        if got is None:
            worse.append(f"{case}: missing over wss")
            continue
        for key in ("behavior", "behaviorClose", "handshake_completed"):
            if got[key] != want[key]:
                worse.append(f"{case}: {key} {want[key]} direct, {got[key]} over wss")
    assert not worse, "verdicts differ over wss through Charon:\n" + "\n".join(worse)


@pytest.mark.timeout(60)
def test_wss_drained_by_new_generation_closed_1001(tmp_path: Path, env: Env) -> None:
    """Past `drain_timeout` after a new generation (SIGUSR2; a SIGHUP that changes nothing a
    worker took at start reloads in place), the old worker ends its wss tunnels with a Close
    1001 written through TLS at a frame boundary, as over ws://; the client reconnects."""
    with running_tls_charon(tmp_path, _hosts(env.ws, env.leaf),
                            server_toml='drain_timeout = "1s"') as charon:
        port = charon.tls_port

        async def scenario() -> None:
            async with wss_connect(port, "/echo", env.ctx) as ws:
                await ws.send("before the reload")
                assert await asyncio.wait_for(ws.recv(), 5) == "before the reload"
                count = _reload_count(charon)
                os.kill(charon.pid, signal.SIGUSR2)
                await asyncio.to_thread(wait_until, lambda: _reload_count(charon) > count, 30,
                                        what="the reload's result")
                with pytest.raises(ConnectionClosed) as closed:
                    while True:  # echoes until the drain ends it
                        await ws.send("during the drain")
                        await asyncio.wait_for(ws.recv(), 10)
                        await asyncio.sleep(0.1)
                assert closed.value.rcvd is not None, "no Close frame: the tunnel was cut"
                assert closed.value.rcvd.code == 1001
            async with wss_connect(port, "/echo", env.ctx) as fresh:
                await fresh.send("after")
                assert await asyncio.wait_for(fresh.recv(), 5) == "after"

        run(scenario(), timeout=45)
