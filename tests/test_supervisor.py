"""The supervisor with real processes: start, worker death and replacement, stuck workers,
crash loops, graceful and fast stops. Loopback only; every process is stopped by PID."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import HOST, Backend, Charon, kill_pid, wait_until

# -- helpers -----------------------------------------------------------------------------------


def hosts_toml(backend: Backend) -> str:
    return f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{backend.url}"\n'


def listening_inodes(port: int) -> set[int]:
    """Inodes of the TCP sockets in LISTEN state on `port` (any address), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], int(fields[9])
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets open in process `pid`, from its `socket:[inode]` fd links."""
    inodes: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # gone
        return inodes
    for fd in fds:
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"{fd_dir}/{fd}")
            if m := re.fullmatch(r"socket:\[(\d+)\]", link):
                inodes.add(int(m.group(1)))
    return inodes


def process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("R", "S", "T", "Z"...), "" once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):  # ProcessLookupError when it exits between open and read
        return ""


def alive(pid: int) -> bool:
    """Not exited (a zombie counts as exited). harness.pid_alive can raise ProcessLookupError."""
    return process_state(pid) not in ("", "Z", "X")


def health_pids(charon: Charon) -> tuple[int, list[int]]:
    """(workers_ready, worker_pids) from /healthz; (0, []) when it does not answer."""
    h = charon.health()
    if not h:
        return 0, []
    return int(h.get("workers_ready", 0)), list(h.get("worker_pids", []))


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET on a new connection (closed after the response)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def connection_refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == errno.ECONNREFUSED


class InFlight:
    """A raw HTTP/1.1 request on its own connection, read in a thread until the server closes."""

    def __init__(self, port: int, path: str, read_timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=read_timeout)
        head = f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        self.sock.sendall(head.encode())
        self.data = b""
        self.error: BaseException | None = None
        self.closed_at: float | None = None  # when the read ended (EOF, reset or timeout)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.data += chunk
        except OSError as exc:
            self.error = exc
        finally:
            self.closed_at = time.monotonic()
            self.sock.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def status(self) -> int | None:
        m = re.match(rb"HTTP/1\.1 (\d{3}) ", self.data)
        return int(m.group(1)) if m else None


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body; the connection stays open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    assert m, head
    while len(body) < int(m.group(1)):
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-body: {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def wait_for_sleeping(backend: Backend, count: int = 1, timeout: float = 5.0) -> None:
    """Until `count` /sleep/ requests are being served by the backend (they reached it)."""

    def sleeping() -> bool:
        return int(get(backend.port, "/sleeping")[1]) >= count

    wait_until(sleeping, timeout, interval=0.02, what="the request to reach the backend")


@pytest.fixture
def backend(backend_factory: Callable[..., Backend]) -> Backend:
    return backend_factory("sup_backend.py")


@pytest.fixture
def make_charon(tmp_path: Path) -> Iterator[Callable[..., Charon]]:
    """Supervisors built on a tmp config; all stopped (and their workers killed) by PID."""
    started: list[Charon] = []

    def make(hosts: str, **kwargs: object) -> Charon:
        charon = Charon(tmp_path, hosts, **kwargs)  # type: ignore[arg-type]
        started.append(charon)
        return charon

    yield make
    for charon in started:
        if charon.proc is not None:
            # A SIGSTOPped worker would hold up a graceful stop: wake everything first.
            for pid in charon._seen_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            charon.stop(timeout=15)


def assert_all_gone(pids: list[int] | set[int], within: float = 3.0) -> None:
    wait_until(lambda: not any(alive(p) for p in pids), within,
               what=f"processes {sorted(pids)} to exit")


# -- 1. start ----------------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_start_two_workers_share_the_supervisors_socket(make_charon, backend) -> None:
    charon = make_charon(hosts_toml(backend), workers=2).start()

    h = charon.health()
    assert h is not None
    assert h["status"] == "ok"
    assert h["workers_ready"] == 2
    workers = charon.worker_pids()
    assert sorted(h["worker_pids"]) == sorted(workers)
    assert len(workers) == 2

    # One listening socket on the port: bound once, in the supervisor, and inherited by both
    # workers (the same inode, not a SO_REUSEPORT sibling bound by each worker).
    listening = listening_inodes(charon.port)
    assert len(listening) == 1, f"{len(listening)} sockets listen on port {charon.port}"
    (inode,) = listening
    assert inode in socket_inodes(charon.pid), "the supervisor does not hold the listening socket"
    for pid in workers:
        assert inode in socket_inodes(pid), f"worker {pid} does not share the listening socket"

    for _ in range(10):
        status, body = get(charon.port, "/ok")
        assert status == 200
        assert body.startswith(b"ok ")


# -- 2. a worker killed under load -------------------------------------------------------------


@dataclass
class Outcome:
    client: int
    opened: float  # when the connection used was opened
    started: float
    ok: bool
    error: str


class Load:
    """`new` threads doing sequential requests on new connections, and `keep` threads reusing
    one keep-alive connection each (reopened after an error)."""

    def __init__(self, port: int, new: int = 20, keep: int = 4) -> None:
        self.port = port
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._new_connections, args=(i,), daemon=True)
                        for i in range(new)]
        self.threads += [threading.Thread(target=self._keep_alive, args=(new + i,), daemon=True)
                         for i in range(keep)]
        self.clients = new + keep

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(10)

    def _record(self, client: int, opened: float, started: float, ok: bool, error: str) -> None:
        with self._lock:
            self.outcomes.append(Outcome(client, opened, started, ok, error))

    @staticmethod
    def _one(conn: http.client.HTTPConnection, close: bool) -> tuple[bool, str, bool]:
        """(ok, error, server keeps the connection)"""
        try:
            conn.request("GET", "/ok", headers={"Connection": "close"} if close else {})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return False, f"{type(exc).__name__}: {exc}", False
        if resp.status != 200 or not body.startswith(b"ok "):
            return False, f"status {resp.status}", not resp.will_close
        return True, "", not resp.will_close

    def _new_connections(self, client: int) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
            ok, error, _ = self._one(conn, close=True)
            conn.close()
            self._record(client, started, started, ok, error)

    def _keep_alive(self, client: int) -> None:
        conn: http.client.HTTPConnection | None = None
        opened = 0.0
        while not self._stop.is_set():
            if conn is None:
                opened = time.monotonic()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
            started = time.monotonic()
            ok, error, keep = self._one(conn, close=False)
            self._record(client, opened, started, ok, error)
            if not keep:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def client_connection_inodes(port: int) -> set[int]:
    """Inodes of the accepted (server-side) TCP connections on local port `port`, any state."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A" and inode and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


