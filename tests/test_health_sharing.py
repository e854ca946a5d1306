"""Active health checks run by a real supervisor (`charon run`) and shared with its workers:
one check per target whatever the worker count (the backend counts them), a hung target marked
down and back up after healthy_threshold, the verdict acknowledged by every worker well under a
second after the change, a respawned worker given the current verdicts, the WebSocket check, a
reload that keeps a target's state, and what shows: /upstreams, charon_upstream_healthy, the
live log and `charon logs`. Backends and Charon are processes on 127.0.0.1 stopped by PID."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import HOST, REPO, Backend, Charon, free_port, kill_pid, wait_until
from test_metrics import scrape, value, wait_replaced
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.timeout(90)

APP = "app.test"
CHECK = ('health_check = { path = "/healthz", interval = "250ms", timeout = "200ms", '
         "healthy_threshold = 2, unhealthy_threshold = 2 }\n")


def host_toml(*urls: str, extra: str = CHECK, name: str = APP) -> str:
    targets = ", ".join(f'"{u}"' for u in urls)
    return f'[[hosts]]\ndomains = ["{name}"]\nupstreams = [{targets}]\n{extra}'


def set_mode(backend: Backend, mode: str) -> None:
    with urllib.request.urlopen(f"http://{HOST}:{backend.port}/_mode/{mode}", timeout=5):
        pass


def backend_hits(backend: Backend) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{backend.port}/_hits", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def upstreams(charon: Charon) -> dict[str, Any]:
    url = f"http://{HOST}:{charon.admin_port}/upstreams"
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def target_state(charon: Charon, url: str, group: str = APP) -> dict[str, Any]:
    for host in upstreams(charon)["hosts"]:
        for backends in host["backends"]:
            if backends["name"] == group:
                for target in backends["targets"]:
                    if target["target"] == url:
                        return target  # type: ignore[no-any-return]
    raise AssertionError(f"no target {url} in {group}")


def in_step(charon: Charon, workers: int) -> bool:
    """Every worker has acknowledged the last verdict message."""
    sharing = upstreams(charon)["sharing"]
    told = sharing["workers"]
    return len(told) == workers and all(w["applied"] == sharing["seq"] for w in told)


def health_records(charon: Charon, want: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The live log's upstream_health records (backlog first), once there are `want`."""
    records: list[dict[str, Any]] = []
    url = f"ws://{HOST}:{charon.admin_port}/logs?kind=upstream_health&backlog=100"
    with ws_connect(url, open_timeout=5) as ws:
        deadline = time.monotonic() + timeout
        while len(records) < want and time.monotonic() < deadline:
            try:
                records.append(json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0))))
            except TimeoutError:
                break
    return records


@pytest.fixture
def backends() -> Iterator[tuple[Backend, Backend]]:
    a, b = Backend("health_backend.py"), Backend("health_backend.py")
    yield a, b
    a.stop()
    b.stop()


def test_one_check_per_target_verdicts_shared_quickly(
    tmp_path: Path, backends: tuple[Backend, Backend]
) -> None:
    a, b = backends
    charon = Charon(tmp_path, host_toml(a.url, b.url), workers=2)
    try:
        charon.start()
        wait_until(lambda: (target_state(charon, a.url).get("check") or {}).get("probes", 0) >= 5,
                   10, what="five checks of a")
        # Checked once per interval for both workers: what the backend saw is what the
        # supervisor sent (give or take the probe in flight), not twice that.
        before = target_state(charon, a.url)["check"]["probes"]
        seen = backend_hits(a)
        after = target_state(charon, a.url)["check"]["probes"]
        assert before <= seen["requests"] <= after + 1, (before, seen["requests"], after)
        assert set(seen["hosts"]) == {APP} and set(seen["agents"]) == {"charon-health-check"}
        assert in_step(charon, 2)

        set_mode(a, "hang")
        wait_until(lambda: target_state(charon, a.url)["state"] == "down", 10,
                   what="the hung target down")
        down = target_state(charon, a.url)
        assert not down["healthy"] and "2 checks failed: no answer within 0.2s" in down["reason"]
        assert target_state(charon, b.url)["healthy"]
        # The change reached both workers: acknowledged, and how fast.
        wait_until(lambda: in_step(charon, 2), 5, what="both workers to apply the verdict")
        sharing = upstreams(charon)["sharing"]
        assert sharing["changes"] >= 1
        print(f"verdict reached both workers in {sharing['last_seconds'] * 1000:.2f} ms")
        assert sharing["max_seconds"] < 1.0  # issue 13: "well under a second"
        samples = scrape(charon)
        assert value(samples, "charon_upstream_healthy", host=APP, target=a.url) == 0
        assert value(samples, "charon_upstream_healthy", host=APP, target=b.url) == 1

        set_mode(a, "ok")
        wait_until(lambda: target_state(charon, a.url)["healthy"], 10, what="a back up")
        up = target_state(charon, a.url)
        assert up["check"]["passes"] >= 2 and "2 checks passed" in up["reason"]
        wait_until(lambda: in_step(charon, 2), 5, what="both workers to apply it")
        assert value(scrape(charon), "charon_upstream_healthy", host=APP, target=a.url) == 1

        records = health_records(charon, 2)
        assert [(r["host"], r["target"], r["healthy"]) for r in records] == [
            (APP, a.url, False), (APP, a.url, True)]
        assert records[0]["worker"] == -1 and "checks failed" in records[0]["reason"]
        # The same in `charon logs`.
        lines = charon_logs(charon)
        assert any(f"target down {a.url}: 2 checks failed" in line for line in lines), lines
        assert any(f"target up {a.url}" in line for line in lines), lines
    finally:
        charon.stop()


