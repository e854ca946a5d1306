"""Failed authentication attempts per client IP: a bucket of 10 failures refilled one per 6 s.

The bucket lives in the rate table shared by every worker (`limits.rates.FailureCounter`), so a
client spreading its guesses over connections (and so workers) gets the same 10.
`LocalFailureCounter` is the same budget within one process (kept for tests of the budget
alone). `failure_counter()` is the one place that chooses.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol

BURST = 10
INTERVAL = 6.0  # seconds per failure forgiven
MAX_CLIENTS = 16384  # clients tracked per worker (the oldest forgotten first)


class FailureCounter(Protocol):
    def take(self, ip: str) -> float:
        """Count a failure of `ip`: 0.0, or (the bucket empty) the seconds to wait, uncounted."""

    def blocked(self, ip: str) -> float:
        """Seconds before `ip` may fail again (0.0: it may try now); counts nothing."""


class LocalFailureCounter:
    """GCRA per IP in this worker: the theoretical arrival time of each client's next failure."""

    def __init__(self, burst: int = BURST, interval: float = INTERVAL,
                 max_clients: int = MAX_CLIENTS) -> None:
        self.tolerance = burst * interval
        self.interval = interval
        self.max_clients = max_clients
        self.tat: OrderedDict[str, float] = OrderedDict()

    def take(self, ip: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        tat = max(self.tat.get(ip, now), now) + self.interval
        if tat - now > self.tolerance:
            return tat - now - self.tolerance
        self.tat[ip] = tat
        self.tat.move_to_end(ip)
        while len(self.tat) > self.max_clients:
            self.tat.popitem(last=False)  # (a client seen long ago: its bucket is full again)
        return 0.0

    def blocked(self, ip: str, now: float | None = None) -> float:
        tat = self.tat.get(ip)
        if tat is None:
            return 0.0
        now = time.monotonic() if now is None else now
        over = max(tat, now) + self.interval - now - self.tolerance
        return over if over > 0 else 0.0


_counter: FailureCounter | None = None


def failure_counter() -> FailureCounter:
    """The worker's counter: in the table the workers share."""
    global _counter
    if _counter is None:
        from charon.worker.limits.rates import FailureCounter as SharedFailureCounter

        _counter = SharedFailureCounter()
    return _counter
