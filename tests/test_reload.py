"""Reload without dropping anything (decision 14, decision 1): SIGHUP under sustained HTTP and
WebSocket load, drain_timeout, refused configs, listeners added and removed, a killed worker,
TTIN/TTOU and a stop during a drain. Real processes on 127.0.0.1; every process stopped by PID.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import http.client
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from harness import HOST, REPO, Backend, Charon, free_port, kill_pid, wait_until
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

# -- config --------------------------------------------------------------------------------------


def hosts_toml(http_backend: Backend, ws_backend: Backend, extra: str = "",
               slow_ws: Backend | None = None) -> str:
    """HTTP on 127.0.0.1, WebSockets on the location /echo of the same host (and /slow-echo)."""
    slow = (f'[[hosts.locations]]\npath = "/slow-echo"\nupstream = "{slow_ws.url}"\n\n'
            if slow_ws else "")
    return (
        f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{http_backend.url}"\n\n'
        f'[[hosts.locations]]\npath = "/echo"\nupstream = "{ws_backend.url}"\n\n{slow}{extra}'
    )


def config_text(charon: Charon, hosts: str, *, workers: int = 2, listen: list[int] | None = None,
                server: str = "") -> str:
    ports = listen if listen is not None else [charon.port]
    addresses = ", ".join(f'"{HOST}:{p}"' for p in ports)
    return (
        f"[server]\nlisten = [{addresses}]\nworkers = {workers}\n{server}\n"
        f'[admin]\nlisten = "{HOST}:{charon.admin_port}"\n\n{hosts}'
    )


def rewrite(charon: Charon, text: str) -> None:
    """Replace the config file at once: the supervisor never reads half of it."""
    tmp = charon.config_path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, charon.config_path)


# -- process and socket inspection ---------------------------------------------------------------


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return ""


def alive(pid: int) -> bool:
    return process_state(pid) not in ("", "Z", "X")


def children(charon: Charon) -> set[int]:
    """The supervisor's live child processes (its workers, current and retiring)."""
    return {p for p in charon.worker_pids() if alive(p)}


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        with contextlib.suppress(OSError):
            if m := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}")):
                inodes.add(int(m.group(1)))
    return inodes


