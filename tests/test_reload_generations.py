# ruff: noqa: F811  (the fixtures imported from test_reload are redefined as arguments)
"""Generations (issue #11): retiring generations are capped (`max_retiring_generations`), a
changed worker count grows or shrinks the pool in place, and `charon reload --restart-workers`
starts a new generation. Real processes on 127.0.0.1; every process stopped by PID (the
fixtures of test_reload.py).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.request

import pytest
from harness import HOST, Charon, wait_until
from test_reload import (  # noqa: F401  (fixtures)
    WsPool,
    alive,
    charon_cli,
    children,
    config_text,
    frozen,
    health,
    hosts_toml,
    http_backend,
    make_charon,
    reloads,
    rewrite,
    wait_reloads,
    ws_backend,
    ws_pool,
)

from charon.config import ConfigError, load_config_text


def _rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def _charon_rss(charon: Charon) -> int:
    """VmRSS of the supervisor and all its live children, in KiB."""
    return _rss_kib([charon.pid, *children(charon)])


class _Sampler:
    """The supervisor's live children every 0.2 s, in a thread: the largest count seen."""

    def __init__(self, charon: Charon) -> None:
        self.charon = charon
        self.most = 0
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            n = len(children(self.charon))
            self.counts.append(n)
            self.most = max(self.most, n)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class _Opener:
    """Opens one long-lived echo WebSocket every `every` seconds, in a thread, until stopped."""

    def __init__(self, pool: WsPool, every: float) -> None:
        self.pool = pool
        self.every = every
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                # ?id=N (N: the client's index): the backend's /last-close tells its close code
                self.pool.open(1, timeout=20, path=f"/echo?id={len(self.pool.clients)}")
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(25)


# -- 1. the cap ------------------------------------------------------------------------------


RESTARTS = 8  # four times the cap, each 1.5 s apart
WORKERS = 2
CAP = 2


@pytest.mark.timeout(120)
def test_retiring_generations_are_capped_under_a_websocket_arrival_stream(
        make_charon, http_backend, ws_backend) -> None:
    """Issue #11's pile-up: 2 workers, a WebSocket opened every 0.3 s and kept, a new
    generation (USR2) every 1.5 s with drain_timeout 5 minutes. Without the cap every generation
    kept its tunnels and stayed (2 + 2 x 12 = 26 processes here); with it, at no sample more than
    workers + cap x workers, and the cut generations' WebSockets got 1001, the others none."""
    charon = make_charon(hosts_toml(http_backend, ws_backend), workers=WORKERS)
    assert health(charon)["reloads"]["count"] == 0
    pool = WsPool(charon.port, interval=(1.0, 2.0))  # light echo traffic: a 2-core VM
    rss_before = _charon_rss(charon)
    sampler = _Sampler(charon)
    opener = _Opener(pool, 0.3)
    try:
        time.sleep(1.0)
        for i in range(RESTARTS):
            os.kill(charon.pid, signal.SIGUSR2)
            wait_reloads(charon, i + 1, timeout=30)
            time.sleep(1.5)
        opener.stop()
        time.sleep(1.0)
        rss_after = _charon_rss(charon)
        sampler.stop()
        status = reloads(charon)
        assert status["count"] == RESTARTS and status["last_result"] == "success", status
        live = len(children(charon))
        print(f"\n{RESTARTS} new generations: at most {sampler.most} worker processes "
              f"(bound {WORKERS + CAP * WORKERS}), {live} at the end; RSS of all charon "
              f"processes {rss_before / 1024:.0f} MiB before, {rss_after / 1024:.0f} MiB after; "
              f"{len(pool.clients)} WebSockets opened")
        assert sampler.most <= WORKERS + CAP * WORKERS, sampler.counts
        assert live <= WORKERS + CAP * WORKERS
        assert not opener.errors, opener.errors[:3]
        closed = [c for c in pool.clients if c.closed_at is not None]
        open_ = [c for c in pool.clients if c.closed_at is None]
        assert closed, "no generation was cut: the cap did nothing"
        assert all(c.close_code == 1001 for c in closed), [c.describe() for c in closed[:3]]
        for c in closed[:5]:  # the backend side got 1001 too
            with urllib.request.urlopen(f"{ws_backend.url}/last-close?id={c.idx}", timeout=5) as r:
                assert json.loads(r.read())["code"] == 1001, c.describe()
        assert open_, "the cap cut the generations it should keep"
        # The oldest generations were cut: the WebSockets still open were opened after the
        # closed ones (numbered in opening order; old and new generation both accept for a
        # moment during a reload, hence a little slack).
        assert max(c.idx for c in closed) < min(c.idx for c in open_) + 3
        pool.finish(open_)
        assert all(not c.errors and c.echoed == c.sent for c in open_), \
            [c.describe() for c in open_ if c.errors or c.echoed != c.sent][:3]
    finally:
        opener.stop()
        sampler.stop()
        pool.close()


def test_max_retiring_generations_is_checked() -> None:
    base = '[server]\nlisten = "127.0.0.1:8080"\nworkers = 1\n'
    hosts = '[[hosts]]\ndomains = ["a.test"]\nupstream = "http://127.0.0.1:9"\n'
    assert load_config_text(base + hosts, "x.toml").server.max_retiring_generations == 2
    assert load_config_text(base + "max_retiring_generations = 0\n" + hosts,
                            "x.toml").server.max_retiring_generations == 0
    for bad in ("-1", "17", '"2"'):
        with pytest.raises(ConfigError) as info:
            load_config_text(base + f"max_retiring_generations = {bad}\n" + hosts, "x.toml")
        assert str(info.value).startswith("x.toml:4:"), str(info.value)


