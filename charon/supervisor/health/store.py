"""Where the supervisor keeps its targets' verdicts: the one interface a shared store replaces.

Today the verdicts live in this process (`MemoryStore`). Several Charon machines could share
them by an implementation of `VerdictStore` over Valkey/Redis (a hash per key, a pub/sub
channel for changes): the monitor writes its own verdicts with `put` and learns every change,
its own and other machines', from the callbacks given to `watch`; the workers are told from
there. Times are wall-clock (seconds since the epoch) so they mean the same on every machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from charon.worker.upstreams.health import TargetKey

ACTIVE = "active"  # a verdict from the active check
PASSIVE = "passive"  # a worker's passive checks marked the target down


@dataclass(frozen=True)
class Verdict:
    up: bool  # the active check's verdict (True until a check says otherwise)
    since: float  # when `up` last changed (wall clock)
    reason: str  # what the last change was about
    down_until: float = 0.0  # a passive mark-down lasts until then (wall clock; 0: none)
    source: str = ACTIVE  # what made the last change: ACTIVE or PASSIVE

    def healthy(self, now: float) -> bool:
        return self.up and now >= self.down_until


class VerdictStore(Protocol):
    def get(self, key: TargetKey) -> Verdict | None: ...

    def put(self, key: TargetKey, verdict: Verdict) -> None:
        """Record a verdict; every watcher is told (here at once, in the caller's turn)."""

    def remove(self, key: TargetKey) -> None: ...

    def items(self) -> list[tuple[TargetKey, Verdict]]: ...

    def watch(self, callback: Callable[[TargetKey, Verdict], None]) -> None:
        """Call `callback` for every verdict put from now on, by anyone."""


class MemoryStore:
    """The verdicts of this supervisor, in its memory."""

    def __init__(self) -> None:
        self._verdicts: dict[TargetKey, Verdict] = {}
        self._watchers: list[Callable[[TargetKey, Verdict], None]] = []

    def get(self, key: TargetKey) -> Verdict | None:
        return self._verdicts.get(key)

    def put(self, key: TargetKey, verdict: Verdict) -> None:
        self._verdicts[key] = verdict
        for callback in self._watchers:
            callback(key, verdict)

    def remove(self, key: TargetKey) -> None:
        self._verdicts.pop(key, None)

    def items(self) -> list[tuple[TargetKey, Verdict]]:
        return list(self._verdicts.items())

    def watch(self, callback: Callable[[TargetKey, Verdict], None]) -> None:
        self._watchers.append(callback)