def _tcp_rows() -> Iterator[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket."""
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            fields = line.split()
            yield (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16),
                   fields[3], int(fields[9]))


def listening_inodes(port: int) -> set[int]:
    return {inode for local, _, state, inode in _tcp_rows() if local == port and state == "0A"}


def owner(port: int, client_port: int, pids: set[int] | list[int]) -> int | None:
    """Which of `pids` holds the server side of the client connection from `client_port`."""
    inodes = {inode for local, remote, state, inode in _tcp_rows()
              if local == port and remote == client_port and state == "01" and inode}
    for pid in pids:
        if inodes & socket_inodes(pid):
            return pid
    return None


@contextlib.contextmanager
def frozen(pids: list[int] | set[int]) -> Iterator[None]:
    """SIGSTOP `pids` (they accept nothing) for the duration of the block, then SIGCONT."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for pid in pids:
            wait_until(lambda p=pid: process_state(p) == "T", 3, interval=0.005,
                       what=f"worker {pid} to stop")
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def connection_refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((HOST, port)) == errno.ECONNREFUSED


# -- the admin endpoint ---------------------------------------------------------------------------


def health(charon: Charon) -> dict:  # type: ignore[type-arg]
    h = charon.health()
    assert h is not None, f"/healthz does not answer:\n{charon.log()[-3000:]}"
    return h


def reloads(charon: Charon) -> dict:  # type: ignore[type-arg]
    return health(charon)["reloads"]  # type: ignore[no-any-return]


def wait_reloads(charon: Charon, count: int, timeout: float = 30.0) -> dict:  # type: ignore[type-arg]
    """/healthz's reload status once `count` reloads have a result."""
    wait_until(lambda: (charon.health() or {}).get("reloads", {}).get("count", 0) >= count,
               timeout, interval=0.02, what=f"{count} reload results")
    return reloads(charon)


def metrics(charon: Charon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://{HOST}:{charon.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float | None:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))))


def _log_time(stamp: str) -> float:
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%d %H:%M:%S,%f"):
        with contextlib.suppress(ValueError):
            return datetime.strptime(stamp, fmt).timestamp()
    raise AssertionError(f"unknown log time format: {stamp!r}")


def reload_durations(log: str) -> list[float]:
    """Seconds from each "reloading" log line to the "reloaded" line after it."""
    stamps = re.findall(r"^(\S+(?: \S+)?) supervisor\[\d+\] \w+ (reloading|reloaded)", log, re.M)
    out, start = [], None
    for stamp, what in stamps:
        t = _log_time(stamp)
        if what == "reloading":
            start = t
        elif start is not None:
            out.append(t - start)
            start = None
    return out


def get(port: int, path: str = "/ok", host: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        headers = {"Connection": "close"}
        if host:
            headers["Host"] = host
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def charon_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "charon", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=90)


# -- HTTP load -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # "keep" or "new"
    opened: float  # when the connection used was opened
    started: float
    ok: bool
    error: str


class HttpLoad:
    """`keep` threads with one persistent connection each (a new one after `Connection: close`,
    the correct client behaviour) and `new` threads opening a connection per request. Half the
    keep-alive clients pause up to 30 ms between requests, so that at any moment some
    connections are idle (the ones a careless drain cuts as the next request arrives); `slow`
    more keep-alive clients ask for /sleep/0.5, so that some requests are always in flight."""

    def __init__(self, port: int, keep: int = 8, new: int = 4, slow: int = 0) -> None:
        self.port = port
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.reconnects = 0
        self.threads = [threading.Thread(target=self._keep_alive, args=(0.03 * (i % 2),),
                                         daemon=True) for i in range(keep)]
        self.threads += [threading.Thread(target=self._new_connections, daemon=True)
                         for _ in range(new)]
        self.threads += [threading.Thread(target=self._keep_alive, args=(0.0, "/sleep/0.5"),
                                          daemon=True) for _ in range(slow)]
        self.clients = keep + new + slow

    def __enter__(self) -> HttpLoad:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(15)
        assert not any(t.is_alive() for t in self.threads), "an HTTP client thread hangs"

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def _one(self, conn: http.client.HTTPConnection, close: bool,
             path: str = "/ok") -> tuple[bool, str, bool]:
        """(ok, error, the connection may be reused)"""
        try:
            conn.request("GET", path, headers={"Connection": "close"} if close else {})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            return False, f"{type(exc).__name__}: {exc}", False
        expected = b"ok " if path == "/ok" else b"slept "
        if resp.status != 200 or not body.startswith(expected):
            return False, f"status {resp.status}: {body[:80]!r}", not resp.will_close
        return True, "", not resp.will_close

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _keep_alive(self, think: float, path: str = "/ok") -> None:
        conn: http.client.HTTPConnection | None = None
        opened = 0.0
        while not self._stop.is_set():
            if think:
                time.sleep(random.uniform(0, think))
            if conn is None:
                opened = time.monotonic()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
            started = time.monotonic()
            ok, error, keep = self._one(conn, close=False, path=path)
            self._record(Outcome("keep" if path == "/ok" else "slow", opened, started, ok, error))
            if not keep:
                conn.close()
                conn = None
                with self._lock:
                    self.reconnects += 1
        if conn is not None:
            conn.close()

    def _new_connections(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
            ok, error, _ = self._one(conn, close=True)
            conn.close()
            self._record(Outcome("new", started, started, ok, error))


# -- WebSocket clients ---------------------------------------------------------------------------


@dataclass
class WsClient:
    """One echo WebSocket: numbered messages, each echo checked in order."""

    idx: int
    ws: ClientConnection | None = None
    local_port: int = 0
    sent_at: list[float] = field(default_factory=list)
    echoed: int = 0
    last_echo_at: float = 0.0
    errors: list[str] = field(default_factory=list)
    closed_at: float | None = None  # when it ended, unless the test ended it
    close_code: int | None = None
    close_reason: str = ""
    ending: bool = False  # the test is closing it
    stop: asyncio.Event | None = None
    task: asyncio.Task | None = None  # type: ignore[type-arg]

    @property
    def sent(self) -> int:
        return len(self.sent_at)

    def echoed_before(self, t: float) -> bool:
        """Every message sent before `t` was echoed."""
        return self.echoed >= sum(1 for s in self.sent_at if s < t)

    def describe(self) -> str:
        return (f"ws#{self.idx} sent {self.sent} echoed {self.echoed} closed_at={self.closed_at} "
                f"code={self.close_code} {self.close_reason!r} errors={self.errors[:3]}")


class WsPool:
    """WebSocket echo clients on one asyncio loop in a thread of their own."""

    def __init__(self, port: int, interval: tuple[float, float] = (0.1, 0.2)) -> None:
        self.base = f"ws://{HOST}:{port}"
        self.url = f"{self.base}/echo"
        self.interval = interval
        self.clients: list[WsClient] = []
        self.churn_done = 0
        self.churn_errors: list[str] = []
        self._churn_stop: asyncio.Event | None = None
        self._churn_tasks: list[asyncio.Task] = []  # type: ignore[type-arg]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _call(self, coro, timeout: float):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _connect(self, path: str = "/echo") -> connect:
        return connect(self.base + path, proxy=None, compression=None, ping_interval=None,
                       open_timeout=20, close_timeout=5, max_queue=None)

    # opening

    def open(self, n: int, timeout: float = 60.0, path: str = "/echo") -> list[WsClient]:
        return self._call(self._open(n, path), timeout)  # type: ignore[no-any-return]

    def open_later(self, n: int, path: str) -> concurrent.futures.Future[list[WsClient]]:
        """Start opening `n` clients; the future has them once every handshake is done."""
        return asyncio.run_coroutine_threadsafe(self._open(n, path), self.loop)

    async def _open(self, n: int, path: str = "/echo") -> list[WsClient]:
        base = len(self.clients)
        new = [WsClient(base + i) for i in range(n)]
        self.clients.extend(new)
        limit = asyncio.Semaphore(20)

        async def one(c: WsClient) -> None:
            async with limit:
                c.ws = await self._connect(path)
            c.local_port = c.ws.local_address[1]
            c.stop = asyncio.Event()
            c.task = asyncio.create_task(self._run(c))

        await asyncio.gather(*(one(c) for c in new))
        return new

    async def _run(self, c: WsClient) -> None:
        assert c.ws is not None and c.stop is not None
        reader = asyncio.create_task(self._read(c))
        while not c.stop.is_set() and not reader.done():
            try:
                await c.ws.send(f"{c.idx}:{c.sent}")
            except ConnectionClosed:
                break
            c.sent_at.append(time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(c.stop.wait(), random.uniform(*self.interval))
        await reader

    async def _read(self, c: WsClient) -> None:
        assert c.ws is not None
        try:
            async for message in c.ws:
                expected = f"{c.idx}:{c.echoed}"
                if message != expected:
                    c.errors.append(f"got {message!r}, expected {expected!r}")
                c.echoed += 1
                c.last_echo_at = time.monotonic()
        except ConnectionClosed:
            pass
        if not c.ending:
            c.closed_at = time.monotonic()
            c.close_code = c.ws.close_code
            c.close_reason = c.ws.close_reason or ""

    # ending

    def finish(self, clients: list[WsClient] | None = None, timeout: float = 60.0) -> None:
        """Stop sending, wait (bounded) for the echoes still due, then close normally."""
        self._call(self._finish(self.clients if clients is None else clients), timeout)

    async def _finish(self, clients: list[WsClient]) -> None:
        live = [c for c in clients if c.ws is not None]
        for c in live:
            assert c.stop is not None
            c.stop.set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(
                c.closed_at is None and c.echoed < c.sent for c in live):
            await asyncio.sleep(0.05)
        for c in live:
            c.ending = c.closed_at is None

        async def close(c: WsClient) -> None:
            assert c.ws is not None and c.task is not None
            await c.ws.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(c.task, 10)

        await asyncio.gather(*(close(c) for c in live), return_exceptions=True)

    # churn: short WebSockets opened, used and closed in a loop

    def start_churn(self, tasks: int = 2) -> None:
        async def start() -> None:
            self._churn_stop = asyncio.Event()
            self._churn_tasks = [asyncio.create_task(self._churn()) for _ in range(tasks)]

        self._call(start(), 5)

    def stop_churn(self) -> None:
        async def stop() -> None:
            assert self._churn_stop is not None
            self._churn_stop.set()
            await asyncio.wait_for(asyncio.gather(*self._churn_tasks), 30)

        self._call(stop(), 40)

    async def _churn(self) -> None:
        assert self._churn_stop is not None
        while not self._churn_stop.is_set():
            try:
                async with self._connect() as ws:
                    for i in range(3):
                        await ws.send(f"churn {i}")
                        echo = await asyncio.wait_for(ws.recv(), 10)
                        if echo != f"churn {i}":
                            self.churn_errors.append(f"echo {echo!r} for 'churn {i}'")
                self.churn_done += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.churn_errors.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.05)

    def close(self) -> None:
        async def abort() -> None:
            for c in self.clients:
                if c.ws is not None and c.ws.transport is not None:
                    c.ws.transport.abort()
            for t in [c.task for c in self.clients if c.task] + self._churn_tasks:
                t.cancel()
            await asyncio.sleep(0.05)

        with contextlib.suppress(Exception):
            self._call(abort(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def http_backend(backend_factory: Callable[..., Backend]) -> Backend:
    return backend_factory("sup_backend.py")


@pytest.fixture
def ws_backend(backend_factory: Callable[..., Backend]) -> Backend:
    return backend_factory("ws_backend.py")


@pytest.fixture
def make_charon(tmp_path: Path) -> Iterator[Callable[..., Charon]]:
    """Supervisors on a config written by `config_text`; each stopped fast (SIGQUIT: a drain of
    5 minutes must not hold up the teardown) and its workers killed by PID."""
    started: list[Charon] = []

    def make(hosts: str, *, workers: int = 2, server: str = "", start: bool = True) -> Charon:
        charon = Charon(tmp_path, hosts, workers=workers)
        rewrite(charon, config_text(charon, hosts, workers=workers, server=server))
        started.append(charon)
        if start:
            charon.start()
        return charon

    yield make
    for charon in started:
        if charon.proc is not None:
            for pid in charon._seen_pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            charon.stop(sig=signal.SIGQUIT, timeout=15)


@pytest.fixture
def ws_pool() -> Iterator[Callable[[int], WsPool]]:
    pools: list[WsPool] = []

    def make(port: int) -> WsPool:
        pool = WsPool(port)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


# -- 1. the main proof ---------------------------------------------------------------------------

RELOADS = 10
WEBSOCKETS = 200


@pytest.mark.timeout(110)
def test_ten_reloads_under_load_drop_nothing(make_charon, http_backend, ws_backend,
                                             ws_pool) -> None:
    """10 SIGHUPs 1 s apart (three of them also change the worker count) while keep-alive,
    connection-per-request and slow HTTP clients, 200 long-lived WebSockets and a churn of short
    ones run: no request fails, no WebSocket closes, every message is echoed in order, and the
    old generations exit once their connections are gone."""
    hosts = hosts_toml(http_backend, ws_backend)
    charon = make_charon(hosts, workers=2)  # drain_timeout: the default 5 minutes
    gen0 = set(health(charon)["worker_pids"])
    pool = ws_pool(charon.port)
    t0 = time.monotonic()
    long_lived = pool.open(WEBSOCKETS)
    opened_in = time.monotonic() - t0
    before = reloads(charon)["count"]

    workers = 2
    with HttpLoad(charon.port, keep=8, new=4, slow=2) as load:
        pool.start_churn(2)
        time.sleep(1.0)
        t_first = time.monotonic()
        for i in range(RELOADS):
            if i % 3 == 1:  # reloads 2, 5 and 8 also change the worker count: 3, 2, 3
                workers = 5 - workers
                rewrite(charon, config_text(charon, hosts, workers=workers))
            os.kill(charon.pid, signal.SIGHUP)
            time.sleep(1.0)
        status = wait_reloads(charon, before + RELOADS, timeout=60)
        t_reloaded = time.monotonic()
        current = set(health(charon)["worker_pids"])

        # Under load, every intermediate generation retires for good: only generation 0, which
        # holds the long-lived WebSockets, stays beside the current one.
        def only_gen0_left() -> bool:
            return children(charon) <= current | gen0

        wait_until(only_gen0_left, 20, interval=0.1,
                   what="the intermediate generations to exit under load")
        time.sleep(1.0)
        pool.stop_churn()
    t_load_end = time.monotonic()
    holding = children(charon) & gen0  # generation-0 workers still holding WebSockets
    pool.finish(long_lived)

    requests = len(load.outcomes)
    failed = load.failed
    messages = sum(c.sent for c in long_lived)
    echoed = sum(c.echoed for c in long_lived)
    closed_early = [c for c in long_lived if c.closed_at is not None]
    disordered = [c for c in long_lived if c.errors]
    durations = reload_durations(charon.log())
    summary = (
        f"{RELOADS} reloads in {t_reloaded - t_first:.1f} s (durations "
        f"{', '.join(f'{d:.2f}' for d in durations)} s); {requests} HTTP requests "
        f"({sum(o.kind == 'keep' for o in load.outcomes)} keep-alive, "
        f"{sum(o.kind == 'new' for o in load.outcomes)} new-connection, "
        f"{sum(o.kind == 'slow' for o in load.outcomes)} of 0.5 s; "
        f"{load.reconnects} keep-alive reconnects after Connection: close), {len(failed)} failed; "
        f"{len(long_lived)} WebSockets (opened in {opened_in:.1f} s): {messages} messages sent, "
        f"{echoed} echoed, {len(closed_early)} closed early; {pool.churn_done} short WebSockets "
        f"opened and closed, {len(pool.churn_errors)} failed; load ran "
        f"{t_load_end - t_first:.1f} s"
    )
    print("\n" + summary)

    assert status["count"] == before + RELOADS, summary
    assert status["last_result"] == "success", status
    samples = metrics(charon)
    assert metric(samples, "charon_config_reloads_total", result="success") == RELOADS, summary
    assert metric(samples, "charon_config_reloads_total", result="error") == 0
    assert requests > 500, f"the HTTP load did not run: {summary}"
    assert not failed, (
        f"{len(failed)} HTTP requests failed: "
        f"{sorted({o.error for o in failed})[:5]}; {summary}")
    assert not closed_early, (
        f"{len(closed_early)} WebSockets closed before the end: "
        f"{[c.describe() for c in closed_early[:5]]}; {summary}")
    assert not disordered, f"echoes out of order: {[c.describe() for c in disordered[:5]]}"
    assert messages > WEBSOCKETS * 20, f"the WebSocket load did not run: {summary}"
    assert echoed == messages, f"{messages - echoed} messages not echoed; {summary}"
    assert pool.churn_done > 20, summary
    assert not pool.churn_errors, f"short WebSockets failed: {pool.churn_errors[:5]}; {summary}"
    assert holding, "generation 0 exited while it held 200 WebSockets (drain_timeout: 5 min)"

    # Once the WebSockets are gone, generation 0 exits too: only the current workers remain.
    t_closed = time.monotonic()
    wait_until(lambda: children(charon) == current, 15, interval=0.1,
               what=f"only the current workers {sorted(current)} to remain "
                    f"(children: {sorted(children(charon))})")
    print(f"generation 0 exited {time.monotonic() - t_closed:.2f} s after its WebSockets closed")
    h = health(charon)
    assert h["workers_ready"] == workers == len(current)
    assert all(get(charon.port)[0] == 200 for _ in range(5))


# -- 2. drain_timeout ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("drain", [2.0, 0.0], ids=["drain-2s", "drain-0s"])
def test_drain_timeout_closes_old_websockets_with_1001(make_charon, http_backend, ws_backend,
                                                       ws_pool, drain: float) -> None:
    charon = make_charon(hosts_toml(http_backend, ws_backend), workers=1,
                         server=f'drain_timeout = "{drain:g}s"')
    (old_pid,) = health(charon)["worker_pids"]
    pool = ws_pool(charon.port)
    old = pool.open(5)
    assert {owner(charon.port, c.local_port, [old_pid]) for c in old} == {old_pid}
    # A request in flight across the reload, and past the end of the drain.
    executor = concurrent.futures.ThreadPoolExecutor(1)
    slow_request = executor.submit(get, charon.port, "/sleep/3")
    wait_until(lambda: get(http_backend.port, "/sleeping")[1] == b"1", 5, interval=0.02,
               what="the slow request to reach the backend")
    time.sleep(0.3)

    t_hup = time.monotonic()
    os.kill(charon.pid, signal.SIGUSR2)  # a new generation: this one retires
    status = wait_reloads(charon, 1)
    t_reloaded = time.monotonic()
    assert status["last_result"] == "success", status
    (new_pid,) = health(charon)["worker_pids"]
    assert new_pid != old_pid

    # Opened after the reload: served by the new worker.
    new = pool.open(3)
    owners = {owner(charon.port, c.local_port, [old_pid, new_pid]) for c in new}
    assert owners == {new_pid}, f"new WebSockets held by {owners}; new worker {new_pid}"

    wait_until(lambda: all(c.closed_at is not None for c in old), drain + 6, interval=0.02,
               what="the old WebSockets to be closed")
    closes = [c.closed_at - t_reloaded for c in old]  # type: ignore[operator]
    print(f"\ndrain_timeout {drain:g}s: reload took {t_reloaded - t_hup:.2f} s; old WebSockets "
          f"closed {min(closes):.2f}-{max(closes):.2f} s after it; last echoes "
          f"{min(c.last_echo_at for c in old) - t_reloaded:+.2f} s after it")
    for c in old:
        assert c.close_code == 1001, c.describe()
        assert not c.errors, c.describe()
        # Every message sent well before the Close was echoed: the tunnel was not frozen.
        assert c.echoed_before(c.closed_at - 0.5), c.describe()  # type: ignore[operator]
    if drain:
        assert min(c.closed_at for c in old) - t_hup >= drain - 0.1, "closed before drain_timeout"  # type: ignore[operator, type-var]
        assert max(closes) <= drain + 2.0, f"closed {max(closes):.2f} s after the reload"
        # They kept echoing through the drain.
        assert min(c.last_echo_at for c in old) - t_reloaded >= drain - 0.6
    else:
        assert max(closes) <= 1.5, f"closed {max(closes):.2f} s after the reload (drain 0s)"
    assert slow_request.result(10) == (200, b"slept 3.0\n"), "the in-flight request failed"
    executor.shutdown()
    wait_until(lambda: not alive(old_pid), 5, what="the old worker to exit")

    # The new WebSockets stay open past the old ones' close and keep echoing.
    echoed = [c.echoed for c in new]
    time.sleep(1.0)
    assert all(c.closed_at is None for c in new), [c.describe() for c in new]
    assert all(c.echoed > e for c, e in zip(new, echoed, strict=True))
    pool.finish(new)
    assert all(c.echoed == c.sent and not c.errors for c in new), [c.describe() for c in new]


# -- 3. an invalid config ------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_invalid_config_keeps_serving_and_charon_reload_reports(make_charon, http_backend,
                                                                ws_backend, tmp_path) -> None:
    pidfile = tmp_path / "charon.pid"
    server = f'pidfile = "{pidfile}"'
    hosts = hosts_toml(http_backend, ws_backend)
    charon = make_charon(hosts, workers=2, server=server)
    path = str(charon.config_path)
    pids = sorted(health(charon)["worker_pids"])
    assert pidfile.read_text().strip() == str(charon.pid)
    assert get(charon.port, host="new.test")[0] == 404

    good = config_text(charon, hosts, workers=2, server=server)
    lines = good.splitlines()
    at = lines.index(server) + 1  # insert after the pidfile line: the bad line is at+1
    bad = "\n".join([*lines[:at], 'drain_timeout = "soon"', *lines[at:]]) + "\n"
    bad_line = at + 1
    rewrite(charon, bad)
    os.kill(charon.pid, signal.SIGHUP)
    status = wait_reloads(charon, 1)
    assert status["last_result"] == "error", status
    assert f"{path}:{bad_line}:" in str(status["last_error"]), status
    assert re.search(rf"reload failed.*{re.escape(path)}:{bad_line}: .*drain_timeout",
                     charon.log()), charon.log()[-2000:]
    h = health(charon)
    assert sorted(h["worker_pids"]) == pids, "the old workers were replaced"
    assert h["workers_ready"] == 2
    assert all(get(charon.port)[0] == 200 for _ in range(10))
    samples = metrics(charon)
    assert metric(samples, "charon_config_reloads_total", result="error") == 1
    assert metric(samples, "charon_config_reloads_total", result="success") == 0
    assert metric(samples, "charon_config_last_reload_successful") == 0

    # `charon reload` on the broken file: exit 1 and the reason.
    result = charon_cli("reload", "--config", path)
    assert result.returncode == 1, result
    assert f"{path}:{bad_line}:" in result.stderr and "drain_timeout" in result.stderr, result

    # A valid file the supervisor cannot apply (the new listen port is taken): exit 1, the
    # reason from the supervisor, and the old config still serves.
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        rewrite(charon, config_text(charon, hosts, listen=[charon.port, busy], server=server))
        result = charon_cli("reload", "--config", path, "--pidfile", str(pidfile))
    assert result.returncode == 1, result
    assert "refused" in result.stderr and f"{busy}" in result.stderr, result
    assert reloads(charon)["count"] == 2
    assert sorted(health(charon)["worker_pids"]) == pids
    assert get(charon.port)[0] == 200

    # Fixed, with a new domain: exit 0 and the new config serves.
    fixed = config_text(charon, hosts_toml(http_backend, ws_backend, extra=(
        f'[[hosts]]\ndomains = ["new.test"]\nupstream = "{http_backend.url}"\n')), server=server)
    rewrite(charon, fixed)
    result = charon_cli("reload", "--config", path, "--pidfile", str(pidfile))
    assert result.returncode == 0, result
    assert "reloaded" in result.stdout, result
    status = reloads(charon)
    assert status["count"] == 3 and status["last_result"] == "success", status
    status_new, body = get(charon.port, host="new.test")
    assert status_new == 200 and body.startswith(b"ok "), (status_new, body)
    assert get(charon.port)[0] == 200
    assert sorted(health(charon)["worker_pids"]) == pids, "applied in place: the same workers"
    samples = metrics(charon)
    assert metric(samples, "charon_config_reloads_total", result="success") == 1
    assert metric(samples, "charon_config_reloads_total", result="error") == 2
    assert metric(samples, "charon_config_last_reload_successful") == 1

    # Without --pidfile, `charon reload` finds the supervisor through [server] pidfile.
    result = charon_cli("reload", "--config", path)
    assert result.returncode == 0, result
    assert reloads(charon)["count"] == 4


# -- 4. listeners added and removed --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_listeners_added_and_removed(make_charon, http_backend, ws_backend) -> None:
    hosts = hosts_toml(http_backend, ws_backend)
    charon = make_charon(hosts, workers=2)
    a, b = charon.port, free_port()
    (inode_a,) = listening_inodes(a)
    assert connection_refused(b)

    rewrite(charon, config_text(charon, hosts, listen=[a, b]))
    os.kill(charon.pid, signal.SIGHUP)
    assert wait_reloads(charon, 1)["last_result"] == "success", charon.log()[-2000:]
    assert get(b)[0] == 200
    assert get(a)[0] == 200
    assert listening_inodes(a) == {inode_a}, "the unchanged listener was re-bound"
    (inode_b,) = listening_inodes(b)

    # A keep-alive connection accepted on b, idle while b is removed.
    kept = http.client.HTTPConnection(HOST, b, timeout=10)
    kept.request("GET", "/ok")
    resp = kept.getresponse()
    assert resp.status == 200 and not resp.will_close
    resp.read()

    rewrite(charon, config_text(charon, hosts, listen=[a]))
    t_hup = time.monotonic()
    os.kill(charon.pid, signal.SIGHUP)
    assert wait_reloads(charon, 2)["last_result"] == "success", charon.log()[-2000:]
    t_reloaded = time.monotonic()

    # The connection accepted before still gets its answer, and is then closed.
    kept.request("GET", "/ok")
    resp = kept.getresponse()
    assert resp.status == 200 and resp.read().startswith(b"ok ")
    assert resp.will_close, "a retiring worker kept the connection alive"
    kept.close()

    wait_until(lambda: connection_refused(b), 5, interval=0.02,
               what=f"connections to the removed listener {b} to be refused")
    print(f"\nremoved listener refusing {time.monotonic() - t_hup:.2f} s after SIGHUP "
          f"(reload done at {t_reloaded - t_hup:.2f} s)")
    assert not listening_inodes(b), f"still a listening socket on {b}"
    for pid in children(charon):
        assert inode_b not in socket_inodes(pid), f"worker {pid} still holds the removed socket"
    assert inode_b not in socket_inodes(charon.pid)
    assert listening_inodes(a) == {inode_a}
    assert all(get(a)[0] == 200 for _ in range(10))


# -- 5. a worker SIGKILLed under load ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigkilled_worker_only_drops_its_own_websockets(make_charon, http_backend, ws_backend,
                                                        ws_pool) -> None:
    charon = make_charon(hosts_toml(http_backend, ws_backend), workers=2)
    victim, survivor = health(charon)["worker_pids"]
    pool = ws_pool(charon.port)
    with frozen([survivor]):
        on_victim = pool.open(10)
    with frozen([victim]):
        on_survivor = pool.open(10)
    assert {owner(charon.port, c.local_port, [victim]) for c in on_victim} == {victim}
    assert {owner(charon.port, c.local_port, [survivor]) for c in on_survivor} == {survivor}

    with HttpLoad(charon.port, keep=4, new=4) as load:
        time.sleep(1.0)
        os.kill(victim, signal.SIGSTOP)  # from here on it accepts nothing
        wait_until(lambda: process_state(victim) == "T", 2, interval=0.002)
        t_stop = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not alive(victim), 5, interval=0.005, what="the worker to die")
        t_kill = time.monotonic()
        before_replacement = pool.open(10)  # on the survivor, or the replacement
        wait_until(lambda: all(c.closed_at is not None for c in on_victim), 5, interval=0.02,
                   what="the killed worker's WebSockets to end")
        t_victims_closed = time.monotonic()
        wait_until(lambda: (h := charon.health()) is not None and h["workers_ready"] == 2
                   and victim not in h["worker_pids"], 10, what="a replacement worker")
        t_replaced = time.monotonic()
        charon.worker_pids()
        after_replacement = pool.open(10)
        echoed = {c.idx: c.echoed for c in on_survivor}
        time.sleep(2.0)
    new_ws = before_replacement + after_replacement
    pool.finish(on_survivor + new_ws)

    failed = load.failed
    late_failures = [o for o in failed if o.opened > t_stop]
    print(f"\n{len(load.outcomes)} HTTP requests, {len(failed)} failed (all on connections "
          f"opened before the kill: {not late_failures}); killed worker's 10 WebSockets ended "
          f"{t_victims_closed - t_kill:.2f} s after its death with codes "
          f"{sorted({c.close_code for c in on_victim})}; replacement ready "
          f"{t_replaced - t_kill:.2f} s after it; survivor's WebSockets echoed "
          f"{sum(c.echoed for c in on_survivor)} messages")
    assert not late_failures, sorted({o.error for o in late_failures})
    assert len(failed) <= load.clients, sorted({o.error for o in failed})
    for c in on_victim:
        assert c.close_code != 1000, c.describe()
    for c in on_survivor + new_ws:
        assert c.closed_at is None, f"a WebSocket not on the killed worker ended: {c.describe()}"
        assert not c.errors and c.echoed == c.sent, c.describe()
    assert all(c.echoed > echoed[c.idx] for c in on_survivor), "the survivor's tunnels stalled"
    assert all(c.echoed >= 5 for c in new_ws)


# -- 6. TTIN / TTOU ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ttin_adds_and_ttou_retires_a_worker_keeping_its_websockets(make_charon, http_backend,
                                                                   ws_backend, ws_pool) -> None:
    drain = 3.0
    charon = make_charon(hosts_toml(http_backend, ws_backend), workers=2,
                         server=f'drain_timeout = "{drain:g}s"')
    first = set(health(charon)["worker_pids"])

    os.kill(charon.pid, signal.SIGTTIN)
    charon.wait_ready(3)
    h = health(charon)
    assert h["workers_ready"] == 3 and len(h["worker_pids"]) == 3, h
    (added,) = set(h["worker_pids"]) - first
    assert first <= set(h["worker_pids"])

    pool = ws_pool(charon.port)
    with frozen(first):
        on_added = pool.open(3)
    with frozen([added]):
        on_first = pool.open(3)
    assert {owner(charon.port, c.local_port, [added]) for c in on_added} == {added}

    t_ttou = time.monotonic()
    os.kill(charon.pid, signal.SIGTTOU)
    wait_until(lambda: (h := charon.health()) is not None and added not in h["worker_pids"], 5,
               what="the newest worker to be retired")
    h = health(charon)
    assert h["workers_ready"] == 2 and set(h["worker_pids"]) == first, h
    assert alive(added), "the retired worker exited at once, cutting its WebSocket"
    assert all(get(charon.port)[0] == 200 for _ in range(5))

    wait_until(lambda: all(c.closed_at is not None for c in on_added), drain + 5, interval=0.02,
               what="the retired worker's WebSockets to close")
    closes = [c.closed_at - t_ttou for c in on_added]  # type: ignore[operator]
    print(f"\nretired worker's WebSockets closed {min(closes):.2f}-{max(closes):.2f} s after "
          f"SIGTTOU (drain_timeout {drain:g}s)")
    for c in on_added:
        assert c.close_code == 1001, c.describe()
        assert c.echoed_before(c.closed_at - 0.5), c.describe()  # type: ignore[operator]
    assert min(closes) >= drain - 0.1, f"cut {min(closes):.2f} s after SIGTTOU, before the drain"
    assert max(closes) <= drain + 2.5
    wait_until(lambda: not alive(added), 5, what="the retired worker to exit")
    assert all(c.closed_at is None for c in on_first), [c.describe() for c in on_first]
    pool.finish(on_first)
    assert all(c.echoed == c.sent and not c.errors for c in on_first)
    assert children(charon) == first


# -- 7. a stop while old workers drain -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_during_a_drain_closes_old_websockets_with_1001(make_charon, http_backend,
                                                                ws_backend, ws_pool) -> None:
    """SIGTERM drains every worker, retiring ones included: their tunnels get 1001 at once, and
    the supervisor does not sit out the 5-minute drain_timeout nor kill them without a Close."""
    charon = make_charon(hosts_toml(http_backend, ws_backend), workers=1,
                         server='shutdown_timeout = "3s"')
    (old_pid,) = health(charon)["worker_pids"]
    pool = ws_pool(charon.port)
    old = pool.open(3)
    os.kill(charon.pid, signal.SIGUSR2)  # a new generation: this one retires
    assert wait_reloads(charon, 1)["last_result"] == "success"
    new = pool.open(3)
    assert alive(old_pid)

    t_term = time.monotonic()
    assert charon.proc is not None
    charon.proc.send_signal(signal.SIGTERM)
    try:
        code = charon.proc.wait(3 + 3)
    except subprocess.TimeoutExpired:
        code = None
    exited_after = time.monotonic() - t_term
    wait_until(lambda: all(c.closed_at is not None for c in old + new), 10, interval=0.02)
    print(f"\nSIGTERM during a drain: supervisor exit code {code} after {exited_after:.2f} s; "
          f"old WebSockets closed with {[c.close_code for c in old]} after "
          f"{[round(c.closed_at - t_term, 2) for c in old]} s; new ones with "  # type: ignore[operator]
          f"{[c.close_code for c in new]}")
    kill_pid(old_pid)
    assert all(c.close_code == 1001 for c in new), [c.describe() for c in new]
    assert all(c.close_code == 1001 for c in old), (
        f"the retiring worker's tunnels were not closed with 1001 on SIGTERM: "
        f"{[c.describe() for c in old]}")
    assert all(c.closed_at - t_term < 2.0 for c in old), [c.describe() for c in old]  # type: ignore[operator]
    assert code == 0, f"the supervisor did not exit within 6 s of SIGTERM:\n{charon.log()[-2000:]}"


