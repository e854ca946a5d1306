"""deploy/charon.service, deploy/charon.socket and deploy/logrotate, with real processes.

Without a running systemd: `systemd-analyze verify` checks the units; the notify protocol is
read from a real AF_UNIX datagram socket given as NOTIFY_SOCKET (with the sender's credentials,
as systemd checks them for NotifyAccess=main); the unit's own command lines are run as systemd
would run them; `systemd-socket-activate` passes a listening socket as systemd does; the
kernel's PR_SET_MDWE stands in for MemoryDenyWriteExecute=yes. Loopback only; every process
is stopped by PID.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import HOST, REPO, Backend, Charon, child_pids, free_port, wait_until

SERVICE = REPO / "deploy" / "charon.service"
SOCKET_UNIT = REPO / "deploy" / "charon.socket"
LOGROTATE = REPO / "deploy" / "logrotate"
# The paths the units and docs/operations.md give, replaced by the test's own.
UNIT_BIN = "/opt/charon/.venv/bin/charon"
UNIT_CONFIG = "/etc/charon/charon.toml"
UNIT_PIDFILE = "/run/charon/charon.pid"
CHARON_BIN = Path(sys.executable).with_name("charon")  # the console script of this venv

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1


# -- helpers -------------------------------------------------------------------------------------


def hosts_toml(backend: Backend) -> str:
    return f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{backend.url}"\n'


def get(port: int, path: str = "/ok", timeout: float = 5.0) -> int:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets in LISTEN state on `port`, from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(int(fields[9]))
    return inodes


def fd_socket_inode(pid: int, fd: int) -> int | None:
    with contextlib.suppress(OSError):
        if m := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}")):
            return int(m.group(1))
    return None


def reload_count(charon: Charon) -> int:
    h = charon.health()
    return int(h["reloads"]["count"]) if h else -1


def popen_charon(charon: Charon, argv: list[str], env: dict[str, str] | None = None) -> None:
    """Start `argv` as `charon`'s supervisor process (its log file takes stdout and stderr)."""
    with open(charon.log_path, "ab") as log:
        charon.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            env=env,
        )


def run_argv(charon: Charon) -> list[str]:
    return [sys.executable, "-m", "charon", "run", "--config", str(charon.config_path)]


class NotifySocket:
    """What systemd listens on for Type=notify: an AF_UNIX datagram socket, here in a temp dir.

    Each datagram is recorded with the PID the kernel vouches for (SO_PASSCRED), as systemd
    checks it against NotifyAccess=main.
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="charon-sd-")  # short: sun_path holds 108 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.messages: list[tuple[int, dict[str, str]]] = []  # (sender pid, fields)

    def env(self) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": self.path}

    def expect(
        self, key: str, value: str = "1", timeout: float = 20.0
    ) -> tuple[int, dict[str, str]]:
        """The next datagram whose `key` is `value`, after any that came before it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            fields = dict(
                line.split("=", 1) for line in data.decode().split("\n") if "=" in line
            )
            self.messages.append((pid, fields))
            if fields.get(key) == value:
                return pid, fields

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    sock = NotifySocket()
    yield sock
    sock.close()


@pytest.fixture
def backend(backend_factory: Callable[..., Backend]) -> Backend:
    return backend_factory("sup_backend.py")


@pytest.fixture
def charons() -> Iterator[Callable[..., Charon]]:
    """Charon configs whose processes, however started, are stopped (and their workers killed)."""
    made: list[Charon] = []

    def make(tmp: Path, backend: Backend, **kwargs: object) -> Charon:
        charon = Charon(tmp, hosts_toml(backend), **kwargs)  # type: ignore[arg-type]
        made.append(charon)
        return charon

    yield make
    for charon in made:
        charon.stop(timeout=15)


def unit_directives(path: Path) -> list[tuple[str, str]]:
    """(key, value) of every setting line of a unit file, in order (keys may repeat)."""
    found = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.append((key.strip(), value.strip()))
    return found


