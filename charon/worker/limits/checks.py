"""The limits of a route, checked by `RouteRules.admit` (worker/access/route.py) after the
access list: the host's counts first, then its rate limits (a refused request takes no token
and holds no count). WebSocket handshakes are counted as connections and as WebSockets, and
take `websocket_rate_limit` only; other requests take `rate_limit`.

Counts taken are plan leases: `RequestPlan.release()` gives them back where the exchange ends
(exchange.py) or its tunnel closes (tunnel.py, dialled.py). A lease dropped without being
released (a plan abandoned on a path that forgot it) gives its counts back when it is freed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from charon.worker.http.errors import HttpError
from charon.worker.limits import counts, rates

if TYPE_CHECKING:
    from charon.config.model import ProxyHost
    from charon.config.rules import RateLimit, Rules
    from charon.worker.http.request import RequestPlan
    from charon.worker.limits.counts import CountTable
    from charon.worker.limits.rates import RateTable

_BUSY = HttpError(503, "too many connections", close=False, fields=b"Retry-After: 1\r\n",
                  body=b"503 Service Unavailable: too many connections\n", denied="connections")


def too_many_requests(wait: float) -> HttpError:
    """429 with Retry-After in whole seconds, at least 1."""
    seconds = max(1, math.ceil(wait))
    return HttpError(429, "too many requests", close=False,
                     fields=b"Retry-After: %d\r\n" % seconds,
                     body=b"429 Too Many Requests\n", denied="rate")


class Lease:
    """Units of counts held by one request or tunnel; given back once."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: list[tuple[CountTable, int]] = []

    def __call__(self) -> None:
        held, self.held = self.held, []
        for table, index in held:
            table.release(index)

    def __del__(self) -> None:
        if self.held:
            self()


class _Rate:
    """One rate limit of a route: its buckets' places remembered by client IP (the same str
    object for every request of a connection: no encoding, no hashing per request)."""

    __slots__ = ("table", "key", "interval", "tolerance", "by_ip", "_places")

    def __init__(self, limit: RateLimit, zone: str, kind: bytes) -> None:
        self.by_ip = limit.by != "host"
        self.table: RateTable = rates.per_ip() if self.by_ip else rates.per_host()
        self.interval = max(1, round(limit.per * 1e6 / limit.requests))
        burst = max(1, limit.burst)
        self.tolerance = rates.tolerance(self.interval, burst)
        # `kind`: requests and handshakes never share a bucket, even with equal numbers.
        self.key = b"%s\0%s\0%s\0%d\0%d\0%d\0" % (
            kind, (limit.zone or zone).encode(), limit.by.encode(), limit.requests,
            round(limit.per * 1000), burst,
        )
        self._places: dict[str, tuple[int, int]] = {}

    def take(self, ip: str) -> float:
        where = self._places.get(ip)
        if where is None:
            where = self._place(ip)
        return self.table.take_at(where, self.interval, self.tolerance)

    def refund(self, ip: str) -> None:
        self.table.refund_at(self._places.get(ip) or self._place(ip), self.interval)

    def _place(self, ip: str) -> tuple[int, int]:
        where = self.table.place(self.key + ip.encode() if self.by_ip else self.key)
        if len(self._places) >= rates.KNOWN_KEYS:
            self._places.clear()  # (bounded, as the table's own memory)
        self._places[ip] = where
        return where


class LimitChecks:
    """One route's counts and rate limits."""

    __slots__ = ("host", "rules", "rates", "ws_rates", "by_ip", "by_host", "counted")

    def __init__(self, rules: Rules, host: ProxyHost, zone: str) -> None:
        self.host = host.name.encode()
        self.rules = rules
        self.rates = [_Rate(limit, zone, b"r") for limit in rules.rate_limits]
        self.ws_rates = [_Rate(limit, zone, b"w") for limit in rules.websocket_rate_limits]
        self.by_ip = counts.per_ip(ledger=_ledger)
        self.by_host = counts.per_host(ledger=_ledger)
        self.counted = bool(rules.max_connections or rules.max_connections_per_ip
                            or rules.max_websockets or rules.max_websockets_per_ip)

    def admit(self, plan: RequestPlan, headers: object = None) -> None:
        """Take the plan's counts and tokens, or raise HttpError (503, 429)."""
        websocket = plan.websocket_key is not None
        ip = plan.client_ip
        lease = self._count(websocket, ip.encode()) if self.counted else None
        limits = self.ws_rates if websocket else self.rates
        for limit in limits:
            wait = limit.take(ip)
            if wait:
                for taken in limits[: limits.index(limit)]:
                    taken.refund(ip)
                if lease is not None:
                    lease()
                raise too_many_requests(wait)
        if lease is not None:
            if plan.leases is None:
                plan.leases = [lease]
            else:
                plan.leases.append(lease)

    def _count(self, websocket: bool, ip: bytes) -> Lease:
        rules = self.rules
        lease = Lease()
        wanted = [(self.by_host, b"c\0" + self.host, rules.max_connections),
                  (self.by_ip, b"c\0" + self.host + b"\0" + ip, rules.max_connections_per_ip)]
        if websocket:
            wanted += [(self.by_host, b"w\0" + self.host, rules.max_websockets),
                       (self.by_ip, b"w\0" + self.host + b"\0" + ip, rules.max_websockets_per_ip)]
        for table, key, limit in wanted:
            if not limit:
                continue
            index = table.acquire(key, limit)
            if index == counts.DENIED:
                lease()
                raise _BUSY
            if index >= 0:
                lease.held.append((table, index))
        return lease


_ledger: counts.Ledger | None = None


def use_ledger(ledger: counts.Ledger | None) -> None:
    """This worker's ledger (main.py): counts taken from now on are written in it."""
    global _ledger
    _ledger = ledger


def current_ledger() -> counts.Ledger | None:
    """This worker's ledger (None: counts taken are not written in one)."""
    return _ledger


def limit_checks(rules: Rules, host: ProxyHost, zone: str) -> LimitChecks | None:
    """The limits of a route (for the RulesMaker), None when it has none."""
    checks = LimitChecks(rules, host, zone)
    if not (checks.counted or checks.rates or checks.ws_rates):
        return None
    return checks
