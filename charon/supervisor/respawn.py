"""When a dead worker's slot gets a new process, and when the supervisor gives up.

Two kinds of death are told apart by whether the worker ever said it serves (its "R" beat):

- A worker that died before serving failed to start (bad config beyond what validation sees,
  a missing module, no memory): the same will likely happen again, so these deaths back off
  from 0.5 s up to STARTUP_BACKOFF_MAX, and MAX_STARTUP_FAILURES in a row with no worker
  serving make the supervisor give up.
- A worker that served and then died (killed by the OOM killer or an operator, a crash on one
  request) is replaced forever: the machine can serve, only this process is gone. Its slot
  backs off only if its workers keep dying (up to CRASH_BACKOFF_MAX, so a burst of kills cannot
  make a slot spin, nor leave it empty for long), and starts again at once after a worker that
  served for STABLE_AFTER.
"""

from __future__ import annotations

STARTUP_BACKOFF_MAX = 30.0
MAX_STARTUP_FAILURES = 5  # in a row, with no worker serving: give up
CRASH_BACKOFF_FIRST = 0.25  # the second crash in a row of a slot; doubled each time after
CRASH_BACKOFF_MAX = 3.0
STABLE_AFTER = 30.0  # a worker that served this long before dying starts its slot's count again


class Respawn:
    """The supervisor's count of start-up failures; each slot keeps its own crash count."""

    def __init__(self) -> None:
        self.startup_failures = 0

    def reset(self) -> None:
        """A new generation (reload): its start-up is judged afresh."""
        self.startup_failures = 0

    def delay(self, served: bool, lived: float, crashes: int) -> tuple[float, int]:
        """(seconds before the slot's next worker starts, the slot's new crash count) for a
        worker that died after `lived` seconds, `served` if it had said it serves."""
        if not served:
            self.startup_failures += 1
            return startup_backoff(self.startup_failures), crashes
        self.startup_failures = 0
        crashes = 1 if lived >= STABLE_AFTER else crashes + 1
        return crash_backoff(crashes), crashes

    def giving_up(self, serving: int) -> bool:
        return self.startup_failures >= MAX_STARTUP_FAILURES and serving == 0


def startup_backoff(failures: int) -> float:
    """0.5 s after the first failure to start, doubling up to STARTUP_BACKOFF_MAX."""
    return min(0.5 * 2 ** (failures - 1), STARTUP_BACKOFF_MAX) if failures > 0 else 0.0


def crash_backoff(crashes: int) -> float:
    """At once after a slot's first crash, then CRASH_BACKOFF_FIRST doubling up to the cap."""
    if crashes <= 1:
        return 0.0
    return min(CRASH_BACKOFF_FIRST * 2 ** (crashes - 2), CRASH_BACKOFF_MAX)
