"""`charon check | run | demo` as real processes (`python -m charon`), on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOST, REPO, child_pids, free_port, kill_pid, wait_until

DEMO_PORTS = {"proxy": 8080, "demo backend": 8081, "admin": 9090}

# Loaded through PYTHONPATH into the charon processes: every socket.bind is logged to a file.
BIND_SPY = """\
import os
import socket

_log = os.environ["CHARON_TEST_BIND_LOG"]
_bind = socket.socket.bind


def bind(self, address):
    with open(_log, "a") as f:
        f.write(f"{os.getpid()} {address!r}\\n")
    return _bind(self, address)


socket.socket.bind = bind
"""


def charon(*args: str, env: dict[str, str] | None = None,
           timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "charon", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
    )


def write_config(tmp_path: Path, port: int, admin_port: int, extra_server: str = "") -> Path:
    path = tmp_path / "charon.toml"
    path.write_text(
        "[server]\n"
        f'listen = ["{HOST}:{port}"]\n'
        f"{extra_server}"
        "workers = 1\n"
        "[admin]\n"
        f'listen = "{HOST}:{admin_port}"\n'
        "[[hosts]]\n"
        f'domains = ["{HOST}"]\n'
        f'upstream = "http://{HOST}:9"\n'
    )
    return path


@pytest.fixture
def bind_spy(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment that makes charon log its bind() calls, and that log."""
    site = tmp_path / "spy"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BIND_SPY)
    log = tmp_path / "binds.log"
    env = dict(os.environ, PYTHONPATH=str(site), CHARON_TEST_BIND_LOG=str(log))
    return env, log


def binds(log: Path) -> str:
    return log.read_text() if log.exists() else ""


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == errno.ECONNREFUSED


# -- check -------------------------------------------------------------------------------------


def test_check_valid_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, free_port(), free_port())
    result = charon("check", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: ok"), result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("line3", "message"),
    [
        ("bogus = 1", "unknown key 'bogus'"),
        ("workers = 0", "workers: must be between 1 and 64"),
        ('shutdown_timeout = "fast"', 'invalid duration "fast"'),
    ],
    ids=["unknown-key", "bad-workers", "bad-duration"],
)
def test_check_invalid_file_names_path_and_line(tmp_path: Path, line3: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[server]\nlisten = ["{HOST}:{free_port()}"]\n{line3}\n')
    result = charon("check", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"{path}:3: "), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# -- run ---------------------------------------------------------------------------------------


def test_run_invalid_config_exits_1_and_binds_nothing(tmp_path: Path, bind_spy) -> None:
    env, log = bind_spy
    port, admin_port = free_port(), free_port()
    path = write_config(tmp_path, port, admin_port, extra_server="bogus = 1\n")
    result = charon("run", "--config", str(path), env=env)
    assert result.returncode == 1
    assert f"{path}:3: unknown key 'bogus'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert binds(log) == "", f"charon bound sockets for an invalid config:\n{binds(log)}"
    assert refused(port) and refused(admin_port)


@pytest.mark.parametrize("busy", ["listen", "admin"])
def test_run_on_a_port_in_use_exits_1_with_a_clear_message(
    tmp_path: Path, bind_spy, busy: str
) -> None:
    env, log = bind_spy
    with socket.socket() as taken:  # a plain listener, without SO_REUSEPORT
        taken.bind((HOST, 0))
        taken.listen()
        busy_port = taken.getsockname()[1]
        other = free_port()
        port, admin_port = (busy_port, other) if busy == "listen" else (other, busy_port)
        path = write_config(tmp_path, port, admin_port)
        result = charon("run", "--config", str(path), env=env)
    assert f"('{HOST}', {busy_port})" in binds(log), "the spy saw no bind on the busy port"
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on {HOST}:{busy_port}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert refused(other), "a socket was left listening"


# -- demo --------------------------------------------------------------------------------------


def demo_ports_free() -> None:
    for name, port in DEMO_PORTS.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                pytest.skip(f"`charon demo` needs {HOST}:{port} ({name}), which is in use")


def demo_health() -> dict | None:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(f"http://{HOST}:9090/healthz", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Not exited; a zombie counts as exited (harness.pid_alive can raise ProcessLookupError)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@contextlib.contextmanager
def demo_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], set[int]]]:
    """`charon demo`; on exit the supervisor and every child seen in `seen` are killed by PID."""
    demo_ports_free()
    with open(tmp_path / "demo.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "charon", "demo"], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
    seen: set[int] = set()
    try:
        yield proc, seen
    finally:
        seen.update(child_pids(proc.pid))
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for pid in seen:
            kill_pid(pid)


def demo_log(tmp_path: Path) -> str:
    return (tmp_path / "demo.log").read_text(errors="replace")


@pytest.mark.timeout(60)
def test_demo_serves_through_the_proxy_and_stops_on_sigterm(tmp_path: Path) -> None:
    with demo_process(tmp_path) as (proc, seen):

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"charon demo exited with {proc.returncode}:\n"
                                     f"{demo_log(tmp_path)}")
            h = demo_health()
            return bool(h and h["workers_ready"] == 2)

        wait_until(ready, 20, what="charon demo to be ready")
        with urllib.request.urlopen(f"http://{HOST}:8080/", timeout=5) as r:
            assert r.status == 200
            page = r.read().decode()
        assert "Charon demo" in page

        health = demo_health()
        assert health is not None
        assert health["status"] == "ok"
        workers = set(health["worker_pids"])
        children = set(child_pids(proc.pid))
        seen.update(children)
        backends = [p for p in children - workers if b"charon.demo.backend" in cmdline(p)]
        assert len(backends) == 1, f"no demo backend among the children {children}"
        (backend,) = backends
        assert workers <= children

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            pytest.fail("charon demo did not stop within 15 s of SIGTERM")
        print(f"\ncharon demo stopped {time.monotonic() - t0:.2f} s after SIGTERM")
        assert code == 0, demo_log(tmp_path)
        wait_until(lambda: not any(alive(p) for p in (*workers, backend)), 3,
                   what="the workers and the demo backend to exit")
        for port in DEMO_PORTS.values():
            assert refused(port), f"{HOST}:{port} still accepts connections"


@pytest.mark.timeout(60)
def test_demo_sigterm_during_start_up_stops_the_demo_backend(tmp_path: Path) -> None:
    with demo_process(tmp_path) as (proc, seen):
        # SIGTERM as soon as the demo backend exists, before the proxy serves.
        wait_until(lambda: bool(child_pids(proc.pid)) or proc.poll() is not None, 10,
                   interval=0.005, what="charon demo to start its backend")
        children = child_pids(proc.pid)
        seen.update(children)
        assert children, demo_log(tmp_path)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        try:
            wait_until(lambda: not any(alive(p) for p in children), 3,
                       what="the demo backend to exit")
        except AssertionError:
            pytest.fail(f"charon demo exited ({proc.returncode}) on SIGTERM during start-up and "
                        f"left its demo backend (pid {children}) running, holding port 8081")
