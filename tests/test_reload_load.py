# ruff: noqa: F811  (the fixtures imported from test_reload are redefined as arguments)
"""50 in-place reloads (SIGHUP) 0.2 s apart under load: keep-alive, connection-per-request and
slow HTTP clients, 200 long-lived echoing WebSockets and a churn of short ones. No request
fails, no WebSocket closes, every message is echoed in order, and the same workers serve
throughout. Real processes on 127.0.0.1; every process stopped by PID (test_reload's fixtures).
"""

from __future__ import annotations

import http.client
import os
import signal
import time

import pytest
from harness import HOST
from test_reload import (  # noqa: F401  (fixtures)
    HttpLoad,
    config_text,
    get,
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

RELOADS = 50
WEBSOCKETS = 200


@pytest.mark.timeout(120)
def test_fifty_in_place_reloads_under_load_drop_nothing(make_charon, http_backend, ws_backend,
                                                        ws_pool) -> None:
    hosts = hosts_toml(http_backend, ws_backend)
    charon = make_charon(hosts, workers=2)
    pids = sorted(health(charon)["worker_pids"])
    pool = ws_pool(charon.port)
    long_lived = pool.open(WEBSOCKETS)
    before = reloads(charon)["count"]
    # Every other config adds a host: each SIGHUP changes the routes of both workers.
    extra = f'[[hosts]]\ndomains = ["extra.test"]\nupstream = "{http_backend.url}"\n\n'
    texts = [config_text(charon, hosts), config_text(charon, hosts + extra)]

    with HttpLoad(charon.port, keep=8, new=4, slow=2) as load:
        pool.start_churn(2)
        time.sleep(0.5)
        t_first = time.monotonic()
        for i in range(RELOADS):
            rewrite(charon, texts[(i + 1) % 2])
            os.kill(charon.pid, signal.SIGHUP)
            time.sleep(0.2)
        status = wait_reloads(charon, before + RELOADS, timeout=30)
        t_reloaded = time.monotonic()
        time.sleep(0.5)
        pool.stop_churn()
    pool.finish(long_lived)

    failed = load.failed
    messages = sum(c.sent for c in long_lived)
    echoed = sum(c.echoed for c in long_lived)
    closed_early = [c for c in long_lived if c.closed_at is not None]
    disordered = [c for c in long_lived if c.errors]
    summary = (
        f"{RELOADS} reloads in {t_reloaded - t_first:.1f} s; {len(load.outcomes)} HTTP requests, "
        f"{len(failed)} failed; {len(long_lived)} WebSockets: {messages} messages sent, "
        f"{echoed} echoed, {len(closed_early)} closed early; {pool.churn_done} short WebSockets, "
        f"{len(pool.churn_errors)} failed"
    )
    print("\n" + summary)
    assert status["count"] == before + RELOADS, status
    assert status["last_result"] == "success", status
    assert {w["config_version"] for w in status["workers"].values()} == {status["config_version"]}
    assert sorted(health(charon)["worker_pids"]) == pids, "applied in place: the same workers"
    assert len(load.outcomes) > 500, f"the HTTP load did not run: {summary}"
    assert not failed, f"{sorted({o.error for o in failed})[:5]}; {summary}"
    assert not closed_early, f"{[c.describe() for c in closed_early[:5]]}; {summary}"
    assert not disordered, f"echoes out of order: {[c.describe() for c in disordered[:5]]}"
    assert messages > WEBSOCKETS * 10, f"the WebSocket load did not run: {summary}"
    assert echoed == messages, f"{messages - echoed} messages not echoed; {summary}"
    assert pool.churn_done > 20, summary
    assert not pool.churn_errors, f"short WebSockets failed: {pool.churn_errors[:5]}; {summary}"
    # The last config (RELOADS even: the one without the extra host) is the one served.
    assert get(charon.port, host="extra.test")[0] == 404


@pytest.mark.timeout(60)
def test_handshake_in_flight_opens_on_its_old_route_and_drains_if_its_host_went(
        make_charon, http_backend, ws_backend, ws_pool) -> None:
    """A handshake whose backend answers after an in-place reload opens on the route it was
    planned with; its tunnel is then matched against the new config like the open ones: kept
    while its host stays, closed with 1001 after drain_timeout once its host is gone."""
    server = "drain_timeout = 1.0"
    hosts = hosts_toml(http_backend, ws_backend, slow_ws=ws_backend)  # 127.0.0.1's routes
    other = f'[[hosts]]\ndomains = ["other.test"]\nupstream = "{http_backend.url}"\n\n'
    charon = make_charon(hosts, workers=1, server=server)
    pool = ws_pool(charon.port)
    before = reloads(charon)["count"]
    slow = "/slow-echo?delay=1.5"  # the backend's 101 comes 1.5 s after the request

    # The host stays: the tunnel that opens after the reload is kept past drain_timeout.
    kept_later = pool.open_later(1, slow)
    time.sleep(0.5)
    rewrite(charon, config_text(charon, hosts + other, workers=1, server=server))
    os.kill(charon.pid, signal.SIGHUP)
    assert wait_reloads(charon, before + 1)["last_result"] == "success"
    [kept] = kept_later.result(20)
    time.sleep(2.0)
    assert kept.closed_at is None, kept.describe()
    assert kept.echoed > 0 and not kept.errors, kept.describe()

    # The host goes: the tunnel opened after the reload is drained like the kept one now is.
    gone_later = pool.open_later(1, slow)
    time.sleep(0.5)
    rewrite(charon, config_text(charon, other, workers=1, server=server))
    t_hup = time.monotonic()
    os.kill(charon.pid, signal.SIGHUP)
    assert wait_reloads(charon, before + 2)["last_result"] == "success"
    [gone] = gone_later.result(20)
    t_open = time.monotonic()
    deadline = time.monotonic() + 10
    while (gone.closed_at is None or kept.closed_at is None) and time.monotonic() < deadline:
        time.sleep(0.05)
    for c in (kept, gone):
        assert c.close_code == 1001, c.describe()
        assert c.echoed > 0 and not c.errors, c.describe()
    assert kept.closed_at is not None and kept.closed_at - t_hup >= 0.9
    assert gone.closed_at is not None and gone.closed_at - t_open >= 0.8, "not drain_timeout"
    pool.finish([kept, gone])


@pytest.mark.timeout(60)
def test_kept_alive_connection_takes_new_header_limits_at_its_next_request(
        make_charon, http_backend, ws_backend) -> None:
    """The header-size limits a client connection copies for its header fields are taken again
    by its first request head after a reload in place changed them."""
    hosts = hosts_toml(http_backend, ws_backend)

    def limits(max_header_bytes: int) -> str:
        return f"\n[server.limits]\nmax_header_bytes = {max_header_bytes}\n"

    charon = make_charon(hosts, workers=1, server=limits(8192))
    before = reloads(charon)["count"]
    conn = http.client.HTTPConnection(HOST, charon.port, timeout=10)
    big = {"X-Big": "a" * 3000}

    def ask() -> int:
        conn.request("GET", "/ok", headers=big)
        resp = conn.getresponse()
        resp.read()
        return resp.status

    assert ask() == 200
    sock = conn.sock
    rewrite(charon, config_text(charon, hosts, workers=1, server=limits(2048)))
    os.kill(charon.pid, signal.SIGHUP)
    assert wait_reloads(charon, before + 1)["last_result"] == "success"
    assert conn.sock is sock, "the same connection, kept alive"
    assert ask() == 431
    conn.close()
