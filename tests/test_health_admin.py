"""What the supervisor shows of its targets, without processes: the per-target metric families
from workers' METRICS (running totals, bounded labels, gauges per worker process dropped at its
exit), charon_upstream_healthy from the verdicts (passive mark-downs included, and their end),
the /upstreams table, and the live log's upstream_health records and host filter."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_health_checks import Records

from charon.admin.logs import LogFilter, make_record
from charon.admin.metrics import MetricsSection
from charon.admin.upstreams import UpstreamSection
from charon.config import Config, load_config_text
from charon.events.receiver import EventHub
from charon.events.schema import METRICS, UPSTREAM_HEALTH, WORKER_EXIT
from charon.supervisor.health import HealthMonitor
from charon.worker.telemetry import HTTP_BUCKETS

pytestmark = pytest.mark.timeout(30)

A, B, C = "http://127.0.0.1:3001", "http://127.0.0.1:3002", "http://127.0.0.1:3003"
CONFIG = f"""
[server]
listen = ["127.0.0.1:1"]
[[hosts]]
domains = ["chat.test"]
upstreams = ["{A}", {{ url = "{B}", weight = 2 }}]
[[hosts.locations]]
path = "/api/"
upstreams = ["{C}", "{A}"]
"""


def config() -> Config:
    return load_config_text(CONFIG, "<test>")


def samples(section: UpstreamSection) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    metrics = MetricsSection([], lambda: 1)
    text = metrics.render(extra=[section.collector()]).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("charon_upstream_") and "errors" not in s.name:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metrics_event(deltas: dict[str, Any], gauges: dict[str, Any]) -> list[Any]:
    return [METRICS, deltas, gauges]


def test_families_totals_labels_and_gauges() -> None:
    async def scenario() -> None:
        monitor = HealthMonitor(EventHub())
        monitor.configure(config())
        clock = [100.0]
        section = UpstreamSection(monitor, config(), clock=lambda: clock[0])
        buckets = [0] * (len(HTTP_BUCKETS) + 1)
        buckets[2] = 3
        section.on_batch(0, 11, [metrics_event(
            {"upstream_requests": [["chat.test", A, 200, 3], ["chat.test", B, 502, 1],
                                   ["chat.test", "http://elsewhere:1", 200, 5],
                                   ["nobody.test", A, 200, 7]],
             "upstream_durations": [["chat.test", A, buckets, 0.06]]},
            {"upstream_tunnels": [["chat.test", C, 2]]})])
        section.on_batch(1, 12, [metrics_event(
            {"upstream_requests": [["chat.test", A, 200, 1]]},
            {"upstream_tunnels": [["chat.test", C, 1], ["chat.test", A, 4]]})])
        s = samples(section)

        def get(name: str, **labels: str) -> float | None:
            return s.get((name, tuple(sorted(labels.items()))))

        assert get("charon_upstream_requests_total", host="chat.test", target=A, code="200") == 4
        assert get("charon_upstream_requests_total", host="chat.test", target=B, code="502") == 1
        # an unknown target and an unknown host are folded, never a new series
        assert get("charon_upstream_requests_total", host="chat.test", target="other",
                   code="200") == 5
        assert get("charon_upstream_requests_total", host="_other", target="other",
                   code="200") == 7
        assert get("charon_upstream_response_seconds_bucket", host="chat.test", target=A,
                   le="0.025") == 3
        assert get("charon_upstream_response_seconds_count", host="chat.test", target=A) == 3
        assert get("charon_upstream_tunnels_open", host="chat.test", target=C) == 3
        assert get("charon_upstream_tunnels_open", host="chat.test", target=A) == 4
        # every configured target has a health series, up until told otherwise
        for url in (A, B, C):
            assert get("charon_upstream_healthy", host="chat.test", target=url) == 1

        # A worker's exit takes its gauges away, its counts stay.
        section.on_batch(-1, 1, [[WORKER_EXIT, 0.0, 1, 12, "signal SIGKILL", 0.0]])
        s = samples(section)
        assert get("charon_upstream_tunnels_open", host="chat.test", target=C) == 2
        assert get("charon_upstream_tunnels_open", host="chat.test", target=A) is None
        assert get("charon_upstream_requests_total", host="chat.test", target=A, code="200") == 4
        # A worker silent for long has its gauges dropped too.
        clock[0] += 10
        s = samples(section)
        assert get("charon_upstream_tunnels_open", host="chat.test", target=C) is None

        # A URL in the host's group and a location's is down if either group holds it down.
        monitor.passive_down(("chat.test/api/", A), 30.0, worker_id=1)
        s = samples(section)
        assert get("charon_upstream_healthy", host="chat.test", target=A) == 0
        table = section.table()
        [host] = table["hosts"]
        own, api = host["backends"]
        assert own["name"] == "chat.test" and api["name"] == "chat.test/api/"
        assert [t["target"] for t in own["targets"]] == [A, B]
        assert own["targets"][1]["weight"] == 2
        assert own["targets"][0]["state"] == "up" and own["targets"][0]["requests"] == 4
        assert api["targets"][1]["state"] == "passive_down"
        assert "passive checks of worker 1" in api["targets"][1]["reason"]
        await monitor.stop()

    asyncio.run(scenario())


def test_passive_mark_down_is_told_once_and_its_end_recorded() -> None:
    async def scenario() -> None:
        hub = EventHub()
        records = Records()
        hub.add_sink(records)
        monitor = HealthMonitor(hub)
        monitor.configure(config())
        key = ("chat.test", A)
        told: list[Any] = []
        monitor.store.watch(lambda k, verdict: told.append((k, verdict.down_until)))
        monitor.passive_down(key, 0.3, worker_id=0)
        monitor.passive_down(key, 0.3, worker_id=1)  # the same mark-down from another worker
        assert len(told) == 1 and not monitor.healthy(key)
        await asyncio.sleep(0.5)
        assert monitor.healthy(key)
        assert [(r[3], r[4]) for r in records.items] == [(A, False), (A, True)]
        assert records.items[1][5] == "passive mark-down over (fail_timeout)"
        await monitor.stop()

    asyncio.run(scenario())


def test_live_log_records_and_host_filter() -> None:
    event = [UPSTREAM_HEALTH, 1.0, "chat.test/api/", A, False, "2 checks failed: status 503"]
    record = make_record(-1, event)
    assert record == {"kind": "upstream_health", "time": 1.0, "host": "chat.test/api/",
                      "target": A, "healthy": False, "reason": "2 checks failed: status 503",
                      "worker": -1}
    assert LogFilter.from_query({"host": "chat.test"}).matches(record)
    assert LogFilter.from_query({"kind": "upstream_health"}).matches(record)
    assert not LogFilter.from_query({"host": "chat"}).matches(record)
    assert not LogFilter.from_query({"host": "chat.test", "status": "5xx"}).matches(record)
    own = dataclasses.replace(LogFilter(), host="chat.test")
    assert own.matches({**record, "host": "chat.test"})
