"""Prometheus metrics at GET /metrics on the admin listener, kept by the supervisor.

Workers send a METRICS event once a second (see `charon.worker.telemetry`): counter DELTAS since
their previous one, and GAUGES as they are now. This section is an event sink that adds the deltas
up into running totals, so a counter never goes backwards when a worker is replaced, and keeps the
latest gauges of each worker process (by pid): they are dropped when the supervisor reports the
process's exit, or when it has not reported for GAUGE_TTL seconds. `events_dropped` arrives as a
per-process cumulative count: it is turned into per-process deltas and added to one total.

Every label value is bounded: `host` is a configured proxy host (its first domain) or `_other`,
methods, upstream error kinds and WebSocket close codes fold into small fixed sets. A scrape
copies the state in the loop and formats the text in a thread, so a scrape under load does not
hold the supervisor's loop while the text is built; scrapes with nothing new in between (or
arriving while it is built) share one text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from charon.events.schema import (
    CONFIG_RELOAD,
    ERR_BAD_RESPONSE,
    ERR_CLOSED,
    ERR_CONNECT,
    ERR_TIMEOUT,
    ERR_TLS,
    FIELDS,
    METRICS,
    WORKER_EXIT,
)
from charon.worker.proxyproto import REASONS as PROXY_REASONS
from charon.worker.telemetry import HTTP_BUCKETS, KNOWN_METHODS, TLS_RESULTS, WS_BUCKETS
from charon.worker.upstreams.failure import REASONS

log = logging.getLogger("charon.admin")

OTHER_HOST = "_other"  # the host label of anything that is not a configured proxy host
OTHER = "other"  # the label value of anything else out of a bounded set
GAUGE_TTL = 5.0  # a process that has not reported for this long has its gauges dropped
EXITED_MEMORY = 60.0  # how long an exited pid's events_dropped count is remembered
ERROR_KINDS = (ERR_CONNECT, ERR_TIMEOUT, ERR_BAD_RESPONSE, ERR_CLOSED, ERR_TLS)
# The (kind, reason) pairs each host starts at 0 with (so rate() sees their first failure):
# the usual ones; rarer pairs appear when they first happen.
USUAL_FAILURES = (
    (ERR_CONNECT, "refused"), (ERR_CONNECT, "dns"), (ERR_CONNECT, "unreachable"),
    (ERR_TIMEOUT, "timeout"), (ERR_BAD_RESPONSE, "bad_response"), (ERR_CLOSED, "closed"),
    (ERR_CLOSED, "reset"), (ERR_TLS, "tls"),
)
DIRECTIONS = ("in", "out")
RELOAD_RESULTS = ("success", "error")
METHODS = KNOWN_METHODS | {"OTHER"}
DENIED_REASONS = ("acl", "auth", "rate", "connections", "body_size")
NO_HOST = "-"  # the host label of refusals before any request (server connection caps)

Totals = dict[tuple[str, ...], float]

# Where the fields this section reads sit in an event (the kind is element 0).
EXIT_PID = FIELDS[WORKER_EXIT].index("pid") + 1
RELOAD_RESULT = FIELDS[CONFIG_RELOAD].index("result") + 1
METRICS_DELTAS = FIELDS[METRICS].index("deltas") + 1
METRICS_GAUGES = FIELDS[METRICS].index("gauges") + 1


def close_code_label(code: Any) -> str:
    """RFC 6455 codes 1000-1015 as they are; the application ranges folded into 3xxx / 4xxx
    (a client chooses the code of its Close frame: one series per value would be unbounded)."""
    if type(code) is int:
        if 1000 <= code <= 1015:
            return str(code)
        if 3000 <= code <= 3999:
            return "3xxx"
        if 4000 <= code <= 4999:
            return "4xxx"
    return OTHER


def status_label(status: Any) -> str:
    return str(status) if type(status) is int and 100 <= status <= 999 else OTHER


@dataclass
class _Histogram:
    """Bucket counts (not cumulative, the last one is +Inf) and the sum of the observations."""

    counts: list[int]
    total: float = 0.0


@dataclass
class _Gauges:
    """One worker process's gauges as last reported."""

    seen_at: float
    in_flight: float = 0
    connections: float = 0
    tunnels: float = 0
    ws_active: dict[str, float] = field(default_factory=dict)