# -- 2. the worker count in place --------------------------------------------------------------


def _ask(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/ok", headers={"Host": HOST})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def _worker_pids_by_id(charon: Charon) -> dict[str, int]:
    return {wid: w["pid"] for wid, w in reloads(charon)["workers"].items()}


@pytest.mark.timeout(120)
def test_worker_count_grows_and_shrinks_in_place(make_charon, http_backend, ws_backend,
                                                  ws_pool) -> None:
    """workers 2 -> 3 -> 1 by SIGHUP: no new generation. The surviving workers keep their PIDs,
    a keep-alive connection and a WebSocket on worker 0 go on across both reloads, the added
    worker runs the new config, the removed ones retire and exit once idle."""
    hosts = hosts_toml(http_backend, ws_backend)
    charon = make_charon(hosts, workers=2)
    first = _worker_pids_by_id(charon)
    assert set(first) == {"0", "1"}
    pool = ws_pool(charon.port)
    with frozen([first["1"]]):  # both land on worker 0
        (ws,) = pool.open(1)
        conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
        assert _ask(conn) == 200
    sock = conn.sock

    rewrite(charon, config_text(charon, hosts, workers=3))
    os.kill(charon.pid, signal.SIGHUP)
    status = wait_reloads(charon, 1)
    assert status["last_result"] == "success", status
    grown = _worker_pids_by_id(charon)
    assert set(grown) == {"0", "1", "2"}, status
    assert grown["0"] == first["0"] and grown["1"] == first["1"], (first, grown)
    assert all(w["config_version"] == 2 for w in status["workers"].values()), status
    charon.wait_ready(3)
    assert health(charon)["workers_ready"] == 3
    assert _ask(conn) == 200 and conn.sock is sock

    rewrite(charon, config_text(charon, hosts, workers=1))
    os.kill(charon.pid, signal.SIGHUP)
    status = wait_reloads(charon, 2)
    assert status["last_result"] == "success", status
    assert _worker_pids_by_id(charon) == {"0": first["0"]}, status
    assert status["workers"]["0"]["config_version"] == 3, status
    assert health(charon)["worker_pids"] == [first["0"]]
    for _ in range(5):
        assert _ask(conn) == 200 and conn.sock is sock
    # The removed workers held nothing: they exit at once; nothing else was started.
    wait_until(lambda: children(charon) == {first["0"]}, 15,
               what="the removed workers to exit")
    assert not alive(grown["1"]) and not alive(grown["2"])
    sent = ws.sent
    wait_until(lambda: ws.echoed >= sent + 3, 10, what="the WebSocket to go on echoing")
    assert ws.closed_at is None, ws.describe()
    pool.finish([ws])
    assert ws.echoed == ws.sent and not ws.errors, ws.describe()
    conn.close()


@pytest.mark.timeout(60)
def test_a_ttin_count_is_kept_by_a_reload_that_keeps_workers(make_charon, http_backend,
                                                            ws_backend) -> None:
    """Only a changed `[server] workers` resizes: a worker added by TTIN survives a reload
    whose config keeps workers = 2, and one that sets workers = 2 -> 1 takes the pool to 1."""
    hosts = hosts_toml(http_backend, ws_backend)
    charon = make_charon(hosts, workers=2)
    os.kill(charon.pid, signal.SIGTTIN)
    charon.wait_ready(3)
    three = _worker_pids_by_id(charon)
    assert set(three) == {"0", "1", "2"}

    os.kill(charon.pid, signal.SIGHUP)  # the same file
    status = wait_reloads(charon, 1)
    assert status["last_result"] == "success", status
    assert _worker_pids_by_id(charon) == three, status

    rewrite(charon, config_text(charon, hosts, workers=1))
    os.kill(charon.pid, signal.SIGHUP)
    status = wait_reloads(charon, 2)
    assert status["last_result"] == "success", status
    assert _worker_pids_by_id(charon) == {"0": three["0"]}, status


# -- 3. charon reload --restart-workers ----------------------------------------------------------


@pytest.mark.timeout(90)
def test_charon_reload_restart_workers_starts_a_new_generation(make_charon, http_backend,
                                                               ws_backend, tmp_path) -> None:
    """An unchanged config would apply in place; --restart-workers starts new workers anyway
    (new code after an upgrade) and waits for them like a reload."""
    pidfile = tmp_path / "charon.pid"
    charon = make_charon(hosts_toml(http_backend, ws_backend), workers=2,
                         server=f'pidfile = "{pidfile}"')
    old = set(health(charon)["worker_pids"])
    path = str(charon.config_path)

    result = charon_cli("reload", "--config", path)
    assert result.returncode == 0, result.stderr
    assert set(health(charon)["worker_pids"]) == old  # in place

    result = charon_cli("reload", "--config", path, "--restart-workers")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reloaded: config version 3", result.stdout
    h = health(charon)
    assert h["workers_ready"] == 2 and not set(h["worker_pids"]) & old, (old, h)
    assert "reloaded: 2 workers" in charon.log()
