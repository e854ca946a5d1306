"""What a worker reports: a record per request or tunnel for the live log, and metric deltas.

Metrics are summed here, in the worker (per host label, see HostTotals), and sent as deltas once a
second in a METRICS event; the supervisor adds the deltas up, so its totals never go backwards
when a worker is replaced. Records for the live log go out in the publisher's batches.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from typing import TYPE_CHECKING, Any

from charon.events.publisher import EventPublisher
from charon.events.schema import (
    METRICS,
    REQUEST,
    UPSTREAM_ERROR,
    WS_CLOSE,
    WS_OPEN,
)

if TYPE_CHECKING:
    from charon.worker.accesslog import AccessLog
    from charon.worker.upstreams.failure import UpstreamFailure
    from charon.worker.websocket.tunnel import TunnelInfo

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WS_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 604800.0)
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
PATH_LIMIT = 512  # characters of a path kept in a record


_METHOD_NAMES = {name.encode(): name for name in KNOWN_METHODS}


# Engine.take_tls_counts() order; the `result` label of charon_tls_handshakes_total.
TLS_RESULTS = ("full", "resumed", "failed", "timeout", "unknown_name")

class HostTotals:
    """One host label's sums since the last METRICS, and its open tunnels (a gauge).

    One object per label instead of a Counter per metric: a request or a tunnel costs one dict
    lookup, not one per metric with a tuple key each.
    """

    __slots__ = (
        "requests", "response_bytes", "http_buckets", "http_seconds", "ws_active", "ws_opened",
        "ws_closed", "messages_in", "messages_out", "bytes_in", "bytes_out", "ws_buckets",
        "ws_seconds",
    )

    def __init__(self) -> None:
        self.ws_active = 0
        self.clear()

    def clear(self) -> None:
        self.requests = 0  # none: the label has no HTTP entries in the next METRICS
        self.response_bytes = 0
        self.http_buckets = [0] * (len(HTTP_BUCKETS) + 1)  # per bucket, not cumulative
        self.http_seconds = 0.0
        self.ws_opened = 0
        self.ws_closed = 0  # none: no message, byte or duration entries for tunnels
        self.messages_in = self.messages_out = self.bytes_in = self.bytes_out = 0
        self.ws_buckets = [0] * (len(WS_BUCKETS) + 1)
        self.ws_seconds = 0.0


class TargetTotals:
    """One target's sums since the last METRICS (labels host, target: its proxy host's name
    and URL), and its open tunnels (a gauge). Each TargetState holds its own, found once when
    its group is made: a request adds to it without a lookup."""

    __slots__ = ("codes", "buckets", "seconds", "tunnels")

    def __init__(self) -> None:
        self.tunnels = 0
        self.clear()

    def clear(self) -> None:
        self.codes: dict[int, int] = {}  # the backend's status (or the proxy's 502/504) -> n
        self.buckets = [0] * (len(HTTP_BUCKETS) + 1)
        self.seconds = 0.0

    def request(self, status: int, duration: float) -> None:
        """One attempt on the target ended: `duration` from its choice to the response's end."""
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        self.buckets[bisect_left(HTTP_BUCKETS, duration)] += 1
        self.seconds += duration