@dataclass
class Snapshot:
    """Everything a scrape shows, copied out of the live state in the loop."""

    counters: dict[str, Totals]
    http_hist: dict[str, _Histogram]
    ws_hist: dict[str, _Histogram]
    ws_active: dict[str, float]
    in_flight: float
    connections: float
    tunnels: float
    workers: int
    restarts: int
    reloads: dict[str, int]
    last_reload_ok: int
    events_dropped: int
    config_versions: dict[int, int] = field(default_factory=dict)


# name -> (help, label names), for the counters kept as {label values: total}.
COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "charon_http_requests": ("HTTP requests answered.", ("host", "method", "code")),
    "charon_http_response_bytes": (
        "Response body bytes sent to clients: relayed from backends, and Charon's own "
        "answers (errors, redirects).", ("host",)),
    "charon_upstream_errors": (
        "Backend failures by kind (connect, timeout, bad_response, closed, tls) and reason "
        "(refused, reset, timeout, dns, tls, bad_response, closed, unreachable, other).",
        ("host", "kind", "reason")),
    "charon_websocket_connections": ("WebSocket tunnels opened.", ("host",)),
    "charon_websocket_messages": (
        "WebSocket messages (data frames with FIN), in: from clients, out: to clients.",
        ("host", "direction")),
    "charon_websocket_bytes": (
        "WebSocket message payload bytes (control frames not counted), in: from clients, "
        "out: to clients.", ("host", "direction")),
    "charon_websocket_closes": (
        "WebSocket tunnels closed, by close code (3xxx/4xxx: application codes).",
        ("host", "code")),
    "charon_requests_denied": (
        "Requests refused by a host's rules, by reason: acl (access list, 403), auth (401, or "
        "forward auth's answer), rate (429), connections (503: a count, or the server's "
        "connection caps, host \"-\"), body_size (413).", ("host", "reason")),
    "charon_tls_handshakes": (
        "TLS handshakes on the TLS listeners by result: full, resumed (a session ticket), "
        "failed, timeout ([tls] handshake_timeout), unknown_name (an SNI name with no "
        "certificate and no default).", ("result",)),
    "charon_proxy_protocol_errors": (
        "Connections on PROXY protocol listeners closed for want of a valid header, by reason: "
        "missing, malformed, unsupported, too_long, timeout (timeouts.header), closed (by the "
        "peer before a whole header).", ("reason",)),
}


