"""Active health checks (charon/supervisor/health/) against real backend processes on 127.0.0.1:
probes (HTTP status rules, a hung backend, a refused connection, WebSocket handshakes good and
bad, https verified with a CA and refused without it), thresholds both ways, and what a reload
keeps. The monitor runs in the test's own event loop with a real EventHub; the backends are
processes stopped by PID."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import HOST, Backend, free_port
from tlsca import TestCA

from charon.config import Config, load_config_text
from charon.config.model import Backends, HealthCheck, Target, Upstream
from charon.events.receiver import EventHub
from charon.events.schema import UPSTREAM_HEALTH
from charon.supervisor.health import HealthMonitor, configured_targets
from charon.supervisor.health.probe import probe

pytestmark = pytest.mark.timeout(60)

FAST = HealthCheck(path="/healthz", interval=0.1, timeout=0.3, healthy_threshold=2,
                   unhealthy_threshold=2)


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend("health_backend.py")
    yield b
    b.stop()


def set_mode(backend: Backend, mode: str) -> None:
    with urllib.request.urlopen(f"http://{HOST}:{backend.port}/_mode/{mode}", timeout=5):
        pass


def hits(backend: Backend) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{backend.port}/_hits", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def upstream(port: int, scheme: str = "http", **tls: Any) -> Upstream:
    return Upstream(f"{scheme}://{HOST}:{port}", HOST, port, tls=scheme == "https", **tls)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- probes --------------------------------------------------------------------------------------


def test_http_probe_status_rules_and_host(backend: Backend) -> None:
    target = upstream(backend.port)
    ok = run(probe(target, FAST, "app.test"))
    assert ok.ok and ok.reason == "200"
    seen = hits(backend)
    assert seen["hosts"][-1] == "app.test"
    assert seen["agents"][-1] == "charon-health-check"
    set_mode(backend, "status:302")
    assert run(probe(target, FAST, "app.test")).ok  # any 2xx/3xx by default
    assert not run(probe(target, dataclasses.replace(FAST, expect_status=(200,)), "x")).ok
    set_mode(backend, "status:503")
    failed = run(probe(target, FAST, "app.test"))
    assert not failed.ok and failed.reason == "status 503"
    assert run(probe(target, dataclasses.replace(FAST, expect_status=(503,)), "x")).ok


def test_hung_and_refused_probes_fail_within_the_timeout(backend: Backend) -> None:
    set_mode(backend, "hang")
    hung = run(probe(upstream(backend.port), FAST, "app.test"))
    assert not hung.ok and "no answer within 0.3s" in hung.reason
    refused = run(probe(upstream(free_port()), FAST, "app.test"))
    assert not refused.ok and refused.reason.startswith("connect:")


def test_websocket_probe(backend: Backend) -> None:
    check = dataclasses.replace(FAST, websocket=True)
    target = upstream(backend.port)
    good = run(probe(target, check, "app.test"))
    assert good.ok and good.reason == "101", good
    assert hits(backend)["websocket"] == 1
    set_mode(backend, "bad-accept")
    bad = run(probe(target, check, "app.test"))
    assert not bad.ok and "Sec-WebSocket-Accept" in bad.reason
    set_mode(backend, "status:200")  # a plain answer is no handshake
    plain = run(probe(target, check, "app.test"))
    assert not plain.ok and plain.reason == "status 200, not 101"


def test_https_probe_verifies_with_tls_ca(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    leaf = ca.issue([HOST])
    backend = Backend("health_backend.py", "--cert", str(leaf.cert_path),
                      "--key", str(leaf.key_path))
    try:
        verified = upstream(backend.port, "https", tls_ca=str(ca.cert_path))
        assert run(probe(verified, FAST, "app.test")).ok
        strange = run(probe(upstream(backend.port, "https"), FAST, "app.test"))
        assert not strange.ok and strange.reason.startswith("tls:"), strange
        unverified = upstream(backend.port, "https", tls_verify=False)
        assert run(probe(unverified, FAST, "app.test")).ok
    finally:
        backend.stop()


# -- the monitor ---------------------------------------------------------------------------------


class Records:
    """A sink of the hub keeping the upstream_health records."""

    def __init__(self) -> None:
        self.items: list[list[Any]] = []

    def on_batch(self, worker_id: int, pid: int, batch: list[list[Any]]) -> None:
        self.items += [e for e in batch if e and e[0] == UPSTREAM_HEALTH]

    def on_records(self, worker_id: int, pid: int, count: int, packed: bytes) -> None:
        pass


def config_with(targets: list[Upstream], check: HealthCheck | None, name: str = "app.test"
                ) -> Config:
    base = load_config_text(
        f'[server]\nlisten = ["{HOST}:1"]\n[[hosts]]\ndomains = ["{name}"]\n'
        f'upstream = "{targets[0].url}"\n', "<test>")
    backends = Backends(name, tuple(Target(u) for u in targets), health_check=check)
    host = dataclasses.replace(base.hosts[0], backends=backends)
    return dataclasses.replace(base, hosts=(host,))


async def until(predicate: Any, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_hung_backend_marked_down_then_up_after_healthy_threshold(backend: Backend) -> None:
    target = upstream(backend.port)
    key = ("app.test", target.url)

    async def scenario() -> None:
        hub = EventHub()
        records = Records()
        hub.add_sink(records)
        monitor = HealthMonitor(hub)
        monitor.configure(config_with([target], FAST))
        try:
            await until(lambda: monitor.checkers[key].passes >= 2, what="checks passing")
            assert monitor.healthy(key) and not records.items
            await asyncio.to_thread(set_mode, backend, "hang")
            await until(lambda: not monitor.healthy(key), what="the hung target down")
            checker = monitor.checkers[key]
            assert checker.failures == 2 and "no answer within" in (checker.last.reason or "")
            [down] = records.items
            assert down[2:5] == ["app.test", target.url, False]
            assert "2 checks failed: no answer within 0.3s" in down[5]

            await asyncio.to_thread(set_mode, backend, "ok")
            await until(lambda: checker.passes == 1, what="a first pass")
            assert not monitor.healthy(key)  # one pass is not healthy_threshold
            await until(lambda: monitor.healthy(key), what="the target back up")
            assert checker.passes == 2
            assert [r[4] for r in records.items] == [False, True]
            assert "2 checks passed" in records.items[1][5]
        finally:
            await monitor.stop()
        assert all(c.task is None or c.task.done() for c in monitor.checkers.values())

    run(scenario())


def test_reload_keeps_changes_and_stops_checks(backend: Backend) -> None:
    kept = upstream(backend.port)
    other = Backend("health_backend.py", "--mode", "hang")
    dropped = upstream(other.port)
    keys = {u.url: ("app.test", u.url) for u in (kept, dropped)}

    async def scenario() -> None:
        monitor = HealthMonitor(EventHub())
        monitor.configure(config_with([kept, dropped], FAST))
        try:
            await until(lambda: not monitor.healthy(keys[dropped.url]), what="the hung one down")
            await until(lambda: monitor.checkers[keys[kept.url]].passes >= 2, what="passes")
            task = monitor.checkers[keys[kept.url]].task
            # The same check on the kept target: its task and state stay.
            monitor.configure(config_with([kept], FAST))
            assert monitor.checkers[keys[kept.url]].task is task
            assert keys[dropped.url] not in monitor.checkers
            assert monitor.store.get(keys[dropped.url]) is None  # forgotten, told as up first
            # A changed check: a new task, the same counts and verdict.
            passes = monitor.checkers[keys[kept.url]].passes
            slower = dataclasses.replace(FAST, interval=0.2)
            monitor.configure(config_with([kept], slower))
            checker = monitor.checkers[keys[kept.url]]
            assert checker.task is not task and checker.passes >= passes
            await asyncio.sleep(0)
            assert task is not None and task.cancelled()
            # No check any more: no task.
            monitor.configure(config_with([kept], None))
            assert not monitor.checkers
        finally:
            await monitor.stop()

    try:
        run(scenario())
    finally:
        other.stop()


def test_one_check_per_target_whatever_the_groups() -> None:
    """The host's and a location's groups are separate keys; the Host header defaults to the
    first domain (a wildcard's parent name)."""
    base = config_with([upstream(1)], FAST, name="*.chat.test")
    targets = configured_targets(base)
    [(key, target)] = targets.items()
    assert key == ("*.chat.test", "http://127.0.0.1:1")
    assert target.probe_host == "chat.test" and target.host == "*.chat.test"
    named = config_with([upstream(1)], dataclasses.replace(FAST, host="health.internal"))
    assert [t.probe_host for t in configured_targets(named).values()] == ["health.internal"]


def test_probes_are_capped(backend: Backend) -> None:
    """Many targets checked at once wait for a slot instead of all connecting together."""
    set_mode(backend, "hang")

    async def scenario() -> None:
        monitor = HealthMonitor(EventHub())
        monitor._slots = asyncio.Semaphore(2)
        config = config_with([upstream(backend.port)],
                             dataclasses.replace(FAST, timeout=0.2, interval=0.05))
        # One backend process behind six groups: each (group, url) is its own check.
        hosts = tuple(
            dataclasses.replace(config.hosts[0], domains=(f"h{i}.test",),
                                backends=dataclasses.replace(config.hosts[0].backends,
                                                             name=f"h{i}.test"))
            for i in range(6))
        monitor.configure(dataclasses.replace(config, hosts=hosts))
        try:
            await until(lambda: sum(c.failures for c in monitor.checkers.values()) >= 8,
                        what="hung probes timing out")
        finally:
            await monitor.stop()

    run(scenario())
    assert hits(backend)["most_open"] <= 2 + 1  # two probes, and one of our /_mode calls
