"""Rate limits shared by all workers: GCRA token buckets in the shared table (table.py).

A bucket is one 64-bit word: a 19-bit fingerprint of its key and its theoretical arrival time
(TAT), in microseconds of CLOCK_MONOTONIC (one clock for every process of the machine) modulo
2^44 (203 days; times are compared wrap-safe, as differences in (-2^43, 2^43)). A bucket of
`burst` tokens refilled one per `interval` admits a request when TAT' = max(TAT, now) +
interval is at most now + burst * interval, and stores TAT'; a refusal stores nothing (a refused
request takes no token) and says when a token comes: TAT' - now - burst * interval.

Keys hash into a set of 8 words: the word with the key's fingerprint is its bucket; a word whose
TAT has passed is a full bucket, i.e. free; a new key takes a free word or, the set being full,
evicts the bucket closest to full (which loses at most the tokens it had not got back yet).
Updates are a compare-and-swap of the whole word; the set is read without a lock (a torn or
stale read only makes the CAS fail), and after MAX_TRIES failed CAS in a row the request is let
through (never seen outside a test hammering one key from many processes).
"""

from __future__ import annotations

import struct
import time

from charon.worker.limits import table as layout
from charon.worker.limits.table import SharedTable, shared_table
from charon.worker.websocket._engine import atomic_cas

TIME_BITS = 44
TIME_MASK = (1 << TIME_BITS) - 1
HALF = 1 << (TIME_BITS - 1)
MAX_TOLERANCE = HALF // 2  # burst * interval is capped (50 days): comparisons stay wrap-safe
FINGERPRINTS = (1 << 19) - 1  # fingerprints are 1..2^19-1 (a zero word is an empty one)
MAX_TRIES = 16
_SET = struct.Struct(f"{layout.WAYS}q")
WAY_MASK = layout.WAYS - 1  # (WAYS is a power of two)
KNOWN_KEYS = 4096  # keys whose place is remembered per table (hashing costs 1 µs)


_monotonic_ns = time.monotonic_ns


