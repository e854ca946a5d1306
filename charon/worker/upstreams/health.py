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

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

TargetKey = tuple[str, str]  # (Backends.name, the target's upstream URL)
# One verdict as the supervisor sends it (worker/control.py): (backends name, target URL,
# checked up, seconds since that state began, seconds a passive mark-down still lasts).
Verdict = Sequence[Any]


class TargetHealth:
    __slots__ = ("key", "checked_up", "down_until", "changed_at", "failures", "first_failure")

    def __init__(self, key: TargetKey) -> None:
        self.key = key
        self.checked_up = True  # the supervisor's verdict (active check or shared passive)
        self.down_until = 0.0  # loop time until which this worker's passive check keeps it out
        # When it last came back up; slow_start ramps from there. A target first seen is not
        # ramped (HAProxy's slowstart does not apply at start either): the supervisor's
        # verdict sets a real time when it did come back recently.
        self.changed_at = -math.inf
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
        # Set by the control channel: sends a passive mark-down to the supervisor, never waits.
        self.reporter: Callable[[TargetKey, float], None] | None = None

    def health(self, key: TargetKey) -> TargetHealth:
        health = self._targets.get(key)
        if health is None:
            health = self._targets[key] = TargetHealth(key)
        return health

    def apply(self, verdicts: Iterable[Verdict]) -> None:
        """The supervisor's verdicts. A target this worker has not used yet gets its entry now,
        so the route made on its first request starts from the shared state. Times come as
        durations (the supervisor's clock is not this loop's)."""
        now = self._clock()
        for name, url, up, since, down_for in verdicts:
            first_seen = (name, url) not in self._targets
            health = self.health((name, url))
            up = bool(up)
            if health.checked_up != up or (first_seen and up):
                health.checked_up = up
                # slow_start ramps from when it came back, on every worker alike
                health.changed_at = now - max(float(since), 0.0)
            if down_for > 0:
                until = now + float(down_for)
                if until > health.down_until:
                    health.down_until = until
                    health.changed_at = until

    def report_down(self, key: TargetKey, until: float) -> None:
        """This worker's passive checks marked `key` down until loop time `until` (`failed`
        returned True): the supervisor tells the other workers. Does not wait."""
        if self.reporter is not None:
            self.reporter(key, until - self._clock())

    def marked_down(self, health: TargetHealth) -> None:
        """`health.failed` returned True: report it (WorkerContext.target_down)."""
        self.report_down(health.key, health.down_until)