# -- 8. a WebSocket handshake in flight when its worker retires ----------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("drain", ["5m", "0s"])
def test_handshake_in_flight_at_retire_gets_the_drain(make_charon, http_backend, ws_backend,
                                                      backend_factory, ws_pool,
                                                      drain: str) -> None:
    """The backend answers the handshake after the reload retired the worker: the tunnel still
    gets the drain: open for drain_timeout (5 min), or a Close 1001 (0s) - never a bare cut."""
    slow = backend_factory("ws_backend.py")  # its /slow-echo answers the handshake late
    charon = make_charon(hosts_toml(http_backend, ws_backend, slow_ws=slow), workers=1,
                         server=f'drain_timeout = "{drain}"\nshutdown_timeout = "10s"')
    (old_pid,) = health(charon)["worker_pids"]
    pool = ws_pool(charon.port)
    pending = pool.open_later(2, "/slow-echo?delay=2")
    wait_until(lambda: get(slow.port, "/pending")[1] == b"2", 5, interval=0.02,
               what="the handshakes to reach the backend")
    t_hup = time.monotonic()
    os.kill(charon.pid, signal.SIGUSR2)  # a new generation: this one retires
    assert wait_reloads(charon, 1)["last_result"] == "success"
    t_reloaded = time.monotonic()
    assert alive(old_pid)
    clients = pending.result(15)
    t_open = time.monotonic()
    if drain == "0s":
        wait_until(lambda: all(c.closed_at is not None for c in clients), 5, interval=0.02,
                   what="the tunnels to end")
    else:
        time.sleep(2.0)
    print(f"\ndrain {drain}: reload done {t_reloaded - t_hup:.2f} s after SIGHUP, handshakes "
          f"done {t_open - t_hup:.2f} s after it; tunnels: {[c.describe() for c in clients]}")
    if drain == "0s":
        assert all(c.close_code == 1001 for c in clients), (
            "a tunnel opened on a retiring worker was cut without a Close frame: "
            f"{[c.describe() for c in clients]}")
    else:
        assert {owner(charon.port, c.local_port, [old_pid]) for c in clients} == {old_pid}
        assert all(c.closed_at is None for c in clients), [c.describe() for c in clients]
        assert all(c.echoed >= 5 for c in clients), [c.describe() for c in clients]
        assert alive(old_pid)
        pool.finish(clients)
        assert all(c.echoed == c.sent and not c.errors for c in clients)
        wait_until(lambda: not alive(old_pid), 5, what="the old worker to exit")