def charon_logs(charon: Charon) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "charon", "logs", "--admin", f"{HOST}:{charon.admin_port}",
         "--kind", "upstream_health", "--backlog", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while len(lines) < 2:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    finally:
        proc.terminate()
        proc.wait(10)
    return lines


def test_respawned_worker_gets_current_verdicts(
    tmp_path: Path, backends: tuple[Backend, Backend]
) -> None:
    a, b = backends
    set_mode(a, "hang")
    charon = Charon(tmp_path, host_toml(a.url, b.url), workers=2)
    try:
        charon.start()
        wait_until(lambda: target_state(charon, a.url)["state"] == "down", 10, what="a down")
        wait_until(lambda: in_step(charon, 2), 5, what="both workers in step")
        old = charon.worker_pids()
        kill_pid(old[0])
        wait_replaced(charon, old[0], 2)
        # The new worker was sent every verdict at spawn and acknowledged them.
        wait_until(lambda: in_step(charon, 2), 5, what="the new worker in step")
        sharing = upstreams(charon)["sharing"]
        pids = {w["pid"] for w in sharing["workers"]}
        assert old[0] not in pids and len(pids - set(old)) == 1
        assert target_state(charon, a.url)["state"] == "down"  # the supervisor kept it
        # Checks stop with the supervisor.
        assert charon.stop() == 0
        stopped = backend_hits(b)["requests"]
        time.sleep(0.6)  # more than two intervals
        assert backend_hits(b)["requests"] == stopped
    finally:
        charon.stop()


def test_websocket_check_and_reload_keeps_state(tmp_path: Path) -> None:
    ws = Backend("ws_backend.py")
    plain = Backend("health_backend.py", "--mode", "status:200")  # answers, never a 101
    check = ('health_check = { path = "/echo", interval = "200ms", timeout = "200ms", '
             "healthy_threshold = 1, unhealthy_threshold = 2, websocket = true }\n")
    charon = Charon(tmp_path, host_toml(ws.url, plain.url, extra=check), workers=1)
    try:
        charon.start()
        wait_until(lambda: target_state(charon, plain.url)["state"] == "down", 10,
                   what="the target that answers no 101 down")
        assert "status 200, not 101" in target_state(charon, plain.url)["reason"]
        wait_until(lambda: target_state(charon, ws.url)["check"]["probes"] >= 2, 10,
                   what="WebSocket checks")
        assert target_state(charon, ws.url)["healthy"]
        assert target_state(charon, ws.url)["check"]["last"] == "101"
        since = target_state(charon, plain.url)["since"]

        # A reload in place that keeps both targets (a slower interval): states kept.
        slower = check.replace('"200ms"', '"300ms"')
        charon.config_path.write_text(
            charon.config_path.read_text().replace(check, slower))
        reload_and_wait(charon, 1)
        kept = target_state(charon, plain.url)
        assert kept["state"] == "down" and kept["since"] == since
        assert len(health_records(charon, 1, timeout=1.0)) == 1  # no new record

        # A reload that removes it: gone from /upstreams, told as up first (workers forget).
        charon.config_path.write_text(
            charon.config_path.read_text().replace(f', "{plain.url}"', ""))
        reload_and_wait(charon, 2)
        names = [t["target"] for t in upstreams(charon)["hosts"][0]["backends"][0]["targets"]]
        assert names == [ws.url]
        records = health_records(charon, 2)
        assert records[-1]["target"] == plain.url and records[-1]["healthy"]
        assert records[-1]["reason"] == "removed from the config"
    finally:
        charon.stop()
        ws.stop()
        plain.stop()