@pytest.mark.timeout(60)
def test_killed_worker_is_replaced_without_losing_queued_connections(make_charon, backend) -> None:
    charon = make_charon(hosts_toml(backend), workers=2).start()
    _, before = health_pids(charon)
    assert len(before) == 2
    victim = before[0]

    load = Load(charon.port)
    load.start()
    try:
        time.sleep(1.0)
        # Freeze the victim first: it accepts nothing more, and what it holds can be counted.
        # Connections opened from now on wait in the accept queue until the other worker takes
        # them; if the victim owned a queue of its own, they would be reset when it dies.
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda: process_state(victim) == "T", 2, interval=0.002,
                   what="the worker to stop")
        t_stop = time.monotonic()
        held = len(client_connection_inodes(charon.port) & socket_inodes(victim))
        time.sleep(0.3)
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not alive(victim), 5, interval=0.005, what="the worker to die")
        t_dead = time.monotonic()

        def replaced() -> bool:
            ready, pids = health_pids(charon)
            return ready == 2 and len(pids) == 2 and victim not in pids

        wait_until(replaced, 10, interval=0.02, what="a replacement worker")
        t_replaced = time.monotonic()
        charon.worker_pids()
        time.sleep(1.5)  # load on the replaced set of workers
    finally:
        load.stop()

    outcomes = load.outcomes
    failed = [o for o in outcomes if not o.ok]
    after_stop = [o for o in failed if o.opened > t_stop]
    after_replaced = [o for o in outcomes if o.started > t_replaced]
    print(
        f"\n{len(outcomes)} requests, {len(failed)} failed; the killed worker held {held} "
        f"client connections ({load.clients} clients); it died {1000 * (t_dead - t_kill):.0f} ms "
        f"after SIGKILL, replacement ready {t_replaced - t_kill:.2f} s after it; "
        f"errors: {sorted({o.error for o in failed})}"
    )
    assert len(outcomes) > 200, "the load did not run"
    # Only the connections the killed worker held fail, once each.
    assert len(failed) <= held <= load.clients, (
        f"{len(failed)} requests failed; the killed worker held {held} client connections"
    )
    assert not after_stop, (
        f"{len(after_stop)} requests failed on connections opened after the worker froze "
        f"(connections waiting in an accept queue reset?): {sorted({o.error for o in after_stop})}"
    )
    assert len(after_replaced) > 50
    assert all(o.ok for o in after_replaced), "requests after the replacement failed"
    assert t_replaced - t_kill < 5.0

    _, now = health_pids(charon)
    assert victim not in now
    (new_pid,) = set(now) - set(before)
    assert alive(new_pid)
    log = charon.log()
    assert re.search(rf"worker \d \(pid {victim}\) exited with signal SIGKILL", log), log
    assert f"started (pid {new_pid})" in log


