# ruff: noqa: F811  (the fixtures imported from test_reload are redefined as arguments)
"""50 in-place reloads (SIGHUP) 0.2 s apart under load: keep-alive, connection-per-request and
slow HTTP clients, 200 long-lived echoing WebSockets and a churn of short ones. No request
fails, no WebSocket closes, every message is echoed in order, and the same workers serve
throughout. Real processes on 127.0.0.1; every process stopped by PID (test_reload's fixtures).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
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
