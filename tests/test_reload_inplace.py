# ruff: noqa: F811  (the fixtures imported from test_reload are redefined as arguments)
"""Reload in place (issue #11): SIGHUP hands a config that keeps the worker count and the
listening sockets to the running workers. Routes added, changed and removed on a keep-alive
connection and under load with no worker replaced; tunnels kept or drained with 1001; every
worker confirms the version it applied (/healthz, charon_config_version, `charon reload`), and
one that does not is named and replaced. Real processes on 127.0.0.1; every process stopped by
PID (the fixtures of test_reload.py).
"""

from __future__ import annotations

import http.client
import os
import signal
import statistics
import time

import pytest
from harness import HOST, Backend, Charon, wait_until
from test_reload import (  # noqa: F401  (fixtures)
    HttpLoad,
    WsPool,
    charon_cli,
    config_text,
    frozen,
    get,
    health,
    hosts_toml,
    http_backend,
    make_charon,
    metric,
    metrics,
    reloads,
    rewrite,
    wait_reloads,
    ws_backend,
    ws_pool,
)
from websockets.asyncio.client import connect


def _host(name: str, backend: Backend) -> str:
    return f'[[hosts]]\ndomains = ["{name}"]\nupstream = "{backend.url}"\n\n'


def _ask(conn: http.client.HTTPConnection, host: str) -> tuple[int, bytes]:
    """One request on a kept-alive connection (the same TCP connection every call)."""
    conn.request("GET", "/ok", headers={"Host": host})
    resp = conn.getresponse()
    return resp.status, resp.read()


def _hup(charon: Charon, count: int) -> dict:  # type: ignore[type-arg]
    os.kill(charon.pid, signal.SIGHUP)
    status = wait_reloads(charon, count)
    assert status["last_result"] == "success", status
    return status


@pytest.mark.timeout(120)
def test_routes_added_changed_removed_in_place_on_a_keepalive_connection(
        make_charon, http_backend, ws_backend, backend_factory) -> None:
    other = backend_factory("http_backend.py", "--name", "other")
    base = hosts_toml(http_backend, ws_backend)
    charon = make_charon(base, workers=2)
    pids = sorted(health(charon)["worker_pids"])
    conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
    assert _ask(conn, "new.test")[0] == 404
    sock = conn.sock

    # Added: the next request on the same connection finds it, within 100 ms of SIGHUP on an
    # idle proxy (figures printed; the target is not asserted: this VM's timing is noisy).
    delays = []
    for round_ in range(5):
        rewrite(charon, config_text(charon, base + _host("new.test", http_backend)))
        t_hup = time.monotonic()
        os.kill(charon.pid, signal.SIGHUP)
        while _ask(conn, "new.test")[0] != 200 and time.monotonic() - t_hup < 10:
            pass
        delays.append(time.monotonic() - t_hup)
        wait_reloads(charon, 2 * round_ + 1)
        rewrite(charon, config_text(charon, base))
        _hup(charon, 2 * round_ + 2)
        assert _ask(conn, "new.test")[0] == 404
    print(f"\nSIGHUP to the first request routed by the new config: median "
          f"{statistics.median(delays) * 1000:.1f} ms, max {max(delays) * 1000:.1f} ms")
    assert max(delays) < 10

    # Changed under load: new.test moves to the other backend; then removed.
    rewrite(charon, config_text(charon, base + _host("new.test", http_backend)))
    _hup(charon, 11)
    assert _ask(conn, "new.test")[0] == 200
    with HttpLoad(charon.port, keep=4, new=2, slow=1) as load:
        time.sleep(0.5)
        before = _ask(conn, "new.test")[1]
        rewrite(charon, config_text(charon, base + _host("new.test", other)))
        _hup(charon, 12)
        after = _ask(conn, "new.test")[1]
        rewrite(charon, config_text(charon, base))
        _hup(charon, 13)
        removed = _ask(conn, "new.test")[0]
        time.sleep(0.5)
    assert before.startswith(b"ok "), before
    assert b'"backend": "other"' in after, after
    assert removed == 404
    assert conn.sock is sock, "the keep-alive connection was replaced"
    conn.close()
    assert not load.failed, load.failed[:5]
    assert sorted(health(charon)["worker_pids"]) == pids, "a worker was replaced"
    assert sorted(charon.worker_pids()) == pids, "a process started or stayed behind"
    assert "reloaded in place" in charon.log()