# -- 3. a stuck worker -------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_stuck_worker_is_killed_and_replaced(make_charon, backend) -> None:
    charon = make_charon(hosts_toml(backend), workers=2,
                         server_toml='heartbeat_timeout = "2s"\nshutdown_timeout = "2s"').start()
    _, before = health_pids(charon)
    victim = before[1]
    # Past one heartbeat interval of the worker, so a beat has been read since it was ready.
    time.sleep(1.2)

    t_stop = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    wait_until(lambda: not alive(victim), 6, interval=0.02,
               what="the supervisor to kill the stopped worker")
    killed_after = time.monotonic() - t_stop

    def replaced() -> bool:
        ready, pids = health_pids(charon)
        return ready == 2 and victim not in pids

    wait_until(replaced, 8, what="a new worker to be ready")
    ready_after = time.monotonic() - t_stop
    print(f"\nstopped worker killed {killed_after:.2f} s after SIGSTOP, new one ready at "
          f"{ready_after:.2f} s")
    # The beat may be up to a second old when the worker stops; the supervisor checks every 0.5 s.
    assert 0.9 <= killed_after <= 4.0, f"killed {killed_after:.2f}s after SIGSTOP (timeout 2s)"

    _, after = health_pids(charon)
    charon.worker_pids()
    (new_pid,) = set(after) - set(before)
    assert alive(new_pid)
    for _ in range(20):
        assert get(charon.port, "/ok")[0] == 200
    assert re.search(rf"\(pid {victim}\) sent no heartbeat for [\d.]+s", charon.log())
    assert re.search(rf"\(pid {victim}\) exited with signal SIGKILL", charon.log())


# -- 4. crash loop -----------------------------------------------------------------------------

CRASHING_SITECUSTOMIZE = """\
import os
with open("/proc/self/cmdline", "rb") as f:
    if b"charon.worker" in f.read():
        os._exit(3)
"""


