"""Real processes for the tests: Charon's supervisor and backends, on 127.0.0.1 only.

Every process started here is stopped by PID (SIGTERM, then SIGKILL after a bounded wait),
including the workers a supervisor spawned.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


_handed_out: set[int] = set()
# Ports are drawn below Linux's ephemeral range (32768-60999 by default), so no outgoing
# connection takes one, and under pytest-xdist each test process draws from its own slice:
# two processes never hand out the same port.
_PORTS_FIRST, _PORTS_LAST = 10000, 32000
_XDIST_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
_XDIST_COUNT = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
_SLICE = (_PORTS_LAST - _PORTS_FIRST) // _XDIST_COUNT
_SLICE_FIRST = _PORTS_FIRST + (_XDIST_INDEX % _XDIST_COUNT) * _SLICE


def free_port() -> int:
    """A port nothing listens on, never one this process handed out before."""
    for _ in range(1000):
        port = _SLICE_FIRST + random.randrange(_SLICE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no fresh free port")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:  # type: ignore[type-arg]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def child_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


class Charon:
    """A supervisor started with `charon run --config` on a generated config file."""

    def __init__(self, tmp: Path, hosts_toml: str, workers: int = 1, extra_toml: str = "",
                 server_toml: str = "") -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.config_path = tmp / f"charon-{self.port}.toml"
        self.config_path.write_text(
            textwrap.dedent(
                f"""\
                [server]
                listen = ["{HOST}:{self.port}"]
                workers = {workers}
                {server_toml}
                [admin]
                listen = "{HOST}:{self.admin_port}"
                """
            )
            + textwrap.dedent(extra_toml)
            + "\n"
            + textwrap.dedent(hosts_toml)
        )
        self.log_path = tmp / f"charon-{self.port}.log"
        self.proc: subprocess.Popen | None = None  # type: ignore[type-arg]
        self.workers = workers
        self._seen_pids: set[int] = set()

    def start(self, wait_ready: bool = True) -> Charon:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "charon", "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )
        if wait_ready:
            self.wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def health(self) -> dict | None:  # type: ignore[type-arg]
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.admin_port}/healthz", timeout=2) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except OSError as exc:
            body = getattr(exc, "read", None)
            if body is not None:
                with contextlib.suppress(Exception):
                    return json.loads(body())  # type: ignore[no-any-return]
            return None

    def worker_pids(self) -> list[int]:
        pids = [p for p in child_pids(self.pid)]
        self._seen_pids.update(pids)
        return pids

    def wait_ready(self, workers: int | None = None, timeout: float = 20.0) -> None:
        want = self.workers if workers is None else workers

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"charon exited with {self.proc.returncode}:\n{self.log()}")
            h = self.health()
            return bool(h and h.get("workers_ready", 0) >= want)

        wait_until(ready, timeout, what="charon to be ready")
        self.worker_pids()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        self.worker_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in self._seen_pids:
            kill_pid(pid)
        return self.proc.returncode


@contextlib.contextmanager
def running_charon(tmp: Path, hosts_toml: str, **kwargs) -> Iterator[Charon]:  # type: ignore[no-untyped-def]
    charon = Charon(tmp, hosts_toml, **kwargs)
    try:
        charon.start()
        yield charon
    finally:
        charon.stop()


class Backend:
    """A backend script from tests/backends/ run as a subprocess on a free port."""

    def __init__(self, script: str, *args: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "backends" / script), "--port", str(self.port),
             *args],
            cwd=REPO,
        )
        wait_until(self._listening, 10, what=f"backend {script}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"backend exited with {self.proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex((HOST, self.port)) == 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)


def raw_request(
    port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True
) -> bytes:
    """Send raw bytes, return what comes back until the server closes (or timeout)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)