class MetricsSection:
    """An event sink that keeps the totals, and the admin section that serves them."""

    def __init__(
        self,
        hosts: Iterable[str],
        ready_workers: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ready_workers = ready_workers
        self.clock = clock
        self.hosts: frozenset[str] = frozenset()
        self.bad_events = 0
        self.counters: dict[str, Totals] = {name: {} for name in COUNTERS}
        self.http_hist: dict[str, _Histogram] = {}
        self.ws_hist: dict[str, _Histogram] = {}
        self.gauges: dict[int, _Gauges] = {}
        self.exited: dict[int, float] = {}  # pid -> when its exit was reported
        self.dropped_seen: dict[int, int] = {}  # pid -> its cumulative events_dropped so far
        self.events_dropped = 0
        self.restarts = 0
        self.reloads = dict.fromkeys(RELOAD_RESULTS, 0)
        self.last_reload_ok = 1
        self.config_versions: dict[int, int] = {}  # worker id -> config version it applied
        self._next_expiry = 0.0
        self.version = 0  # bumped on every change: a scrape with nothing new reuses the text
        self._rendered: tuple[tuple[Any, ...], asyncio.Future[bytes]] | None = None
        # Other modules' metrics (admin/certificates.py): each call gives a collector of the
        # state now, with a `key` that changes when its text would.
        self.extra: list[Callable[[], Any]] = []
        self._handlers: dict[str, Callable[[int, list[Any]], None]] = {
            METRICS: self._on_metrics,
            WORKER_EXIT: self._on_worker_exit,
            CONFIG_RELOAD: self._on_reload,
        }
        self.set_hosts(hosts)

    def set_hosts(self, hosts: Iterable[str]) -> None:
        """The configured proxy host names (first domains): the only `host` label values, with
        `_other`. Their per-host counters start at 0 so the first increase shows in rate()."""
        self.hosts = frozenset(hosts)
        self.version += 1
        for result in TLS_RESULTS:
            self.counters["charon_tls_handshakes"].setdefault((result,), 0)
        for host in self.hosts:
            for name, keys in (
                ("charon_http_response_bytes", [(host,)]),
                ("charon_websocket_connections", [(host,)]),
                ("charon_upstream_errors", [(host, *pair) for pair in USUAL_FAILURES]),
                ("charon_websocket_messages", [(host, d) for d in DIRECTIONS]),
                ("charon_websocket_bytes", [(host, d) for d in DIRECTIONS]),
                ("charon_requests_denied", [(host, r) for r in DENIED_REASONS]),
            ):
                totals = self.counters[name]
                for key in keys:
                    totals.setdefault(key, 0)

    def set_config_versions(self, versions: dict[int, int]) -> None:
        if versions != self.config_versions:
            self.config_versions = versions
            self.version += 1

    def _host(self, host: Any) -> str:
        return host if host in self.hosts else OTHER_HOST

    # -- the event sink ------------------------------------------------------------------------

    def on_batch(self, worker_id: int, pid: int, batch: list[list[Any]]) -> None:
        handlers = self._handlers
        for event in batch:
            if event and event[0] in handlers:
                self.on_event(worker_id, pid, event)

    def on_records(self, worker_id: int, pid: int, count: int, packed: bytes) -> None:
        """Live-log records: their numbers come in METRICS, so they are not even decoded."""

    def on_event(self, worker_id: int, pid: int, event: list[Any]) -> None:
        handler = self._handlers.get(event[0])
        if handler is None:
            return  # the records for the live log: their numbers come in METRICS
        self.version += 1
        try:
            handler(pid, event)
        except Exception:  # a malformed event must not stop the other sinks
            self.bad_events += 1
            if self.bad_events == 1 or self.bad_events % 1000 == 0:
                log.exception("bad %s event from pid %d ignored (%d so far)",
                              event[0], pid, self.bad_events)

    def _on_metrics(self, pid: int, event: list[Any]) -> None:
        deltas: dict[str, Any] = event[METRICS_DELTAS]
        gauges: dict[str, Any] = event[METRICS_GAUGES]
        self._add_deltas(deltas)
        now = self.clock()
        if now >= self._next_expiry:
            self._expire()
        dropped = int(gauges.get("events_dropped", 0))
        before = self.dropped_seen.get(pid, 0)
        self.dropped_seen[pid] = dropped
        if dropped > before:
            self.events_dropped += dropped - before
        elif dropped < before:  # a new process reusing the pid: its count starts again
            self.events_dropped += dropped
        exited_at = self.exited.get(pid)
        if exited_at is not None and now - exited_at < GAUGE_TTL:
            return  # its last report, read after its exit: the totals count, its gauges do not
        ws_active: dict[str, float] = {}
        for host, n in gauges.get("ws_active", ()):
            label = self._host(host)
            ws_active[label] = ws_active.get(label, 0) + n
        self.gauges[pid] = _Gauges(
            now,
            gauges.get("in_flight", 0),
            gauges.get("connections", 0),
            gauges.get("tunnels", 0),
            ws_active,
        )

    def _add_deltas(self, deltas: dict[str, Any]) -> None:
        host = self._host
        c = self.counters
        _add(c["charon_http_requests"],
             ((host(h), m if m in METHODS else "OTHER", status_label(s), n)
              for h, m, s, n in deltas.get("requests", ())))
        _add(c["charon_http_response_bytes"],
             ((host(h), n) for h, n in deltas.get("response_bytes", ())))
        if "upstream_failures" in deltas:
            _add(c["charon_upstream_errors"],
                 ((host(h), k if k in ERROR_KINDS else OTHER, r if r in REASONS else OTHER, n)
                  for h, k, r, n in deltas["upstream_failures"]))
        else:  # a worker of an earlier version (USR2): no reasons
            _add(c["charon_upstream_errors"],
                 ((host(h), k if k in ERROR_KINDS else OTHER, OTHER, n)
                  for h, k, n in deltas.get("upstream_errors", ())))
        _add(c["charon_websocket_connections"],
             ((host(h), n) for h, n in deltas.get("ws_opened", ())))
        _add(c["charon_websocket_messages"],
             ((host(h), d if d in DIRECTIONS else OTHER, n)
              for h, d, n in deltas.get("ws_messages", ())))
        _add(c["charon_websocket_bytes"],
             ((host(h), d if d in DIRECTIONS else OTHER, n)
              for h, d, n in deltas.get("ws_bytes", ())))
        _add(c["charon_requests_denied"],
             ((h if h == NO_HOST else host(h), r if r in DENIED_REASONS else OTHER, n)
              for h, r, n in deltas.get("denied", ())))
        _add(c["charon_tls_handshakes"],
             ((r if r in TLS_RESULTS else OTHER, n) for r, n in deltas.get("tls_handshakes", ())))
        _add(c["charon_proxy_protocol_errors"],
             ((r if r in PROXY_REASONS else OTHER, n)
              for r, n in deltas.get("proxy_protocol_errors", ())))
        _add(c["charon_websocket_closes"],
             ((host(h), close_code_label(code), n) for h, code, n in deltas.get("ws_closes", ())))
        self._add_histograms(self.http_hist, len(HTTP_BUCKETS), deltas.get("http_durations", ()))
        self._add_histograms(self.ws_hist, len(WS_BUCKETS), deltas.get("ws_durations", ()))

    def _add_histograms(
        self, into: dict[str, _Histogram], bounds: int, items: Iterable[list[Any]]
    ) -> None:
        for h, counts, total in items:
            if len(counts) != bounds + 1:
                raise ValueError(f"{len(counts)} histogram buckets, expected {bounds + 1}")
            hist = into.get(label := self._host(h))
            if hist is None:
                hist = into[label] = _Histogram([0] * (bounds + 1))
            acc = hist.counts
            for i, n in enumerate(counts):
                acc[i] += n
            hist.total += total

    def _on_worker_exit(self, pid: int, event: list[Any]) -> None:
        self.restarts += 1
        exited_pid = event[EXIT_PID]
        self.gauges.pop(exited_pid, None)
        self.exited[exited_pid] = self.clock()

    def _on_reload(self, pid: int, event: list[Any]) -> None:
        result = event[RELOAD_RESULT]
        ok = result == "success"
        self.reloads["success" if ok else "error"] += 1
        self.last_reload_ok = 1 if ok else 0

    # -- what a scrape shows -------------------------------------------------------------------

    def _expire(self) -> None:
        now = self.clock()
        self._next_expiry = now + 1.0
        for pid in [p for p, g in self.gauges.items() if now - g.seen_at > GAUGE_TTL]:
            del self.gauges[pid]
            self.version += 1
        for pid in [p for p, t in self.exited.items() if now - t > EXITED_MEMORY]:
            del self.exited[pid]
            self.dropped_seen.pop(pid, None)

    def snapshot(self) -> Snapshot:
        """A copy of what a scrape shows (taken in the loop; cheap next to formatting it)."""
        self._expire()
        ws_active = dict.fromkeys(self.hosts, 0.0)
        in_flight = connections = tunnels = 0.0
        for g in self.gauges.values():
            in_flight += g.in_flight
            connections += g.connections
            tunnels += g.tunnels
            for host, n in g.ws_active.items():
                ws_active[host] = ws_active.get(host, 0) + n
        return Snapshot(
            counters={name: dict(totals) for name, totals in self.counters.items()},
            http_hist={h: _Histogram(list(v.counts), v.total) for h, v in self.http_hist.items()},
            ws_hist={h: _Histogram(list(v.counts), v.total) for h, v in self.ws_hist.items()},
            ws_active=ws_active,
            in_flight=in_flight,
            connections=connections,
            tunnels=tunnels,
            workers=self.ready_workers(),
            restarts=self.restarts,
            reloads=dict(self.reloads),
            last_reload_ok=self.last_reload_ok,
            config_versions=dict(self.config_versions),
            events_dropped=self.events_dropped,
        )

    def render(self, snapshot: Snapshot | None = None, extra: Iterable[Collector] = ()) -> bytes:
        """The Prometheus text format of `snapshot` (a fresh one if None). Touches nothing but
        the snapshot: it may run in a thread."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(snapshot or self.snapshot()))
        for collector in extra:
            registry.register(collector)
        return generate_latest(registry)

    # -- the admin section ---------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/metrics", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await self.render_latest()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def render_latest(self) -> bytes:
        """The text of the current state, formatted in a thread (the loop only copies the
        state). Scrapes that find nothing changed since the last one, or arrive while it is
        being formatted, share its text."""
        self._expire()
        extra = [make() for make in self.extra]
        key = (self.version, self.ready_workers(), *(c.key for c in extra))
        rendered = self._rendered
        if rendered is None or rendered[0] != key or (
            rendered[1].done() and rendered[1].exception() is not None
        ):
            future = asyncio.get_running_loop().run_in_executor(
                None, self.render, self.snapshot(), extra
            )
            rendered = self._rendered = (key, future)
        return await asyncio.shield(rendered[1])


def _add(totals: Totals, items: Iterable[tuple[Any, ...]]) -> None:
    for *labels, n in items:
        key = tuple(labels)
        totals[key] = totals.get(key, 0) + n


class SnapshotCollector(Collector):
    """The metric families of one snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return families(self.snapshot)


def families(s: Snapshot) -> Iterator[Metric]:
    for name, (doc, labels) in COUNTERS.items():
        counter = CounterMetricFamily(name, doc, labels=labels)
        for key, value in sorted(s.counters[name].items()):
            counter.add_metric(key, value)
        yield counter
        if name == "charon_http_requests":
            yield _histogram(
                "charon_http_request_duration_seconds",
                "Time from the request head to the end of the response, by host.",
                HTTP_BUCKETS, s.http_hist,
            )
        elif name == "charon_websocket_connections":
            yield _histogram(
                "charon_websocket_duration_seconds",
                "How long WebSocket tunnels stayed open, by host.",
                WS_BUCKETS, s.ws_hist,
            )
    active = GaugeMetricFamily(
        "charon_websocket_connections_active", "WebSocket tunnels open now.", labels=["host"]
    )
    for host, n in sorted(s.ws_active.items()):
        active.add_metric([host], n)
    yield active
    yield GaugeMetricFamily(
        "charon_http_requests_in_flight", "Requests being answered now.", value=s.in_flight)
    yield GaugeMetricFamily(
        "charon_connections_open", "Client connections open now (HTTP, not tunnels).",
        value=s.connections)
    yield GaugeMetricFamily(
        "charon_websocket_tunnels_open", "WebSocket tunnels open now, all hosts.", value=s.tunnels)
    yield GaugeMetricFamily("charon_workers", "Worker processes serving now.", value=s.workers)
    yield CounterMetricFamily(
        "charon_worker_restarts", "Worker processes that exited and were replaced.",
        value=s.restarts)
    reloads = CounterMetricFamily(
        "charon_config_reloads", "Configuration reloads, by result.", labels=["result"])
    for result in RELOAD_RESULTS:
        reloads.add_metric([result], s.reloads[result])
    yield reloads
    yield GaugeMetricFamily(
        "charon_config_last_reload_successful",
        "1 if the last configuration reload succeeded (or none was tried), else 0.",
        value=s.last_reload_ok)
    versions = GaugeMetricFamily(
        "charon_config_version", "The config version each worker applied.", labels=["worker"])
    for worker, version in sorted(s.config_versions.items()):
        versions.add_metric([str(worker)], version)
    yield versions
    yield CounterMetricFamily(
        "charon_events_dropped",
        "Events workers dropped because the supervisor did not take them in time.",
        value=s.events_dropped)


def _histogram(
    name: str, doc: str, bounds: tuple[float, ...], hists: dict[str, _Histogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=["host"])
    les = [floatToGoString(b) for b in bounds] + ["+Inf"]
    for host, hist in sorted(hists.items()):
        running = 0
        buckets: list[tuple[str, float]] = []
        for le, n in zip(les, hist.counts, strict=True):
            running += n  # workers send per-bucket counts; exposition wants them cumulative
            buckets.append((le, running))
        family.add_metric([host], buckets, hist.total)
    return family