@pytest.mark.timeout(45)
def test_workers_dying_at_start_up_make_the_supervisor_give_up(
    make_charon, tmp_path, monkeypatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CRASHING_SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", str(site))  # inherited by the supervisor and its workers

    charon = make_charon(f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "http://{HOST}:9"\n',
                         workers=2)
    t0 = time.monotonic()
    charon.start(wait_ready=False)
    assert charon.proc is not None
    try:
        code = charon.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the supervisor kept restarting crashing workers for 30 s:\n{charon.log()}")
    elapsed = time.monotonic() - t0
    log = charon.log()
    print(f"\nsupervisor gave up after {elapsed:.1f} s with code {code}")
    assert code != 0, log
    assert "workers keep dying at start-up" in log, log
    crashes = re.findall(r"\(pid (\d+)\) exited with code 3 .*restarting in ([\d.]+)s", log)
    assert len(crashes) >= 3, log
    delays = [float(d) for _, d in crashes]
    assert delays == sorted(delays) and delays[-1] > delays[0], f"no back-off: {delays}"
    assert_all_gone([int(pid) for pid, _ in crashes])
    assert connection_refused(charon.port), "the listening socket outlived the supervisor"


@pytest.mark.timeout(120)
def test_serving_workers_killed_again_and_again_are_replaced_forever(make_charon, backend) -> None:
    """Workers that served are not start-up failures: kills in a row never make it give up."""
    charon = make_charon(hosts_toml(backend), workers=1).start()
    killed: list[int] = []
    for _ in range(7):
        def serving_new() -> bool:
            ready, pids = health_pids(charon)
            return ready == 1 and len(pids) == 1 and pids[0] not in killed

        wait_until(serving_new, 20, what="a new worker to serve")
        _, (pid,) = health_pids(charon)
        assert get(charon.port, "/ok")[0] == 200
        charon.worker_pids()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        wait_until(lambda: not alive(pid), 5, what="the worker to die")  # noqa: B023

    wait_until(lambda: health_pids(charon)[0] == 1, 20, what="a worker after the kills")
    assert charon.proc is not None and charon.proc.poll() is None, charon.log()
    assert get(charon.port, "/ok")[0] == 200
    log = charon.log()
    assert "giving up" not in log, log
    delays = [float(d) for d in re.findall(r"exited with signal SIGKILL .*restarting in ([\d.]+)s",
                                            log)]
    assert len(delays) == 7, log
    # Back-off grows while the kills go on, and stays bounded (respawn.CRASH_BACKOFF_MAX).
    assert delays[0] == 0.0 and delays[-1] > delays[1] and max(delays) <= 3.0, delays


# -- 5-7. stopping -----------------------------------------------------------------------------


@pytest.mark.timeout(40)
def test_sigterm_drains_in_flight_request(make_charon, backend) -> None:
    charon = make_charon(hosts_toml(backend), workers=2,
                         server_toml='shutdown_timeout = "5s"').start()
    workers = charon.worker_pids()

    idle = socket.create_connection((HOST, charon.port), timeout=5)
    idle.sendall(f"GET /ok HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    assert read_response(idle).startswith(b"HTTP/1.1 200 ")

    t_sent = time.monotonic()
    slow = InFlight(charon.port, "/sleep/2")
    wait_for_sleeping(backend)

    t_term = time.monotonic()
    charon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]

    # The idle keep-alive connection is closed at once.
    idle.settimeout(2.0)
    try:
        rest = idle.recv(65536)
    except TimeoutError:
        pytest.fail("an idle keep-alive connection stayed open after SIGTERM")
    except ConnectionResetError:
        rest = b""
    idle_closed_after = time.monotonic() - t_term
    idle.close()
    assert rest == b"", rest
    assert idle_closed_after < 1.0

    # The request in flight completes.
    slow.join(10)
    assert slow.closed_at is not None, "the in-flight request never finished"
    assert slow.error is None, slow.error
    assert slow.status == 200, slow.data
    assert slow.data.endswith(b"slept 2.0\n"), slow.data

    # Then the supervisor stops listening and exits 0, well within shutdown_timeout.
    wait_until(lambda: connection_refused(charon.port), 3,
               what="new connections to be refused after the drain")
    refused_after = time.monotonic() - t_term
    try:
        code = charon.proc.wait(5 + 2 - (time.monotonic() - t_term))  # type: ignore[union-attr]
    except subprocess.TimeoutExpired:
        pytest.fail("the supervisor did not exit within shutdown_timeout + 2 s")
    exited_after = time.monotonic() - t_term
    print(f"\nidle connection closed {1000 * idle_closed_after:.0f} ms after SIGTERM; "
          f"refusing at {refused_after:.2f} s, exited at {exited_after:.2f} s")
    assert code == 0, charon.log()
    assert exited_after >= 2.0 - (t_term - t_sent) - 0.1, "it did not wait for the request"
    assert_all_gone(workers)
    assert "stopping 2 workers (graceful)" in charon.log()


@pytest.mark.timeout(40)
def test_sigterm_cuts_requests_at_shutdown_timeout(make_charon, backend) -> None:
    charon = make_charon(hosts_toml(backend), workers=2,
                         server_toml='shutdown_timeout = "1s"').start()
    workers = charon.worker_pids()
    slow = InFlight(charon.port, "/sleep/10")
    wait_for_sleeping(backend)

    t_term = time.monotonic()
    charon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    try:
        code = charon.proc.wait(1 + 2.5)  # type: ignore[union-attr]
    except subprocess.TimeoutExpired:
        pytest.fail("the supervisor did not exit within shutdown_timeout (1 s) + 2.5 s")
    exited_after = time.monotonic() - t_term
    slow.join(2)
    assert slow.closed_at is not None, "the client's connection was left open (hang)"
    closed_after = slow.closed_at - t_term
    print(f"\nexited {exited_after:.2f} s after SIGTERM; client closed at {closed_after:.2f} s")
    assert code == 0, charon.log()
    assert 0.8 <= closed_after <= 1 + 2.5
    assert slow.status != 200
    assert_all_gone(workers)


@pytest.mark.timeout(40)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_fast_stop(make_charon, backend, signum: int) -> None:
    charon = make_charon(hosts_toml(backend), workers=2).start()  # shutdown_timeout: 30 s
    workers = charon.worker_pids()
    slow = InFlight(charon.port, "/sleep/10")
    wait_for_sleeping(backend)

    t_sig = time.monotonic()
    charon.proc.send_signal(signum)  # type: ignore[union-attr]
    try:
        code = charon.proc.wait(2.5)  # type: ignore[union-attr]
    except subprocess.TimeoutExpired:
        pytest.fail(f"{signal.Signals(signum).name} did not stop the supervisor within 2.5 s")
    exited_after = time.monotonic() - t_sig
    slow.join(2)
    assert slow.closed_at is not None, "the client's connection was left open"
    print(f"\n{signal.Signals(signum).name}: exited after {exited_after:.2f} s")
    assert code == 0, charon.log()
    assert slow.status != 200
    assert_all_gone(workers, within=1.0)
    assert "stopping 2 workers (fast)" in charon.log()
    assert connection_refused(charon.port)


@pytest.mark.timeout(40)
def test_sigquit_during_a_graceful_drain_stops_fast(make_charon, backend) -> None:
    """An operator who tires of waiting for a drain escalates with SIGQUIT (or Ctrl-C)."""
    charon = make_charon(hosts_toml(backend), workers=2,
                         server_toml='shutdown_timeout = "8s"').start()
    workers = charon.worker_pids()
    slow = InFlight(charon.port, "/sleep/10")
    wait_for_sleeping(backend)

    charon.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    time.sleep(0.5)
    t_quit = time.monotonic()
    charon.proc.send_signal(signal.SIGQUIT)  # type: ignore[union-attr]
    try:
        code = charon.proc.wait(2.5)  # type: ignore[union-attr]
    except subprocess.TimeoutExpired:
        for pid in (charon.pid, *workers):  # do not wait out the drain in the teardown
            kill_pid(pid)
        pytest.fail("SIGQUIT during a graceful drain was ignored: the supervisor was still "
                    "waiting for shutdown_timeout (8 s) 2.5 s later")
    print(f"\nSIGQUIT during the drain: exited after {time.monotonic() - t_quit:.2f} s")
    assert code == 0
    slow.join(2)
    assert slow.closed_at is not None
    assert_all_gone(workers, within=1.0)


# -- the supervisor itself killed --------------------------------------------------------------


@pytest.mark.timeout(40)
def test_workers_exit_when_the_supervisor_is_killed(make_charon, backend) -> None:
    charon = make_charon(hosts_toml(backend), workers=2).start()
    workers = charon.worker_pids()
    os.kill(charon.pid, signal.SIGKILL)
    charon.proc.wait(5)  # type: ignore[union-attr]
    # Idle workers notice the lost parent at their next heartbeat (1 s) and drain at once.
    try:
        assert_all_gone(workers, within=4.0)
    finally:
        for pid in workers:
            kill_pid(pid)
