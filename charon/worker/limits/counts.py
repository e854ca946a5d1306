"""Counts shared by all workers (open requests and WebSockets per host and per client IP,
client connections per IP), with a ledger per worker so a dead worker's counts are given back.

A count is one 64-bit word in the shared table (table.py): a 31-bit fingerprint of its key and
a 32-bit count. A key's words are those of its set with its fingerprint (two workers may start
one each at once); its count is their sum; a word whose count is 0 is free. Taking a count adds
first and checks after: past the limit it gives the unit back and refuses, so two racing takes
may both refuse the last place but never both get it.

Each worker also writes what it holds of each word in its own ledger (a region of the table the
size of the count regions; only its owner writes it): the supervisor, reaping a worker that
died holding counts (a crash, SIGKILL, a drain cut short), subtracts its ledger from the counts
and clears it (`give_back`). A take adds to the count before the ledger, a release takes from
the ledger first: a worker killed in between leaks at most one unit, never gives back one it
did not hold. A set whose 8 words all hold other keys' counts cannot count one more key: it is
let through uncounted (UNTRACKED; at 16,384 IP words, only under a flood of distinct addresses
each holding something open).
"""

from __future__ import annotations

import struct

from charon.worker.limits import table as layout
from charon.worker.limits.table import SharedTable, shared_table
from charon.worker.websocket._engine import atomic_add, atomic_cas

COUNT_MASK = 0xFFFFFFFF
FINGERPRINTS = (1 << 31) - 1
MAX_TRIES = 16
DENIED = -1
UNTRACKED = -2  # admitted, nothing to give back
_SET = struct.Struct(f"{layout.WAYS}q")
_WORD = struct.Struct("q")


class Ledger:
    """One worker's holdings of each count word (its slot of the ledgers region)."""

    def __init__(self, shared: SharedTable, slot: int) -> None:
        self.map = shared.map
        self.base = (layout.LEDGERS + slot * layout.COUNT_WORDS - layout.COUNT_IP) * layout.WORD

    def add(self, index: int, delta: int) -> None:
        at = self.base + index * layout.WORD
        _WORD.pack_into(self.map, at, _WORD.unpack_from(self.map, at)[0] + delta)


class CountTable:
    def __init__(
        self, shared: SharedTable, first: int, sets: int, ledger: Ledger | None = None
    ) -> None:
        self.shared = shared
        self.map = shared.map
        self.first = first
        self.sets = sets
        self.ledger = ledger

    def _where(self, key: bytes) -> tuple[int, int]:
        h = self.shared.hash(key)
        return self.first + (h % self.sets) * layout.WAYS, (h >> 32) % FINGERPRINTS + 1

    def count(self, key: bytes) -> int:
        base, fp = self._where(key)
        return _total(_SET.unpack_from(self.map, base * layout.WORD), fp)

    def acquire(self, key: bytes, limit: int) -> int:
        """One unit of `key`'s count if it stays within `limit` (0: no limit): the word to
        give it back to (`release`), DENIED, or UNTRACKED."""
        base, fp = self._where(key)
        mark = fp << 32
        for _ in range(MAX_TRIES):
            words = _SET.unpack_from(self.map, base * layout.WORD)
            if limit and _total(words, fp) >= limit:
                return DENIED
            way = -1
            for i, word in enumerate(words):
                if word >> 32 == fp and (word & COUNT_MASK or way < 0):
                    way = i
                    if word & COUNT_MASK:
                        break
            if way < 0:
                for i, word in enumerate(words):
                    if not word & COUNT_MASK:
                        way = i
                        break
                else:
                    return UNTRACKED
            old = words[way]
            new = old + 1 if old >> 32 == fp else mark | 1
            if not atomic_cas(self.map, base + way, old, new):
                continue
            index = base + way
            if limit and _total(_SET.unpack_from(self.map, base * layout.WORD), fp) > limit:
                atomic_add(self.map, index, -1)  # another take raced this one: both refuse
                return DENIED
            if self.ledger is not None:
                self.ledger.add(index, 1)
            return index
        return UNTRACKED

    def release(self, index: int) -> None:
        if index < 0:
            return
        if self.ledger is not None:
            self.ledger.add(index, -1)
        atomic_add(self.map, index, -1)


def _total(words: tuple[int, ...], fp: int) -> int:
    return sum(word & COUNT_MASK for word in words if word >> 32 == fp)


def per_ip(shared: SharedTable | None = None, ledger: Ledger | None = None) -> CountTable:
    return CountTable(shared or shared_table(), layout.COUNT_IP, layout.COUNT_IP_SETS, ledger)


def per_host(shared: SharedTable | None = None, ledger: Ledger | None = None) -> CountTable:
    return CountTable(shared or shared_table(), layout.COUNT_HOST, layout.COUNT_HOST_SETS, ledger)


def give_back(shared: SharedTable, slot: int) -> int:
    """The supervisor's part: subtract a reaped worker's ledger from the counts, clear it;
    the units given back."""
    start = (layout.LEDGERS + slot * layout.COUNT_WORDS) * layout.WORD
    end = start + layout.COUNT_WORDS * layout.WORD
    region = memoryview(shared.map)[start:end].cast("q")
    given = 0
    try:
        for i, held in enumerate(region):
            if held <= 0:
                continue
            index = layout.COUNT_IP + i
            for _ in range(MAX_TRIES * 4):
                word = _WORD.unpack_from(shared.map, index * layout.WORD)[0]
                take = min(held, word & COUNT_MASK)  # never below zero (into the fingerprint)
                if atomic_cas(shared.map, index, word, word - take):
                    given += take
                    break
    finally:
        region.release()
    shared.map[start:end] = bytes(end - start)
    return given
