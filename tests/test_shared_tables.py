"""The shared limits table (charon/worker/limits/): GCRA buckets and counts over the engine's
atomics, hammered from several processes sharing one memfd as the workers do, the supervisor's
give-back of a killed process's ledger, and a flood of distinct keys that cannot grow it."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest

from charon.worker.limits import counts, rates, table
from charon.worker.limits.table import SharedTable

pytestmark = pytest.mark.timeout(60)
_fork = multiprocessing.get_context("fork")


def _hammer_rate(fd: int, tries: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    shared = SharedTable(fd)
    limit = rates.per_ip(shared)
    out.put(sum(1 for _ in range(tries) if limit.take(b"one key", 10**9, 500) == 0.0))


def _hammer_counts(fd: int, slot: int, rounds: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    shared = SharedTable(fd)
    host = counts.per_host(shared, counts.Ledger(shared, slot))
    high = 0
    for _ in range(rounds):
        got = host.acquire(b"the host", 3)
        if got >= 0:
            high = max(high, host.count(b"the host"))
            host.release(got)
    out.put(high)


def _hold_and_wait(fd: int, slot: int, ready: multiprocessing.Event) -> None:  # type: ignore[type-arg]
    shared = SharedTable(fd)
    ips = counts.per_ip(shared, counts.Ledger(shared, slot))
    for i in range(50):
        assert ips.acquire(b"ip %d" % (i % 7), 0) >= 0
    ready.set()
    signal.pause()


def test_gcra_admits_burst_then_one_per_interval() -> None:
    limit = rates.per_ip(SharedTable())
    now = rates.now_us()
    assert [limit.take(b"k", 100_000, 3, now) for _ in range(4)][:3] == [0.0] * 3
    assert limit.take(b"k", 100_000, 3, now) == pytest.approx(0.1)  # a refusal took nothing
    assert limit.take(b"k", 100_000, 3, now + 100_000) == 0.0  # one token back per interval
    assert limit.take(b"k", 100_000, 3, now + 100_000) > 0
    assert limit.take(b"other", 100_000, 3, now) == 0.0  # keys do not share


def test_time_wraps_safely() -> None:
    limit = rates.per_ip(SharedTable())
    near_end = rates.TIME_MASK - 50_000
    assert limit.take(b"k", 100_000, 1, near_end) == 0.0
    assert limit.take(b"k", 100_000, 1, (near_end + 60_000) & rates.TIME_MASK) > 0
    assert limit.take(b"k", 100_000, 1, (near_end + 100_000) & rates.TIME_MASK) == 0.0


def test_refund_gives_the_token_back() -> None:
    limit = rates.per_host(SharedTable())
    now = rates.now_us()
    assert limit.take(b"h", 10**9, 1, now) == 0.0
    limit.refund(b"h", 10**9)
    assert limit.take(b"h", 10**9, 1, now) == 0.0


def test_failure_counter_blocks_after_ten() -> None:
    failures = rates.FailureCounter(SharedTable())
    assert all(failures.take("192.0.2.1") == 0.0 for _ in range(10))
    assert failures.blocked("192.0.2.1") > 5.0
    assert failures.blocked("192.0.2.2") == 0.0
    assert failures.blocked("192.0.2.2") == 0.0  # looking takes nothing


def test_a_full_set_evicts_the_bucket_closest_to_full() -> None:
    shared = SharedTable()
    limit = rates.RateTable(shared, table.RATE_IP, 1)  # one set: every key shares it
    now = rates.now_us()
    for i in range(table.WAYS):  # each bucket emptied to a different depth
        for _ in range(i + 1):
            limit.take(b"key %d" % i, 10**6, 20, now)
    assert limit.take(b"new", 10**6, 20, now) == 0.0
    words = [int.from_bytes(shared.map[(table.RATE_IP + i) * 8:][:8], "little")
             for i in range(table.WAYS)]
    assert len(set(w >> rates.TIME_BITS for w in words)) == table.WAYS
    for _ in range(19):  # the deepest bucket kept its state: it has 12 tokens left, not 20
        limit.take(b"key 7", 10**6, 20, now)
    assert limit.take(b"key 7", 10**6, 20, now) > 0


def test_cas_races_from_two_processes_lose_no_update() -> None:
    fd = table.create_table()
    try:
        out: multiprocessing.Queue[int] = _fork.Queue()
        procs = [_fork.Process(target=_hammer_rate, args=(os.dup(fd), 4000, out))
                 for _ in range(2)]
        for p in procs:
            p.start()
        admitted = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        # One interval is longer than the test: exactly the burst is admitted over both.
        assert sum(admitted) == 500, admitted
    finally:
        os.close(fd)


def test_counts_never_pass_their_limit_under_races() -> None:
    fd = table.create_table()
    try:
        out: multiprocessing.Queue[int] = _fork.Queue()
        procs = [_fork.Process(target=_hammer_counts, args=(os.dup(fd), slot, 3000, out))
                 for slot in range(3)]
        for p in procs:
            p.start()
        highs = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        assert max(highs) <= 3 and max(highs) >= 1
        shared = SharedTable(os.dup(fd))
        assert counts.per_host(shared).count(b"the host") == 0
    finally:
        os.close(fd)


def test_a_killed_holder_counts_are_given_back() -> None:
    fd = table.create_table()
    try:
        shared = SharedTable(os.dup(fd))
        ips = counts.per_ip(shared)
        mine = ips.acquire(b"ip 1", 0)  # held by this process (no ledger), kept
        ready = _fork.Event()
        p = _fork.Process(target=_hold_and_wait, args=(os.dup(fd), 5, ready))
        p.start()
        assert ready.wait(20)
        assert sum(ips.count(b"ip %d" % i) for i in range(7)) == 51
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert counts.give_back(shared, 5) == 50
        assert [ips.count(b"ip %d" % i) for i in range(7)] == [0, 1, 0, 0, 0, 0, 0]
        assert counts.give_back(shared, 5) == 0  # the ledger was cleared
        ips.release(mine)
        assert ips.count(b"ip 1") == 0
    finally:
        os.close(fd)


def test_counts_per_set_are_bounded() -> None:
    shared = SharedTable()
    ips = counts.CountTable(shared, table.COUNT_IP, 1)  # one set of 8 words
    held = [ips.acquire(b"ip %d" % i, 1) for i in range(table.WAYS)]
    assert all(h >= 0 for h in held)
    assert ips.acquire(b"one more", 1) == counts.UNTRACKED  # let through, not counted
    assert ips.acquire(b"ip 0", 1) == counts.DENIED
    ips.release(held[0])
    assert ips.acquire(b"one more", 1) >= 0  # a word whose count is 0 is free


def test_a_flood_of_addresses_stays_in_the_table() -> None:
    shared = SharedTable()
    limit = rates.per_ip(shared)
    now = rates.now_us()
    for i in range(60_000):
        limit.take(b"zone\0" + str(i).encode(), 10**6, 5, now)
    assert len(shared.map) == table.TABLE_SIZE  # (fixed: nothing else holds state)
    # Recent keys are still there (a set holds the 8 closest to empty).
    assert limit.take(b"zone\0" + b"59999", 10**6, 1, now) > 0
