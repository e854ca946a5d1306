"""The retry budget of a target group (decision 11, issue 13).

Retries stay within `retry_budget` of the group's requests: each request earns that share of a
token (saved up to BUDGET_CAP while all goes well), each retry spends one; beyond them,
RETRY_FLOOR retries a second are allowed so a quiet group still retries. A failing target can
then add at most that share to the load of the others, never double it.
"""

from __future__ import annotations

from collections.abc import Callable

BUDGET_CAP = 100.0  # retry tokens a quiet group can save up
RETRY_FLOOR = 3  # retries per second allowed whatever the budget says


class RetryBudget:
    __slots__ = ("ratio", "_clock", "_tokens", "_seen", "_floor_at", "_floor_used")

    def __init__(self, ratio: float, clock: Callable[[], float]) -> None:
        self.ratio = ratio
        self._clock = clock
        self._tokens = 0.0
        self._seen = 0  # the group's request count when last looked at
        self._floor_at = -1.0
        self._floor_used = 0

    def allows(self, requests: int) -> bool:
        """One retry, if the budget has it (`requests`: the group's count so far); spent."""
        fresh = requests - self._seen
        self._seen = requests
        self._tokens = min(self._tokens + fresh * self.ratio, BUDGET_CAP)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        now = self._clock()
        if now - self._floor_at >= 1.0:
            self._floor_at, self._floor_used = now, 0
        if self._floor_used < RETRY_FLOOR:
            self._floor_used += 1
            return True
        return False