def unit_command(key: str, config: Path, pid: int | None = None) -> list[str]:
    """The service unit's `key` command line, pointed at this venv's charon and `config`."""
    lines = [value for k, value in unit_directives(SERVICE) if k == key]
    assert len(lines) == 1, f"{key}= should appear once in {SERVICE}: {lines}"
    line = lines[0]
    assert line.startswith(UNIT_BIN + " "), f"{key}= does not run {UNIT_BIN}: {line}"
    assert UNIT_CONFIG in line, f"{key}= does not name {UNIT_CONFIG}: {line}"
    line = line.replace(UNIT_BIN, str(CHARON_BIN)).replace(UNIT_CONFIG, str(config))
    if pid is not None:
        assert "$MAINPID" in line, line
        line = line.replace("$MAINPID", str(pid))
    return shlex.split(line)


def substituted_unit(source: Path, folder: Path, config: Path) -> Path:
    text = source.read_text()
    copy = folder / source.name
    copy.write_text(text.replace(UNIT_BIN, str(CHARON_BIN)).replace(UNIT_CONFIG, str(config)))
    return copy


# -- the unit files ------------------------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path, backend: Backend) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (tests/setup.sh installs Debian's systemd)")
    assert CHARON_BIN.exists(), f"{CHARON_BIN} missing: run deploy/bootstrap.sh"
    assert UNIT_BIN in SERVICE.read_text()
    config = Charon(tmp_path, hosts_toml(backend)).config_path
    service = substituted_unit(SERVICE, tmp_path, config)
    sock = substituted_unit(SOCKET_UNIT, tmp_path, config)
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_LEVEL": "info"}
    result = subprocess.run(
        [analyze, "verify", str(service), str(sock)],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"systemd-analyze verify failed:\n{output}"
    # Unknown keys, bad values and the like are only warnings (exit 0): none may concern ours.
    ours = [
        line for line in output.splitlines()
        if str(tmp_path) in line or "charon.service" in line or "charon.socket" in line
    ]
    assert not ours, "systemd-analyze verify warns about Charon's units:\n" + output

    security = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(service)],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    m = re.search(r"Overall exposure level for charon\.service: (\d+\.\d+)", security.stdout)
    assert m, f"no exposure level:\n{security.stdout}{security.stderr}"
    assert float(m.group(1)) <= 4.0, f"the hardening was weakened:\n{security.stdout}"


def test_service_unit_settings() -> None:
    settings = dict(unit_directives(SERVICE))
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillSignal": "SIGTERM",
        "KillMode": "mixed",
        "Restart": "on-failure",
        "RuntimeDirectory": "charon",
        "LogsDirectory": "charon",
        "LimitNOFILE": "65536",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
    }
    wrong = {k: settings.get(k) for k, v in expected.items() if settings.get(k) != v}
    assert not wrong, f"charon.service settings differ: {wrong}"
    # The supervisor kills what is left of a graceful stop after shutdown_timeout + 5 s (30 s by
    # default): systemd must not SIGKILL the cgroup before that.
    m = re.fullmatch(r"(\d+)s", settings["TimeoutStopSec"])
    assert m and int(m.group(1)) > 35, settings["TimeoutStopSec"]
    socket_settings = unit_directives(SOCKET_UNIT)
    assert ("Service", "charon.service") in socket_settings
    assert ("ReusePort", "yes") in socket_settings
    listens = [v for k, v in socket_settings if k == "ListenStream"]
    assert listens and all(re.fullmatch(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+", v)
                           for v in listens), f"ListenStream= must be IP:PORT: {listens}"


# -- the notify protocol -------------------------------------------------------------------------

WORKER_DELAY = 1.5


def slow_workers(folder: Path) -> dict[str, str]:
    """Environment that makes each worker process start WORKER_DELAY seconds late (and nothing
    else), so that a READY=1 sent before the workers serve shows."""
    site = folder / "slow-workers"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import time\n"
        "with open('/proc/self/cmdline', 'rb') as f:\n"
        "    if b'charon.worker' in f.read():\n"
        f"        time.sleep({WORKER_DELAY})\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def test_notify_protocol_ready_reloading_stopping(
    tmp_path: Path, backend: Backend, notify: NotifySocket, charons: Callable[..., Charon]
) -> None:
    charon = charons(tmp_path, backend, workers=2)
    started = time.monotonic()
    popen_charon(charon, run_argv(charon), env={**notify.env(), **slow_workers(tmp_path)})
    sender, ready = notify.expect("READY")
    assert sender == charon.pid, "READY=1 must come from the main process (NotifyAccess=main)"
    assert ready.get("STATUS") == "serving with 2 workers", ready
    # READY=1 only once every first-generation worker serves.
    assert time.monotonic() - started >= WORKER_DELAY
    health = charon.health()
    assert health and health["workers_ready"] == 2, health
    assert get(charon.port) == 200
    assert [fields for _, fields in notify.messages] == [ready], "something before READY=1"

    workers = charon.worker_pids()
    assert len(workers) == 2
    assert environ(charon.pid).get("NOTIFY_SOCKET") == notify.path  # what it was started with
    for pid in workers:
        assert "NOTIFY_SOCKET" not in environ(pid), f"worker {pid} inherited NOTIFY_SOCKET"

    # A good reload: RELOADING=1 stamped with CLOCK_MONOTONIC, then READY=1.
    before = monotonic_usec()
    os.kill(charon.pid, signal.SIGHUP)
    sender, reloading = notify.expect("RELOADING")
    after = monotonic_usec()
    assert sender == charon.pid
    stamp = int(reloading["MONOTONIC_USEC"])
    assert before <= stamp <= after, (before, stamp, after)
    _, ready = notify.expect("READY")
    assert "success" in ready.get("STATUS", ""), ready
    health = charon.health()
    assert health and health["reloads"]["last_result"] == "success", health
    # Applied in place around the swap: the same workers, each on config version 2.
    assert sorted(health["worker_pids"]) == sorted(workers), "the reload replaced the workers"
    assert {w["config_version"] for w in health["reloads"]["workers"].values()} == {2}, health
    assert get(charon.port) == 200

    # A refused reload still ends with READY=1 (the old config serves), the status says so.
    charon.config_path.write_text(charon.config_path.read_text() + "\nbogus = 1\n")
    os.kill(charon.pid, signal.SIGHUP)
    notify.expect("RELOADING")
    _, ready = notify.expect("READY")
    assert "error" in ready.get("STATUS", ""), ready
    health = charon.health()
    assert health and health["reloads"]["last_result"] == "error", health
    assert "bogus" in health["reloads"]["last_error"], health
    assert get(charon.port) == 200

    charon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    sender, _ = notify.expect("STOPPING")
    assert sender == charon.pid
    assert charon.proc.wait(20) == 0  # type: ignore[union-attr]