def reload_and_wait(charon: Charon, count: int) -> None:
    assert charon.proc is not None
    charon.proc.send_signal(1)  # SIGHUP
    wait_until(lambda: ((charon.health() or {}).get("reloads") or {}).get("count") == count, 15,
               what="the reload")
    assert (charon.health() or {})["reloads"]["last_result"] == "success"


# -- with the worker runtime: what the verdicts change for requests --------------------------------


def get(port: int, host: str = APP) -> tuple[int, dict[str, str], bytes]:
    """One GET on a fresh connection (so the listening socket picks the worker)."""
    import http.client

    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host, "User-Agent": "client"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_verdicts_steer_requests_and_all_down_is_503(
    tmp_path: Path, backends: tuple[Backend, Backend]
) -> None:
    """A respawned worker sends nothing to the target the supervisor holds down (it had the
    verdict before its first request); with every target down, each worker answers 503 with
    Retry-After at once."""
    a, b = backends
    set_mode(a, "hang")
    timeouts = '[timeouts]\nfirst_byte = "2s"\n'
    charon = Charon(tmp_path, host_toml(a.url, b.url, extra=CHECK + "max_fails = 0\n"),
                    workers=2, extra_toml=timeouts)
    try:
        charon.start()
        wait_until(lambda: target_state(charon, a.url)["state"] == "down", 10, what="a down")
        old = charon.worker_pids()
        kill_pid(old[0])
        wait_replaced(charon, old[0], 2)
        for _ in range(20):
            status, _, body = get(charon.port)
            assert (status, body) == (200, b"ok")
        assert backend_hits(a)["by_agent"].get("client", 0) == 0
        assert backend_hits(b)["by_agent"]["client"] == 20

        set_mode(b, "hang")
        wait_until(lambda: target_state(charon, b.url)["state"] == "down", 10, what="b down")
        wait_until(lambda: in_step(charon, 2), 5, what="both workers in step")
        for _ in range(10):
            status, headers, _ = get(charon.port)
            assert status == 503 and int(headers["Retry-After"]) >= 1, (status, headers)
        assert backend_hits(b)["by_agent"]["client"] == 20
    finally:
        charon.stop()


def test_passive_mark_down_reaches_every_worker(tmp_path: Path) -> None:
    """One worker's passive checks mark a dead target down; the supervisor tells the other
    worker, which never tries it (its attempts stay as they were); the live log says which
    worker marked it."""
    b = Backend("health_backend.py")
    dead = f"http://{HOST}:{free_port()}"
    passive = 'max_fails = 1\nfail_timeout = "60s"\n'
    charon = Charon(tmp_path, host_toml(dead, b.url, extra=passive), workers=2)
    try:
        charon.start()
        while target_state(charon, dead)["state"] != "passive_down":
            status, _, _ = get(charon.port)  # a connect failure is retried on b
            assert status == 200
        wait_until(lambda: in_step(charon, 2), 5, what="both workers told")
        state = target_state(charon, dead)
        assert not state["healthy"] and state["source"] == "passive"
        assert "passive checks of worker" in state["reason"]
        [record] = health_records(charon, 1)
        assert record["target"] == dead and not record["healthy"]

        def attempts(target: str) -> float:
            samples = scrape(charon)
            return sum(v for (name, labels), v in samples.items()
                       if name == "charon_upstream_requests_total"
                       and ("target", target) in labels)

        # Every worker reports its counts once a second: wait for the failures made so far.
        wait_until(lambda: attempts(dead) >= 1 and attempts(b.url) >= 1, 5, what="counts")
        time.sleep(1.5)
        failed, served = attempts(dead), attempts(b.url)
        assert failed == 1  # the first failure marked it down everywhere
        for _ in range(20):
            assert get(charon.port)[0] == 200
        wait_until(lambda: attempts(b.url) >= served + 20, 5, what="the 20 requests counted")
        assert attempts(dead) == failed
        assert value(scrape(charon), "charon_upstream_healthy", host=APP, target=dead) == 0
    finally:
        charon.stop()
        b.stop()