class _NamedPool(WsPool):
    """Echo clients whose Host is `name` (the connection still goes to 127.0.0.1)."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(port)
        self.port = port
        self.base = f"ws://{name}:{port}"

    def _connect(self, path: str = "/echo") -> connect:
        return connect(self.base + path, host=HOST, port=self.port, proxy=None,
                       compression=None, ping_interval=None, open_timeout=20, close_timeout=5,
                       max_queue=None)


@pytest.mark.timeout(90)
def test_tunnels_kept_when_their_host_stays_and_drained_with_1001_when_it_goes(
        make_charon, http_backend, ws_backend, backend_factory, ws_pool) -> None:
    gone_backend = backend_factory("ws_backend.py")
    base = hosts_toml(http_backend, ws_backend)
    server = 'drain_timeout = "1s"'
    charon = make_charon(base + _host("gone.test", gone_backend), workers=2, server=server)
    pids = sorted(health(charon)["worker_pids"])
    kept = ws_pool(charon.port).open(4)
    gone_pool = _NamedPool(charon.port, "gone.test")
    try:
        gone = gone_pool.open(4)
        time.sleep(0.5)
        assert all(c.echoed > 0 for c in kept + gone), [c.describe() for c in kept + gone]
        # The kept host also changes (a new host, a new timeout): its tunnels are kept.
        rewrite(charon, config_text(charon, base + _host("other.test", http_backend),
                                    server=server + '\n[timeouts]\nconnect = "4s"'))
        t_hup = time.monotonic()
        _hup(charon, 1)
        wait_until(lambda: all(c.closed_at is not None for c in gone), 6, interval=0.02,
                   what="the removed host's tunnels to close")
        closes = [c.closed_at - t_hup for c in gone]  # type: ignore[operator]
        print(f"\nremoved host's tunnels closed {min(closes):.2f}-{max(closes):.2f} s after "
              f"SIGHUP (drain_timeout 1s)")
        for c in gone:
            assert c.close_code == 1001, c.describe()
            assert not c.errors, c.describe()
        assert min(closes) >= 0.9, "closed before drain_timeout"
        assert min(c.last_echo_at for c in gone) - t_hup > 0.5, "not served during the drain"
        echoed = [c.echoed for c in kept]
        time.sleep(1.5)
        assert all(c.closed_at is None for c in kept), [c.describe() for c in kept]
        assert all(c.echoed > e for c, e in zip(kept, echoed, strict=True))
    finally:
        gone_pool.close()
    assert sorted(charon.worker_pids()) == pids


@pytest.mark.timeout(120)
def test_every_worker_confirms_and_one_that_does_not_is_named_and_replaced(
        make_charon, http_backend, ws_backend, tmp_path) -> None:
    pidfile = tmp_path / "charon.pid"
    server = f'pidfile = "{pidfile}"'
    hosts = hosts_toml(http_backend, ws_backend)
    charon = make_charon(hosts, workers=2, server=server)
    path = str(charon.config_path)
    pids = health(charon)["reloads"]["workers"]
    assert {w["config_version"] for w in pids.values()} == {1}, pids

    rewrite(charon, config_text(charon, hosts + _host("new.test", http_backend), server=server))
    result = charon_cli("reload", "--config", path)
    assert result.returncode == 0, result
    assert "config version 2" in result.stdout, result
    status = reloads(charon)
    assert status["config_version"] == 2
    assert {k: w["config_version"] for k, w in status["workers"].items()} == {"0": 2, "1": 2}
    assert sorted(w["pid"] for w in status["workers"].values()) == sorted(
        p["pid"] for p in pids.values()), "applied in place: the same workers"
    samples = metrics(charon)
    assert metric(samples, "charon_config_version", worker="0") == 2
    assert metric(samples, "charon_config_version", worker="1") == 2
    assert get(charon.port, host="new.test")[0] == 200

    # Worker 1 stopped: it cannot answer. The reload names it, exits 1, and replaces it.
    stuck = status["workers"]["1"]["pid"]
    rewrite(charon, config_text(charon, hosts, server=server))
    with frozen([stuck]):
        result = charon_cli("reload", "--config", path)
    assert result.returncode == 1, result
    assert f"worker 1 (pid {stuck})" in result.stderr, result
    wait_until(lambda: (charon.health() or {}).get("workers_ready") == 2, 20, interval=0.05,
               what="the replacement worker to serve")
    status = reloads(charon)
    assert status["last_result"] == "incomplete", status
    assert status["workers"]["1"]["pid"] != stuck
    assert status["workers"]["0"]["pid"] == pids["0"]["pid"]
    assert {w["config_version"] for w in status["workers"].values()} == {3}, status
    wait_until(lambda: metric(metrics(charon), "charon_config_version", worker="1") == 3, 10,
               interval=0.1, what="the metric to show the replacement's version")
    assert all(get(charon.port, host="new.test")[0] == 404 for _ in range(6))


@pytest.mark.timeout(90)
def test_a_changed_frame_limit_applies_to_open_tunnels_from_their_next_frame(
        make_charon, http_backend, ws_backend) -> None:
    """websocket_max_frame_size changed by an in-place reload holds for tunnels already open:
    raised, a frame over the old limit passes; lowered, a frame over the new one gets 1009."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as connect_sync

    def hosts(limit: str) -> str:
        return (f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{http_backend.url}"\n\n'
                f'[[hosts.locations]]\npath = "/echo"\nupstream = "{ws_backend.url}"\n'
                f'websocket_max_frame_size = "{limit}"\n\n')

    charon = make_charon(hosts("1KiB"), workers=1)
    pids = charon.worker_pids()
    message = b"m" * 4096
    with connect_sync(f"ws://{HOST}:{charon.port}/echo", compression=None,
                      open_timeout=10, close_timeout=5) as ws:
        ws.send(b"small")
        assert ws.recv(timeout=10) == b"small"
        rewrite(charon, config_text(charon, hosts("64KiB"), workers=1))
        _hup(charon, 1)
        ws.send(message)  # over the limit it opened with
        assert ws.recv(timeout=10) == message
        rewrite(charon, config_text(charon, hosts("2KiB"), workers=1))
        _hup(charon, 2)
        ws.send(message)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1009
    assert charon.worker_pids() == pids


@pytest.mark.timeout(60)
def test_the_live_log_tells_which_worker_applied_which_version(
        make_charon, http_backend, ws_backend) -> None:
    """Each reload's live-log record carries the config version serving after it and the
    version every worker applied."""
    import asyncio

    from test_live_logs import log_stream, session

    base = hosts_toml(http_backend, ws_backend)
    charon = make_charon(base, workers=2)

    async def watch() -> dict:  # type: ignore[type-arg]
        async with session() as s, log_stream(s, charon, kind="reload", backlog="0") as log:
            rewrite(charon, config_text(charon, base + _host("new.test", http_backend)))
            os.kill(charon.pid, signal.SIGHUP)
            records = await log.until(lambda r: r.get("kind") == "reload", timeout=15)
            return records[-1]

    record = asyncio.run(watch())
    assert record["result"] == "success", record
    assert record["version"] == 2, record
    assert record["workers"] == {"0": 2, "1": 2}, record
