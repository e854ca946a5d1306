"""Certificates on the admin listener: which TLS host serves which certificate, until when.

- `/certificates`: a JSON list, one entry per TLS host (certificate files and ACME alike): the
  host, where its certificate comes from, issuer, not_after and the seconds left, and for ACME
  hosts the schedule's state (next renewal, failures in a row, last error, next try).
- Prometheus: `charon_tls_certificate_expiry_seconds{host}` and
  `charon_acme_orders_total{result}` (obtained, renewed, failed), added to /metrics.
- Live log: a `certificate` record per ACME event (obtained, renewed, failed).

Certificates are read with `cryptography` when a file changed (size or mtime), not per scrape.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from charon.config.model import Config
from charon.events.receiver import EventHub
from charon.events.schema import CERTIFICATE
from charon.tls.acme.schedule import FAILED, OBTAINED, RENEWED, HostStatus
from charon.tls.acme.store import CERT_FILE, CertificateInfo, describe
from charon.tls.paths import certificate_dir

ORDER_RESULTS = (OBTAINED, RENEWED, FAILED)


class _Reader:
    """Parsed certificates by path, read again when the file changed."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[tuple[int, int], CertificateInfo | None]] = {}

    def read(self, path: str) -> CertificateInfo | None:
        try:
            stat = os.stat(path)
        except OSError:
            self._cache.pop(path, None)
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            with open(path, "rb") as f:
                info: CertificateInfo | None = describe(f.read())
        except (OSError, ValueError):
            info = None
        self._cache[path] = (stamp, info)
        return info


class CertificateSection:
    def __init__(self, hub: EventHub, config: Config) -> None:
        self.hub = hub
        self.config = config
        self.orders = dict.fromkeys(ORDER_RESULTS, 0)
        self.schedule: Callable[[], Mapping[str, HostStatus]] = dict  # set by the supervisor
        self._reader = _Reader()

    def record(self, event: str, host: str, info: CertificateInfo | None, error: str) -> None:
        """An ACME event: counted, and a live-log record."""
        if event in self.orders:
            self.orders[event] += 1
        self.hub.supervisor_event([
            CERTIFICATE, time.time(), event, host, info.issuer if info else "",
            info.not_after if info else None, error,
        ])

    def hosts(self) -> list[dict[str, Any]]:
        now = time.time()
        schedule = self.schedule()
        entries = []
        for host in self.config.hosts:
            if host.tls is None:
                continue
            entry: dict[str, Any] = {"host": host.name, "domains": list(host.domains)}
            if host.tls.files is not None:
                entry["source"] = "file"
                path = host.tls.files.cert
            else:
                entry["source"] = "acme"
                path = str(certificate_dir(self.config.tls.state_dir, host.name) / CERT_FILE)
            info = self._reader.read(path)
            entry.update(
                issuer=info.issuer if info else None,
                not_after=info.not_after if info else None,
                expires_in=round(info.not_after - now, 1) if info else None,
            )
            status = schedule.get(host.name)
            if status is not None:
                entry.update(
                    renew_at=status.renew_at, failures=status.failures,
                    last_error=status.last_error or None, retry_at=status.retry_at,
                    ordering=status.ordering,
                )
            entries.append(entry)
        return entries

    # -- the admin section ---------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/certificates", self._handle)

    async def _handle(self, request: web.Request) -> web.Response:
        return web.json_response({"certificates": self.hosts()})

    def collector(self) -> _Collector:
        """The metrics as they are now (made on the loop, rendered in /metrics' thread)."""
        expiry = {e["host"]: e["expires_in"] for e in self.hosts() if e["expires_in"] is not None}
        return _Collector(dict(self.orders), expiry)


class _Collector(Collector):
    def __init__(self, orders: dict[str, int], expiry: dict[str, float]) -> None:
        self.orders = orders
        self.expiry = expiry
        # Seconds left change every second: a scrape a second later is formatted anew.
        self.key = (tuple(orders.values()), tuple(sorted(expiry)), int(time.time()))

    def collect(self) -> Iterator[Metric]:
        orders = CounterMetricFamily(
            "charon_acme_orders", "ACME certificate orders, by result.", labels=["result"])
        for result, n in self.orders.items():
            orders.add_metric([result], n)
        yield orders
        expiry = GaugeMetricFamily(
            "charon_tls_certificate_expiry_seconds",
            "Seconds until each TLS host's certificate expires (negative: expired).",
            labels=["host"])
        for host, seconds in sorted(self.expiry.items()):
            expiry.add_metric([host], seconds)
        yield expiry
