"""Workers whose supervisor was SIGKILLed: they stop accepting at once, close their WebSocket
tunnels with 1001, cut what is still in flight after a short grace (not shutdown_timeout) and
exit. Real processes on 127.0.0.1; every process is stopped by PID."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from harness import HOST, Backend, Charon, kill_pid, pid_alive, wait_until

pytestmark = pytest.mark.timeout(90)


class SlowRequest:
    """A GET of /sleep/30 on its own connection, read in a thread until the server closes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=60)
        self.sock.sendall(f"GET /sleep/30 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        self.data = b""
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.data += chunk
        except OSError:
            pass
        finally:
            self.ended.set()
            self.sock.close()


def sleeping(backend: Backend) -> int:
    with urllib.request.urlopen(f"{backend.url}/sleeping", timeout=5) as r:
        return int(r.read())


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2.0)
        return s.connect_ex((HOST, port)) == errno.ECONNREFUSED


def test_workers_of_a_killed_supervisor_close_tunnels_with_1001_and_exit_soon(
    tmp_path: Path, backend_factory: Callable[..., Backend]
) -> None:
    slow = backend_factory("sup_backend.py")
    ws_backend = backend_factory("ws_backend.py")
    hosts = (f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{slow.url}"\n'
             f'[[hosts]]\ndomains = ["ws.test"]\nupstream = "{ws_backend.url}"\n')
    # A drain that would keep an orphan serving for a minute: it must not wait for it.
    charon = Charon(tmp_path, hosts, workers=2, server_toml='shutdown_timeout = "60s"')
    charon.start()
    workers = charon.worker_pids()
    assert len(workers) == 2

    async def go() -> aiohttp.WSMessage:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"http://{HOST}:{charon.port}/echo",
                                    headers={"Host": "ws.test"})
            await ws.send_str("before")
            assert (await ws.receive(timeout=10)).data == "before"
            request = SlowRequest(charon.port)
            await asyncio.to_thread(wait_until, lambda: sleeping(slow) == 1, 10)
            os.kill(charon.pid, signal.SIGKILL)
            message = await ws.receive(timeout=15)
            await asyncio.to_thread(request.ended.wait, 20)
            assert request.ended.is_set(), "the in-flight request was never cut"
            await ws.close()
            return message

    try:
        message = asyncio.run(go())
        assert charon.proc is not None
        charon.proc.wait(5)
        # Gone in a few seconds (the orphan grace is 3 s), not after shutdown_timeout.
        wait_until(lambda: not any(pid_alive(p) for p in workers), 15,
                   what=f"the orphaned workers {workers} to exit")
    finally:
        for pid in workers:
            kill_pid(pid)
        charon.stop()
    assert message.type == aiohttp.WSMsgType.CLOSE and message.data == 1001, message
    assert refused(charon.port), "something still listens on the orphans' port"
    log = charon.log()
    assert log.count(f"the supervisor (pid {charon.pid}) is gone") == 2, log