class Telemetry:
    def __init__(
        self, publisher: EventPublisher, access_log: AccessLog | None = None, enabled: bool = True
    ) -> None:
        self.publisher = publisher
        self.access_log = access_log
        self.enabled = enabled  # [admin] events
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.upstream_errors: Counter[tuple[str, str, str]] = Counter()  # host, kind, reason
        self.ws_closes: Counter[tuple[str, int]] = Counter()
        self.tls_handshakes: Counter[str] = Counter()  # by result (TLS_RESULTS)
        self.denied: Counter[tuple[str, str]] = Counter()  # (host, reason): refused by a rule
        self.hosts: dict[str, HostTotals] = {}
        self.targets: dict[tuple[str, str], TargetTotals] = {}  # (host, target URL)
        # PROXY listeners' connections closed for want of a header, by reason (proxyproto.py)
        self.proxy_protocol_errors: Counter[str] = Counter()

    def tls_counts(self, counts: tuple[int, ...]) -> None:
        """The engine's handshake counts since the last call, in TLS_RESULTS order."""
        for result, count in zip(TLS_RESULTS, counts, strict=True):
            if count:
                self.tls_handshakes[result] += count

    def proxy_protocol_error(self, reason: str) -> None:
        self.proxy_protocol_errors[reason] += 1

    def target_totals(self, host: str, url: str) -> TargetTotals:
        """The totals of target `url` under host label `host` (kept across reloads, so its
        open tunnels stay counted)."""
        totals = self.targets.get((host, url))
        if totals is None:
            totals = self.targets[(host, url)] = TargetTotals()
        return totals

    def _totals(self, host: str) -> HostTotals:
        totals = self.hosts.get(host)
        if totals is None:
            totals = self.hosts[host] = HostTotals()
        return totals

    def request(
        self, host: str, method: bytes, status: int, duration: float, response_bytes: int,
        client_ip: str, path: bytes, failure: UpstreamFailure | None = None,
        denied: str | None = None,
    ) -> None:
        """`denied`: why a rule refused it (acl, auth, rate, connections, body_size)."""
        name = _METHOD_NAMES.get(method)
        if name is None:
            name = method.decode("latin-1")
            label = "OTHER"
        else:
            label = name
        text_path = path[:PATH_LIMIT].decode("latin-1")
        if self.access_log is not None:
            self.access_log.request(
                host, name, text_path, status, duration, response_bytes, client_ip, failure,
                denied,
            )
        if not self.enabled:
            return
        if denied is not None:
            self._denied_request(
                host, name, label, status, duration, response_bytes, client_ip, text_path, denied
            )
            return
        self.requests[(host, label, status)] += 1
        totals = self.hosts.get(host) or self._totals(host)
        totals.requests += 1
        totals.response_bytes += response_bytes
        totals.http_buckets[bisect_left(HTTP_BUCKETS, duration)] += 1
        totals.http_seconds += duration
        columns = self.publisher.requests
        if columns is not None:
            columns.time.append(time.time())
            columns.host.append(host)
            columns.method.append(name)
            columns.status.append(status)
            columns.duration.append(duration)
            columns.response_bytes.append(response_bytes)
            columns.client_ip.append(client_ip)
            columns.path.append(text_path)
            self.publisher.added()

    def _denied_request(
        self, host: str, name: str, label: str, status: int, duration: float,
        response_bytes: int, client_ip: str, path: str, denied: str,
    ) -> None:
        """A request a rule refused: counted as any other, and by reason; its live-log record
        is a whole event (the columns have no `denied`: a supervisor of an earlier version
        decodes the batch all the same, without it)."""
        self.requests[(host, label, status)] += 1
        self.denied[(host, denied)] += 1
        totals = self.hosts.get(host) or self._totals(host)
        totals.requests += 1
        totals.response_bytes += response_bytes
        totals.http_buckets[bisect_left(HTTP_BUCKETS, duration)] += 1
        totals.http_seconds += duration
        self.publisher.emit(
            (REQUEST, time.time(), host, name, status, duration, response_bytes, client_ip,
             path, denied)
        )

    def count_denied(self, host: str, reason: str) -> None:
        """A refusal with no request record: a client connection past the server's
        max_connections[_per_ip] (host "-")."""
        if self.enabled:
            self.denied[(host, reason)] += 1

    def upstream_error(
        self, host: str, failure: UpstreamFailure, status: int, client_ip: str, path: bytes
    ) -> None:
        if not self.enabled:
            return
        kind = failure.kind
        self.upstream_errors[(host, kind, failure.reason)] += 1
        self.publisher.emit(
            (UPSTREAM_ERROR, time.time(), host, kind, status, client_ip,
             path[:PATH_LIMIT].decode("latin-1"), failure.reason, failure.phase,
             failure.address, failure.error)
        )

    def websocket_open(self, info: TunnelInfo) -> None:
        if not self.enabled:
            return
        totals = self.hosts.get(info.host) or self._totals(info.host)
        totals.ws_opened += 1
        totals.ws_active += 1
        self.publisher.emit(
            (WS_OPEN, time.time(), info.host, info.client_ip, info.path[:PATH_LIMIT],
             info.subprotocol)
        )

    def websocket_close(self, info: TunnelInfo, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        host = info.host
        totals = self.hosts.get(host) or self._totals(host)
        totals.ws_active -= 1
        totals.ws_closed += 1
        messages_in = summary["messages_in"]
        messages_out = summary["messages_out"]
        bytes_in = summary["bytes_in"]
        bytes_out = summary["bytes_out"]
        close_code = summary["close_code"]
        duration = summary["duration"]
        totals.messages_in += messages_in
        totals.messages_out += messages_out
        totals.bytes_in += bytes_in
        totals.bytes_out += bytes_out
        totals.ws_buckets[bisect_left(WS_BUCKETS, duration)] += 1
        totals.ws_seconds += duration
        self.ws_closes[(host, close_code)] += 1
        self.publisher.emit(
            (WS_CLOSE, time.time(), host, info.client_ip, info.path[:PATH_LIMIT],
             info.subprotocol, duration, messages_in, messages_out, bytes_in, bytes_out,
             close_code, summary["closed_by"])
        )

    def flush_metrics(self, in_flight: int, connections: int, tunnels: int) -> None:
        """Send the deltas since the last call, and the gauges as they are now."""
        if not self.enabled:
            return
        hosts = self.hosts.items()
        targets = self.targets.items()
        deltas = {
            "requests": [[h, m, c, n] for (h, m, c), n in self.requests.items()],
            "response_bytes": [[h, t.response_bytes] for h, t in hosts if t.requests],
            # By kind for a supervisor of an earlier version (a USR2 upgrade runs new workers
            # under it), by kind and reason for this one.
            "upstream_errors": [[h, k, n] for (h, k, _), n in self.upstream_errors.items()],
            "upstream_failures": [[h, k, r, n] for (h, k, r), n in self.upstream_errors.items()],
            "ws_opened": [[h, t.ws_opened] for h, t in hosts if t.ws_opened],
            "ws_messages": [
                entry for h, t in hosts if t.ws_closed
                for entry in ([h, "in", t.messages_in], [h, "out", t.messages_out])
            ],
            "ws_bytes": [
                entry for h, t in hosts if t.ws_closed
                for entry in ([h, "in", t.bytes_in], [h, "out", t.bytes_out])
            ],
            "ws_closes": [[h, c, n] for (h, c), n in self.ws_closes.items()],
            "tls_handshakes": [[r, n] for r, n in self.tls_handshakes.items()],
            "denied": [[h, r, n] for (h, r), n in self.denied.items()],
            "http_durations": [[h, t.http_buckets, t.http_seconds] for h, t in hosts if t.requests],
            "ws_durations": [[h, t.ws_buckets, t.ws_seconds] for h, t in hosts if t.ws_closed],
            "upstream_requests": [
                [h, url, code, n] for (h, url), t in targets for code, n in t.codes.items()
            ],
            "upstream_durations": [
                [h, url, t.buckets, t.seconds] for (h, url), t in targets if t.codes
            ],
            "proxy_protocol_errors": list(map(list, self.proxy_protocol_errors.items())),
        }
        gauges = {
            "ws_active": [[h, t.ws_active] for h, t in hosts if t.ws_active],
            "in_flight": in_flight,
            "connections": connections,
            "tunnels": tunnels,
            "upstream_tunnels": [[h, url, t.tunnels] for (h, url), t in targets if t.tunnels],
            "events_dropped": self.publisher.dropped,
        }
        publisher = self.publisher
        if publisher.dropped_first:  # when the losses not yet reported happened
            gauges["events_dropped_span"] = [publisher.dropped_first, publisher.dropped_last]
        # Its own message, and the deltas are kept for the next try if it cannot be sent: a
        # dropped METRICS would leave the supervisor's totals short for good. Not a loss, then:
        # events_dropped counts records gone for good, as the live log's notices tell them.
        if not publisher.send_now((METRICS, deltas, gauges)):
            return
        publisher.dropped_first = 0.0
        for counter in (
            self.requests, self.upstream_errors, self.ws_closes, self.tls_handshakes, self.denied
        ):
            counter.clear()
        for totals in self.hosts.values():
            totals.clear()
        for target in self.targets.values():
            if target.codes:
                target.clear()
        self.proxy_protocol_errors.clear()
