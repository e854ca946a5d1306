"""What a worker reports: a record per request or tunnel for the live log, and metric deltas.

Metrics are summed here, in the worker (a dict increment per request), and sent as deltas once a
second in a METRICS event; the supervisor adds the deltas up, so its totals never go backwards
when a worker is replaced. Records for the live log go out in the publisher's batches.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, defaultdict
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
    from charon.worker.websocket.tunnel import TunnelInfo

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WS_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 604800.0)
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"}
)
# The method as llhttp gives it -> its name and its `method` label (one lookup per request).
_METHOD_NAMES = {m.encode(): (m, m) for m in KNOWN_METHODS}
PATH_LIMIT = 512  # characters of a path kept in a record


class Histogram:
    """Per-label bucket counts (not cumulative), sum and count, since the last flush."""

    __slots__ = ("bounds", "buckets", "sums")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, value: float) -> None:
        counts = self.buckets.get(label)
        if counts is None:
            counts = self.buckets[label] = [0] * (len(self.bounds) + 1)
        counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sums[label] += value

    def snapshot(self) -> list[list[Any]]:
        return [[label, counts, self.sums[label]] for label, counts in self.buckets.items()]

    def clear(self) -> None:
        self.buckets = {}
        self.sums = defaultdict(float)


class Telemetry:
    def __init__(
        self, publisher: EventPublisher, access_log: AccessLog | None = None, enabled: bool = True
    ) -> None:
        self.publisher = publisher
        self.access_log = access_log
        self.enabled = enabled  # [admin] events
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.response_bytes: Counter[str] = Counter()
        self.upstream_errors: Counter[tuple[str, str]] = Counter()
        self.ws_opened: Counter[str] = Counter()
        self.ws_active: Counter[str] = Counter()  # a gauge: current tunnels per host
        self.ws_messages: Counter[tuple[str, str]] = Counter()
        self.ws_bytes: Counter[tuple[str, str]] = Counter()
        self.ws_closes: Counter[tuple[str, int]] = Counter()
        self.http_durations = Histogram(HTTP_BUCKETS)
        self.ws_durations = Histogram(WS_BUCKETS)

    def request(
        self, host: str, method: bytes, status: int, duration: float, response_bytes: int,
        client_ip: str, path: bytes,
    ) -> None:
        name, label = _METHOD_NAMES.get(method) or (method.decode("latin-1"), "OTHER")
        text_path = path[:PATH_LIMIT].decode("latin-1")
        if self.access_log is not None:
            self.access_log.request(
                host, name, text_path, status, duration, response_bytes, client_ip
            )
        if not self.enabled:
            return
        self.requests[(host, label, status)] += 1
        self.response_bytes[host] += response_bytes
        self.http_durations.observe(host, duration)
        self.publisher.emit(
            (REQUEST, time.time(), host, name, status, duration, response_bytes, client_ip,
             text_path)
        )

    def upstream_error(
        self, host: str, kind: str, status: int, client_ip: str, path: bytes
    ) -> None:
        if not self.enabled:
            return
        self.upstream_errors[(host, kind)] += 1
        self.publisher.emit(
            (UPSTREAM_ERROR, time.time(), host, kind, status, client_ip,
             path[:PATH_LIMIT].decode("latin-1"))
        )

    def websocket_open(self, info: TunnelInfo) -> None:
        if not self.enabled:
            return
        self.ws_opened[info.host] += 1
        self.ws_active[info.host] += 1
        self.publisher.emit(
            (WS_OPEN, time.time(), info.host, info.client_ip, info.path[:PATH_LIMIT],
             info.subprotocol)
        )

    def websocket_close(self, info: TunnelInfo, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        host = info.host
        self.ws_active[host] -= 1
        self.ws_messages[(host, "in")] += summary["messages_in"]
        self.ws_messages[(host, "out")] += summary["messages_out"]
        self.ws_bytes[(host, "in")] += summary["bytes_in"]
        self.ws_bytes[(host, "out")] += summary["bytes_out"]
        self.ws_closes[(host, summary["close_code"])] += 1
        self.ws_durations.observe(host, summary["duration"])
        self.publisher.emit(
            (WS_CLOSE, time.time(), host, info.client_ip, info.path[:PATH_LIMIT],
             info.subprotocol, summary["duration"], summary["messages_in"],
             summary["messages_out"], summary["bytes_in"], summary["bytes_out"],
             summary["close_code"], summary["closed_by"])
        )

    def flush_metrics(self, in_flight: int, connections: int, tunnels: int) -> None:
        """Send the deltas since the last call, and the gauges as they are now."""
        if not self.enabled:
            return
        deltas = {
            "requests": [[h, m, c, n] for (h, m, c), n in self.requests.items()],
            "response_bytes": [[h, n] for h, n in self.response_bytes.items()],
            "upstream_errors": [[h, k, n] for (h, k), n in self.upstream_errors.items()],
            "ws_opened": [[h, n] for h, n in self.ws_opened.items()],
            "ws_messages": [[h, d, n] for (h, d), n in self.ws_messages.items()],
            "ws_bytes": [[h, d, n] for (h, d), n in self.ws_bytes.items()],
            "ws_closes": [[h, c, n] for (h, c), n in self.ws_closes.items()],
            "http_durations": self.http_durations.snapshot(),
            "ws_durations": self.ws_durations.snapshot(),
        }
        gauges = {
            "ws_active": [[h, n] for h, n in self.ws_active.items() if n],
            "in_flight": in_flight,
            "connections": connections,
            "tunnels": tunnels,
            "events_dropped": self.publisher.dropped,
        }
        # Its own message, and the deltas are kept for the next try if it cannot be sent: a
        # dropped METRICS would leave the supervisor's totals short for good.
        if not self.publisher.send_now((METRICS, deltas, gauges)):
            self.publisher.dropped += 1
            return
        for counter in (self.requests, self.response_bytes, self.upstream_errors,
                        self.ws_opened, self.ws_messages, self.ws_bytes, self.ws_closes):
            counter.clear()
        self.http_durations.clear()
        self.ws_durations.clear()
