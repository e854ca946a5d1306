"""Notices of the records workers lost, for the live log.

A worker never waits on the event bus (decision 13): when the supervisor is slow or stopped, the
worker drops whole batches and counts them. The count reaches the supervisor in the worker's next
METRICS (which is kept and sent again until it gets through), with when the losses happened.
From the rise of that count this makes one DROPPED event, so a /logs reader is told where its
stream has a hole, how big, and which worker's records are missing: the same rise that
charon_events_dropped_total counts (admin/metrics.py), so the two agree.
"""

from __future__ import annotations

import time
from typing import Any

from charon.events.schema import DROPPED, METRICS, WORKER_EXIT

BY_WORKER = "worker"  # the `by` of a notice from a worker's losses
BY_STREAM = "stream"  # the `by` of a notice from a subscriber's own full queue
# How long an exited worker's count is kept: its last METRICS may come after its exit is seen.
EXITED_MEMORY = 60.0


class DropNotices:
    def __init__(self) -> None:
        self._seen: dict[int, int] = {}  # pid -> its events_dropped count already told
        self._exited: dict[int, float] = {}  # pid -> when its exit was seen

    def notices(self, pid: int, batch: list[list[Any]]) -> list[list[Any]]:
        """DROPPED events for the losses a batch of control events reveals (most have none)."""
        found: list[list[Any]] = []
        for event in batch:
            kind = event[0] if event else None
            if kind == METRICS and len(event) > 2 and isinstance(event[2], dict):
                notice = self._rise(pid, event[2])
                if notice is not None:
                    found.append(notice)
            elif kind == WORKER_EXIT and len(event) > 3:
                self._forget_exited(event[3])
        return found

    def _forget_exited(self, pid: int) -> None:
        now = time.monotonic()
        self._exited[pid] = now
        for old in [p for p, at in self._exited.items() if now - at > EXITED_MEMORY]:
            del self._exited[old]
            self._seen.pop(old, None)

    def _rise(self, pid: int, gauges: dict[str, Any]) -> list[Any] | None:
        dropped = gauges.get("events_dropped")
        if type(dropped) is not int:
            return None
        before = self._seen.get(pid, 0)
        self._seen[pid] = dropped
        # A count below the last one is a new process reusing the pid: all of it is new.
        count = dropped - before if dropped >= before else dropped
        if count <= 0:
            return None
        now = time.time()
        since, last = now, now
        span = gauges.get("events_dropped_span")
        if isinstance(span, list) and len(span) == 2:
            since, last = span
        return [DROPPED, last, count, since, pid, BY_WORKER]
