"""Live-log records from several workers, delivered in time order.

Each worker sends its records in batches, every FLUSH_INTERVAL (50 ms) or per 512 records, each
batch in its own time order; batches of different workers arrive interleaved, so without help
worker 1's records of the last 50 ms could follow worker 0's newer ones. `TimeOrder` holds each
record until WINDOW seconds after its time (the `time` field, the worker's wall clock, which is
the supervisor's: same machine) and releases what is due in time order. WINDOW is four flush
intervals: a batch leaves its worker at most 50 ms after its oldest record and the ZeroMQ hop
adds well under a millisecond when the supervisor is not stalled, so the window covers a flush
that came a loop turn or two late; a person reading a live log does not notice 0.2 s. A record
that arrives later than that (a worker or the supervisor stalled) is not held: it goes out at
once, out of order, rather than stall the others. What is due is released as each batch comes
(and by a timer between batches), so a release is about a batch's size, not a window's: a
subscriber's queue is bounded.

Records are held only while someone reads the live log: with no subscriber the section keeps
batches packed and nothing passes through here.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Any

WINDOW = 0.2  # seconds a record waits for older ones from other workers (see above)

# (worker id, event) in time order
Release = Callable[[list[tuple[int, list[Any]]]], None]


class TimeOrder:
    """Holds events (arrays whose element 1 is their time) for WINDOW, releases them sorted."""

    def __init__(
        self, release: Release, window: float = WINDOW, clock: Callable[[], float] = time.time
    ) -> None:
        self._release = release
        self.window = window
        self._clock = clock
        self._heap: list[tuple[float, int, int, list[Any]]] = []  # time, arrival, worker, event
        self._arrival = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, worker_id: int, events: list[list[Any]], at: float | None = None) -> None:
        """Hold `events` (ordered by their own time, or all at `at`)."""
        heap, arrival = self._heap, self._arrival
        for event in events:
            stamp = event[1] if at is None else at
            if type(stamp) is not float and type(stamp) is not int:
                stamp = 0.0  # (a malformed record: at once, not held)
            heapq.heappush(heap, (stamp, next(arrival), worker_id, event))
        # What is due goes out now (see above: releases the size of a batch).
        self._release_due()
        self._schedule()

    def pending(self) -> set[int]:
        """The ids of the events held now (a new subscriber's backlog leaves them out: they
        reach it when released)."""
        return {id(entry[3]) for entry in self._heap}

    def clear(self) -> None:
        """Nobody reads any more: drop what is held (the backlog ring has it)."""
        self._heap.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flush(self) -> None:
        """Release every event due now, then wait for the next one."""
        self._timer = None
        self._release_due()
        self._schedule()

    def _release_due(self) -> None:
        heap = self._heap
        due = self._clock() - self.window
        out: list[tuple[int, list[Any]]] = []
        while heap and heap[0][0] <= due:
            _, _, worker_id, event = heapq.heappop(heap)
            out.append((worker_id, event))
        if out:
            self._release(out)

    def _schedule(self) -> None:
        if not self._heap or self._timer is not None:
            return
        delay = self._heap[0][0] + self.window - self._clock()
        if delay <= 0:
            delay = 0.0
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test feeding the section directly): no holding
            self._release_all()
            return
        self._timer = loop.call_later(delay, self.flush)

    def _release_all(self) -> None:
        heap, self._heap = self._heap, []
        heap.sort()
        self._release([(worker_id, event) for _, _, worker_id, event in heap])
