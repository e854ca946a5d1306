"""Targets on the admin listener (issue 13): per-target metrics, `/upstreams`, the page's table.

- An event sink for the per-target parts of the workers' METRICS (worker/telemetry.py):
  deltas `upstream_requests` [[host, target, code, n]] and `upstream_durations`
  [[host, target, bucket counts, seconds]], gauges `upstream_tunnels` [[host, target, open]].
  Counters are running totals (a replaced worker's never go back); gauges are each process's
  latest, dropped at its exit or after GAUGE_TTL without a report (as admin/metrics.py does).
- Prometheus (added to /metrics): `charon_upstream_requests_total{host,target,code}`,
  `charon_upstream_response_seconds{host,target}`, `charon_upstream_tunnels_open{host,target}`,
  and `charon_upstream_healthy{host,target}` (1/0) from the supervisor's verdicts
  (supervisor/health/). Label values are bounded: `host` is a configured proxy host or
  `_other`, `target` one of that host's configured target URLs or `other`.
- `/upstreams`: JSON, per proxy host and per Backends (the host's own, each location's), every
  target with its settings, health state, why, since when, its check's counts, its requests
  and open tunnels; and `sharing`: the last verdict message sent (`seq`), the last each worker
  applied, and how long changes took to reach every worker (`last_seconds`, `max_seconds`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from charon.admin.metrics import (
    EXIT_PID,
    GAUGE_TTL,
    METRICS_DELTAS,
    METRICS_GAUGES,
    OTHER,
    OTHER_HOST,
    status_label,
)
from charon.config.model import Backends, Config, ProxyHost
from charon.events.schema import METRICS, UPSTREAM_HEALTH, WORKER_EXIT
from charon.supervisor.health import HealthMonitor
from charon.worker.telemetry import HTTP_BUCKETS

Pair = tuple[str, str]  # (host label, target label)


class UpstreamSection:
    def __init__(
        self, monitor: HealthMonitor, config: Config, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.monitor = monitor
        self.clock = clock
        self.config = config
        self.known: dict[str, frozenset[str]] = {}  # host -> its targets' URLs (label values)
        self.requests: dict[tuple[str, str, str], float] = {}
        self.durations: dict[Pair, tuple[list[int], float]] = {}
        self.tunnels: dict[int, tuple[float, dict[Pair, float]]] = {}  # pid -> (seen, gauges)
        self.version = 0  # bumped with every change a scrape would show
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        self.config = config
        known: dict[str, set[str]] = {}
        for host in config.hosts:
            urls = known.setdefault(host.name, set())
            for backends in _groups(host):
                urls.update(t.upstream.url for t in backends.targets)
        self.known = {host: frozenset(urls) for host, urls in known.items()}
        self.version += 1

    def _labels(self, host: Any, target: Any) -> Pair:
        urls = self.known.get(host)
        if urls is None:
            return OTHER_HOST, OTHER
        return host, target if target in urls else OTHER

    # -- the event sink ------------------------------------------------------------------------

    def on_batch(self, worker_id: int, pid: int, batch: list[list[Any]]) -> None:
        for event in batch:
            kind = event[0] if event else None
            if kind == METRICS:
                self._on_metrics(pid, event[METRICS_DELTAS], event[METRICS_GAUGES])
            elif kind == WORKER_EXIT:
                if self.tunnels.pop(event[EXIT_PID], None) is not None:
                    self.version += 1
            elif kind == UPSTREAM_HEALTH:
                self.version += 1

    def on_records(self, worker_id: int, pid: int, count: int, packed: bytes) -> None:
        """Records for the live log: nothing here."""

    def _on_metrics(self, pid: int, deltas: dict[str, Any], gauges: dict[str, Any]) -> None:
        requests = deltas.get("upstream_requests")
        durations = deltas.get("upstream_durations")
        tunnels = gauges.get("upstream_tunnels")
        if requests:
            for host, target, code, n in requests:
                key = (*self._labels(host, target), status_label(code))
                self.requests[key] = self.requests.get(key, 0) + n
        if durations:
            for host, target, counts, seconds in durations:
                if len(counts) != len(HTTP_BUCKETS) + 1:
                    continue
                pair = self._labels(host, target)
                acc, total = self.durations.get(pair) or ([0] * len(counts), 0.0)
                self.durations[pair] = ([a + n for a, n in zip(acc, counts, strict=True)],
                                        total + seconds)
        now = self.clock()
        if tunnels is not None or pid in self.tunnels:
            current: dict[Pair, float] = {}
            for host, target, n in tunnels or ():
                pair = self._labels(host, target)
                current[pair] = current.get(pair, 0) + n
            self.tunnels[pid] = (now, current)
        if requests or durations or tunnels:
            self.version += 1
        for gone in [p for p, (seen, _) in self.tunnels.items() if now - seen > GAUGE_TTL]:
            del self.tunnels[gone]

    # -- metrics -------------------------------------------------------------------------------

    def collector(self) -> _Collector:
        """The families as they are now (made on the loop, rendered in /metrics' thread)."""
        now = self.clock()
        open_now: dict[Pair, float] = {}
        for pid, (seen, gauges) in list(self.tunnels.items()):
            if now - seen > GAUGE_TTL:
                del self.tunnels[pid]
                continue
            for pair, n in gauges.items():
                open_now[pair] = open_now.get(pair, 0) + n
        healthy: dict[Pair, int] = {}
        wall = time.time()
        for target in self.monitor.targets.values():
            pair = (target.host, target.upstream.url)
            # a URL in several groups of a host (the host's, a location's) is up if all say so
            ok = int(self.monitor.healthy(target.key, wall))
            healthy[pair] = min(healthy.get(pair, 1), ok)
        return _Collector(
            dict(self.requests),
            {pair: (list(c), s) for pair, (c, s) in self.durations.items()},
            open_now, healthy,
            # healthy changes with passive mark-downs running out: a new text every second
            (self.version, tuple(sorted(healthy.items())), int(wall)),
        )

    # -- /upstreams ----------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/upstreams", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        return web.json_response(self.table())

    def table(self) -> dict[str, Any]:
        requests: dict[Pair, float] = {}
        for (host_label, url, _), n in self.requests.items():
            requests[(host_label, url)] = requests.get((host_label, url), 0) + n
        collector = self.collector()
        hosts = []
        for host in self.config.hosts:
            groups = []
            for backends in _groups(host):
                keys = [(backends.name, t.upstream.url) for t in backends.targets]
                states = self.monitor.describe(keys)
                targets = []
                for target, key in zip(backends.targets, keys, strict=True):
                    pair = (host.name, target.upstream.url)
                    targets.append({
                        "target": target.upstream.url, "weight": target.weight,
                        "backup": target.backup, "drain": target.drain,
                        "max_connections": target.max_connections, **states[key],
                        "requests": requests.get(pair, 0),
                        "tunnels_open": collector.tunnels.get(pair, 0),
                    })
                check = backends.health_check
                groups.append({
                    "name": backends.name, "policy": backends.policy,
                    "health_check": None if check is None else {
                        "path": check.path, "interval": check.interval, "timeout": check.timeout,
                        "websocket": check.websocket,
                    },
                    "targets": targets,
                })
            hosts.append({"host": host.name, "backends": groups})
        return {"hosts": hosts, "sharing": self.monitor.sharing()}


def _groups(host: ProxyHost) -> list[Backends]:
    """A proxy host's Backends: its own, then each location's."""
    return [host.backends, *(location.backends for location in host.locations)]


class _Collector(Collector):
    def __init__(
        self,
        requests: dict[tuple[str, str, str], float],
        durations: dict[Pair, tuple[list[int], float]],
        tunnels: dict[Pair, float],
        healthy: dict[Pair, int],
        key: tuple[Any, ...],
    ) -> None:
        self.requests = requests
        self.durations = durations
        self.tunnels = tunnels
        self.healthy = healthy
        self.key = key

    def collect(self) -> Iterator[Metric]:
        labels = ["host", "target"]
        requests = CounterMetricFamily(
            "charon_upstream_requests",
            "Requests sent to each target, by the target's status (or the proxy's own 502/504 "
            "for a failed attempt).", labels=[*labels, "code"])
        for key, n in sorted(self.requests.items()):
            requests.add_metric(list(key), n)
        yield requests
        durations = HistogramMetricFamily(
            "charon_upstream_response_seconds",
            "Time from choosing a target to the end of its response, by target.", labels=labels)
        les = [floatToGoString(b) for b in HTTP_BUCKETS] + ["+Inf"]
        for pair, (counts, total) in sorted(self.durations.items()):
            running = 0
            buckets = []
            for le, n in zip(les, counts, strict=True):
                running += n
                buckets.append((le, float(running)))
            durations.add_metric(list(pair), buckets, total)
        yield durations
        tunnels = GaugeMetricFamily(
            "charon_upstream_tunnels_open", "WebSocket tunnels open now, by target.",
            labels=labels)
        for pair, n in sorted(self.tunnels.items()):
            tunnels.add_metric(list(pair), n)
        yield tunnels
        healthy = GaugeMetricFamily(
            "charon_upstream_healthy",
            "1 if the target takes traffic (its active check and passive checks say so), else 0.",
            labels=labels)
        for pair, ok in sorted(self.healthy.items()):
            healthy.add_metric(list(pair), ok)
        yield healthy
