"""What a worker knows of its targets' health (issue 13).

One `TargetHealth` per (backends name, target URL), made on first use and kept across
reloads in place, so a target's state survives a config change that keeps it. Every route
that uses the target holds the same object: asking whether it may take a request is an
attribute read, not a lookup.

Two things can take a target out of rotation:
- this worker's own passive checks: `max_fails` failures within `fail_timeout` mark it down
  here for `fail_timeout` (as nginx's max_fails does), and the supervisor is told so it can
  tell the other workers;
- the supervisor's verdict (its active health check, or passive failures reported by any
  worker), applied by `HealthBoard.apply`.
"""

from __future__ import annotations

from collections.abc import Callable

TargetKey = tuple[str, str]  # (Backends.name, the target's upstream URL)


class TargetHealth:
    __slots__ = ("key", "checked_up", "down_until", "changed_at", "failures", "first_failure")

    def __init__(self, key: TargetKey, now: float) -> None:
        self.key = key
        self.checked_up = True  # the supervisor's verdict (active check or shared passive)
        self.down_until = 0.0  # loop time until which this worker's passive check keeps it out
        self.changed_at = now  # when it last came back up (slow_start ramps from here)
        self.failures = 0  # passive failures counted in the current window ...
        self.first_failure = 0.0  # ... which began then

    def available(self, now: float) -> bool:
        return self.checked_up and now >= self.down_until

    def failed(self, now: float, max_fails: int, fail_timeout: float) -> bool:
        """A passive failure (connect error, reset, a fail_status answer). True when it marked
        the target down here."""
        if max_fails <= 0 or fail_timeout <= 0:
            return False
        if self.failures == 0 or now - self.first_failure > fail_timeout:
            self.failures, self.first_failure = 0, now
        self.failures += 1
        if self.failures < max_fails or now < self.down_until:
            return False
        self.failures = 0
        self.down_until = now + fail_timeout
        self.changed_at = self.down_until  # back in rotation then, slow_start from there
        return True

    def succeeded(self) -> None:
        self.failures = 0


class HealthBoard:
    """Every target's health in this worker."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._targets: dict[TargetKey, TargetHealth] = {}

    def health(self, key: TargetKey) -> TargetHealth:
        health = self._targets.get(key)
        if health is None:
            health = self._targets[key] = TargetHealth(key, self._clock())
        return health