def now_us() -> int:
    return (_monotonic_ns() // 1000) & TIME_MASK


def _ahead(a: int, b: int) -> int:
    """a - b for two times modulo 2^44 less than 2^43 apart."""
    return ((a - b + HALF) & TIME_MASK) - HALF


def tolerance(interval: int, burst: int) -> int:
    """How far ahead of now a bucket's TAT may be: burst * interval, capped (MAX_TOLERANCE)."""
    return min(interval * burst, MAX_TOLERANCE)


class RateTable:
    """A region of GCRA buckets (per client IP, or per host)."""

    def __init__(self, shared: SharedTable, first: int, sets: int) -> None:
        self.shared = shared
        self.map = shared.map
        self.words = shared.words
        self.first = first
        self.sets = sets
        self._known: dict[bytes, tuple[int, int]] = {}

    def place(self, key: bytes) -> tuple[int, int]:
        """(first word of the set, fingerprint) of `key`'s bucket: remembered for the last
        KNOWN_KEYS keys (hashing costs a microsecond)."""
        where = self._known.get(key)
        if where is None:
            h = self.shared.hash(key)
            where = self.first + (h % self.sets) * layout.WAYS, (h >> 32) % FINGERPRINTS + 1
            if len(self._known) >= KNOWN_KEYS:
                self._known.clear()  # (a flood of addresses: start again, bounded)
            self._known[key] = where
        return where

    def take(self, key: bytes, interval: int, burst: int, now: int | None = None) -> float:
        """One token of `key`'s bucket (`interval` microseconds per token, `burst` tokens):
        0.0 if taken, else the seconds until one comes."""
        return self.take_at(self.place(key), interval, tolerance(interval, burst), now)

    def take_at(
        self, where: tuple[int, int], interval: int, tolerance: int, now: int | None = None
    ) -> float:
        """`take` for a bucket placed by `place`, with the `tolerance` of its burst (a route's
        limit computes both once, not per request)."""
        base, fp = where
        mark = fp << TIME_BITS
        shared = self.map
        # The usual case first: the key's bucket in its home way (one word read, one CAS).
        home = base + (fp & WAY_MASK)
        word = self.words[home]
        if word >> TIME_BITS == fp:
            t = (_monotonic_ns() // 1000) & TIME_MASK if now is None else now
            ahead = ((word - t + HALF) & TIME_MASK) - HALF
            new_ahead = ahead + interval if ahead > 0 else interval
            if new_ahead > tolerance:
                return (new_ahead - tolerance) / 1e6
            if atomic_cas(shared, home, word, mark | ((t + new_ahead) & TIME_MASK)):
                return 0.0
        home_way = fp & WAY_MASK
        for _ in range(MAX_TRIES):
            t = now_us() if now is None else now
            words = _SET.unpack_from(shared, base * layout.WORD)
            way = -1
            tat = t
            spare = 0
            spare_rank = float("inf")
            for i, word in enumerate(words):
                ahead = _ahead(word & TIME_MASK, t) if word else 0
                if word >> TIME_BITS == fp:
                    if ahead > 0:
                        way, tat = i, word & TIME_MASK
                        break
                    rank = -2.0  # its own expired bucket
                elif ahead <= 0:  # free (empty or expired): the home way first, so the next
                    rank = -1.0 if i == home_way else 0.0  # take finds it with one read
                else:
                    rank = float(ahead)  # in use: the one closest to full is evicted
                if rank < spare_rank:
                    spare, spare_rank = i, rank
            if way < 0:
                way = spare
            new_ahead = _ahead(tat, t) + interval if _ahead(tat, t) > 0 else interval
            if new_ahead > tolerance:
                return (new_ahead - tolerance) / 1e6
            if atomic_cas(shared, base + way, words[way], mark | ((t + new_ahead) & TIME_MASK)):
                return 0.0
        return 0.0

    def refund(self, key: bytes, interval: int) -> None:
        """Give back a token taken by `take` (a later limit of the same request refused it)."""
        self.refund_at(self.place(key), interval)

    def refund_at(self, where: tuple[int, int], interval: int) -> None:
        base, fp = where
        for _ in range(MAX_TRIES):
            words = _SET.unpack_from(self.map, base * layout.WORD)
            for i, word in enumerate(words):
                if word >> TIME_BITS == fp:
                    tat = (word - interval) & TIME_MASK
                    if atomic_cas(self.map, base + i, word, (fp << TIME_BITS) | tat):
                        return
                    break
            else:
                return


def per_ip(shared: SharedTable | None = None) -> RateTable:
    return RateTable(shared or shared_table(), layout.RATE_IP, layout.RATE_IP_SETS)


def per_host(shared: SharedTable | None = None) -> RateTable:
    return RateTable(shared or shared_table(), layout.RATE_HOST, layout.RATE_HOST_SETS)


FAILURES_BURST = 10
FAILURES_INTERVAL = 6_000_000  # one failure forgiven per 6 s


class FailureCounter:
    """Failed authentication attempts per client IP (auth14): a bucket of 10 refilled one per
    6 s in the shared per-IP rate table, so every worker sees a client's failures."""

    def __init__(self, shared: SharedTable | None = None) -> None:
        self.rates = per_ip(shared)

    def take(self, ip: str) -> float:
        """Count a failure of `ip`: 0.0, or (the bucket empty) the seconds to wait, uncounted."""
        return self.rates.take(b"auth-failures\0" + ip.encode(), FAILURES_INTERVAL, FAILURES_BURST)

    def blocked(self, ip: str) -> float:
        """Seconds before `ip` may fail again (0.0: it may try now); counts nothing."""
        wait = self.take(ip)
        if not wait:
            self.rates.refund(b"auth-failures\0" + ip.encode(), FAILURES_INTERVAL)
        return wait