def test_unit_command_lines_run_as_systemd_runs_them(
    tmp_path: Path, backend: Backend, notify: NotifySocket, charons: Callable[..., Charon]
) -> None:
    """ExecStartPre, ExecStart, ExecReload with $MAINPID and KillSignal, exactly as written."""
    charon = charons(tmp_path, backend, workers=1)
    config = charon.config_path
    good = config.read_text()

    check = subprocess.run(unit_command("ExecStartPre", config), capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0 and "ok" in check.stdout, check

    popen_charon(charon, unit_command("ExecStart", config), env=notify.env())
    sender, _ = notify.expect("READY")
    assert sender == charon.pid
    assert get(charon.port) == 200

    # systemctl reload: the new config (two workers) serves when ExecReload returns 0.
    config.write_text(good.replace("workers = 1", "workers = 2"))
    reload = subprocess.run(unit_command("ExecReload", config, pid=charon.pid),
                            capture_output=True, text=True, timeout=90)
    assert reload.returncode == 0 and reload.stdout.strip() == "reloaded: config version 2", reload
    notify.expect("RELOADING")
    notify.expect("READY")
    health = charon.health()
    assert health and health["workers_ready"] == 2, health

    # A broken config: the start check and the reload both fail and say where; nothing changes.
    config.write_text(good.replace("[admin]", "bogus = 1\n[admin]"))
    check = subprocess.run(unit_command("ExecStartPre", config), capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 1 and check.stderr.startswith(f"{config}:"), check
    assert "bogus" in check.stderr
    count = reload_count(charon)
    reload = subprocess.run(unit_command("ExecReload", config, pid=charon.pid),
                            capture_output=True, text=True, timeout=90)
    assert reload.returncode != 0 and "bogus" in reload.stderr, reload
    assert get(charon.port) == 200
    health = charon.health()
    assert health and health["workers_ready"] == 2 and reload_count(charon) == count, health

    kill_signal = dict(unit_directives(SERVICE))["KillSignal"]
    charon.proc.send_signal(signal.Signals[kill_signal])  # type: ignore[union-attr]
    notify.expect("STOPPING")
    assert charon.proc.wait(20) == 0  # type: ignore[union-attr]


# -- socket activation ---------------------------------------------------------------------------


def test_socket_activation_uses_the_passed_socket(
    tmp_path: Path, backend: Backend, charons: Callable[..., Charon]
) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian's systemd package has it)")
    charon = charons(tmp_path, backend, workers=2)
    address = f"{HOST}:{charon.port}"
    popen_charon(charon, [activate, "-l", address, *run_argv(charon)])
    wait_until(lambda: listening_inodes(charon.port), 10, what="systemd-socket-activate")
    (passed,) = listening_inodes(charon.port)

    # The first connection makes systemd-socket-activate exec Charon (in its own process);
    # it waits in the passed socket's queue until a worker serves it.
    assert get(charon.port, timeout=30) == 200
    charon.wait_ready()
    assert fd_socket_inode(charon.pid, 3) == passed, "the passed socket is not at fd 3"
    assert listening_inodes(charon.port) == {passed}, "Charon bound a socket of its own"
    log = charon.log()
    assert "cannot listen" not in log and f"listening on {address}" in log, log
    for pid in charon.worker_pids():
        env = environ(pid)
        assert not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & env.keys(), (pid, env)

    # A reload keeps the passed socket: nothing is bound anew.
    os.kill(charon.pid, signal.SIGHUP)
    wait_until(lambda: reload_count(charon) == 1, 20, what="the reload")
    assert charon.health()["reloads"]["last_result"] == "success"  # type: ignore[index]
    assert listening_inodes(charon.port) == {passed}
    assert all(get(charon.port) == 200 for _ in range(10))
    assert charon.stop() == 0


# -- MemoryDenyWriteExecute=yes ------------------------------------------------------------------

# PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN) is the kernel's own version of what systemd's
# MemoryDenyWriteExecute=yes enforces with seccomp: no writable+executable mapping, no mapping
# made executable later. It is kept across fork and exec, so the workers run under it too.
MDWE_EXEC = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(100 + ctypes.get_errno())
os.execv(sys.argv[1], sys.argv[1:])
"""

WX_MMAP = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ|mmap.PROT_WRITE|mmap.PROT_EXEC)"


def test_charon_runs_with_memory_deny_write_execute(
    tmp_path: Path, backend: Backend, charons: Callable[..., Charon]
) -> None:
    probe = subprocess.run([sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", WX_MMAP],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode == 100 + errno.EINVAL:
        pytest.skip(f"this kernel ({os.uname().release}) has no PR_SET_MDWE")
    # The guard is on: a W+X mapping is refused in the exec'd process.
    assert probe.returncode == 1 and "PermissionError" in probe.stderr, probe

    charon = charons(tmp_path, backend, workers=2)
    popen_charon(charon, [sys.executable, "-c", MDWE_EXEC, *run_argv(charon)])
    charon.wait_ready()
    assert all(get(charon.port) == 200 for _ in range(10))
    os.kill(charon.pid, signal.SIGHUP)  # a second generation of workers, started under MDWE
    wait_until(lambda: reload_count(charon) == 1, 20, what="the reload")
    assert charon.health()["reloads"]["last_result"] == "success"  # type: ignore[index]
    metrics = f"http://{HOST}:{charon.admin_port}/metrics"
    with urllib.request.urlopen(metrics, timeout=5) as response:
        assert b"charon_workers" in response.read()
    assert get(charon.port) == 200
    assert charon.stop() == 0
    assert "Traceback" not in charon.log(), charon.log()


# -- logrotate and USR1 --------------------------------------------------------------------------


def postrotate_script() -> str:
    text = LOGROTATE.read_text()
    m = re.search(r"^\s*postrotate\s*\n(.*?)^\s*endscript", text, re.S | re.M)
    assert m, f"no postrotate script in {LOGROTATE}"
    assert UNIT_PIDFILE in m.group(1)
    assert re.search(r"^/var/log/charon/\*\.log \{", text, re.M)
    return m.group(1)


def test_logrotate_postrotate_reopens_the_access_log(
    tmp_path: Path, backend: Backend, charons: Callable[..., Charon]
) -> None:
    access, pidfile = tmp_path / "access.log", tmp_path / "charon.pid"
    script = postrotate_script().replace(UNIT_PIDFILE, str(pidfile))
    charon = charons(tmp_path, backend, workers=2,
                     server_toml=f'access_log = "{access}"\npidfile = "{pidfile}"')
    charon.start()
    workers = sorted(charon.worker_pids())
    assert get(charon.port, "/ok?before") == 200
    wait_until(lambda: access.exists() and b"/ok?before" in access.read_bytes(), 5,
               what="the access log line")

    os.rename(access, tmp_path / "access.log.1")  # what logrotate does first
    result = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result

    def reopened() -> bool:
        assert get(charon.port, "/ok?after") == 200
        return access.exists() and b"/ok?after" in access.read_bytes()

    wait_until(reopened, 10, interval=0.2, what="the workers to reopen the access log")
    assert b"/ok?before" in (tmp_path / "access.log.1").read_bytes()
    assert sorted(charon.worker_pids()) == workers, "USR1 replaced the workers"
    assert "SIGUSR1" not in charon.log(), charon.log()


def test_usr1_without_an_access_log_keeps_the_workers(
    tmp_path: Path, backend: Backend, charons: Callable[..., Charon]
) -> None:
    """USR1 ("reopen log files") must be harmless when there is no access log file."""
    charon = charons(tmp_path, backend, workers=2)
    charon.start()
    workers = sorted(charon.worker_pids())
    slow: dict[str, object] = {}

    def in_flight() -> None:
        try:
            slow["status"] = get(charon.port, "/sleep/1.5")
        except OSError as exc:
            slow["status"] = repr(exc)

    request = threading.Thread(target=in_flight)
    request.start()
    time.sleep(0.3)  # the request is in flight
    os.kill(charon.pid, signal.SIGUSR1)
    request.join(10)
    time.sleep(0.5)
    assert charon.proc is not None and charon.proc.poll() is None, charon.log()
    assert sorted(child_pids(charon.pid)) == workers, "USR1 killed workers:\n" + charon.log()
    assert slow.get("status") == 200, slow
    assert "SIGUSR1" not in charon.log(), charon.log()


def test_a_failed_second_start_keeps_the_running_supervisors_pidfile(
    tmp_path: Path, backend: Backend, charons: Callable[..., Charon]
) -> None:
    """`charon run` on the config of a running Charon fails (its admin port is taken) and must
    leave the PID file that `charon reload` and logrotate's postrotate use alone."""
    pidfile = tmp_path / "charon.pid"
    charon = charons(tmp_path, backend, workers=1, server_toml=f'pidfile = "{pidfile}"')
    charon.start()
    assert pidfile.read_text().strip() == str(charon.pid)
    second = subprocess.run(run_argv(charon), capture_output=True, text=True, timeout=30, cwd=REPO)
    assert second.returncode == 1 and "Address already in use" in second.stderr, second
    assert pidfile.exists(), "the failed second supervisor removed the running one's PID file"
    assert pidfile.read_text().strip() == str(charon.pid)
    assert get(charon.port) == 200


def test_socket_activation_passes_a_tls_listener(tmp_path: Path, backend: Backend) -> None:
    """A `tls_listen` address passed by systemd is served over TLS (told by its address), the
    plain one beside it stays plain."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian's systemd package has it)")
    import ssl

    from tlsca import TestCA

    ca = TestCA(tmp_path / "ca")
    leaf = ca.issue(["tls.test"])
    tls_port = free_port()
    charon = Charon(
        tmp_path, hosts_toml(backend) + textwrap.dedent(f"""
            [[hosts]]
            domains = ["tls.test"]
            upstream = "{backend.url}"
            tls = {{ cert = "{leaf.cert_path}", key = "{leaf.key_path}" }}
            """),
        workers=2, server_toml=f'tls_listen = ["{HOST}:{tls_port}"]',
    )
    popen_charon(charon, [activate, "-l", f"{HOST}:{charon.port}", "-l", f"{HOST}:{tls_port}",
                          *run_argv(charon)])
    try:
        wait_until(lambda: listening_inodes(tls_port), 10, what="systemd-socket-activate")
        (passed,) = listening_inodes(tls_port)
        assert get(charon.port, timeout=30) == 200
        charon.wait_ready()
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        with socket.create_connection((HOST, tls_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="tls.test") as tls:
            tls.sendall(b"GET /ok HTTP/1.1\r\nHost: tls.test\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert listening_inodes(tls_port) == {passed}, "Charon bound a TLS socket of its own"
    finally:
        assert charon.stop() == 0
