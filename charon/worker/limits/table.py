"""The shared limits table: one memfd made by the supervisor before it starts any worker, mapped
by every worker (like the accept back-off table of worker/listeners.py), its size fixed.

Words are 64-bit, updated with the engine's atomics (compare-and-swap, add). The regions:

| region       | words                  | what                                                   |
| ------------ | ---------------------- | ------------------------------------------------------ |
| header       | 8                      | the hash key (random, written by the supervisor)       |
| rate, by ip  | 16,384 sets x 8 ways   | GCRA buckets per (zone, client IP), auth failures      |
| rate, host   | 512 sets x 8 ways      | GCRA buckets per zone (`by = "host"`), never evicted by |
|              |                        | per-IP ones                                            |
| count, ip    | 2,048 sets x 8 ways    | open requests / WebSockets / connections per client IP |
| count, host  | 512 sets x 8 ways      | the same per host                                      |
| ledgers      | 64 x (both count areas)| each worker's own holdings, given back by the          |
|              |                        | supervisor when the worker dies                        |

Memory: 1 MiB + 32 KiB of rate buckets, 160 KiB of counts, and 64 ledgers of 160 KiB
(10 MiB), 11.4 MiB of address space in all, allocated by the kernel only for the pages
touched: the rate and count areas in full once busy, a ledger only where its worker holds
something. It never grows: an address-spraying flood only replaces buckets (table.py's sets
are 8-way; the entry closest to expiry goes), it cannot make the table bigger.

Keys are hashed with a keyed BLAKE2b (the key is random per supervisor) so that no client can
pick addresses that crowd one set: the low bits choose the set, others make a fingerprint.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets

WORD = 8
WAYS = 8
HEADER_WORDS = 8
RATE_IP_SETS = 1 << 14
RATE_HOST_SETS = 512
COUNT_IP_SETS = 1 << 11
COUNT_HOST_SETS = 512
LEDGER_SLOTS = 64  # workers alive at once (all generations); more run without a ledger

RATE_IP = HEADER_WORDS  # first word of each region
RATE_HOST = RATE_IP + RATE_IP_SETS * WAYS
COUNT_IP = RATE_HOST + RATE_HOST_SETS * WAYS
COUNT_HOST = COUNT_IP + COUNT_IP_SETS * WAYS
COUNT_WORDS = (COUNT_IP_SETS + COUNT_HOST_SETS) * WAYS  # both count regions, one ledger's size
LEDGERS = COUNT_HOST + COUNT_HOST_SETS * WAYS
TOTAL_WORDS = LEDGERS + LEDGER_SLOTS * COUNT_WORDS
TABLE_SIZE = TOTAL_WORDS * WORD
_KEY_BYTES = 16


class SharedTable:
    """The mapped table: its buffer (for the atomics) and its hash key."""

    def __init__(self, fd: int = -1) -> None:
        """`fd`: the supervisor's memfd (the mapping keeps it; the fd is closed); -1: a
        private table (a process of its own, unit tests)."""
        if fd < 0:
            self.map = mmap.mmap(-1, TABLE_SIZE)
            self.map[WORD : WORD + _KEY_BYTES] = secrets.token_bytes(_KEY_BYTES)
        else:
            self.map = mmap.mmap(fd, TABLE_SIZE)
            os.close(fd)
        self.key = bytes(self.map[WORD : WORD + _KEY_BYTES])
        # The words, for reads (a 64-bit item read is cheaper than a struct unpack); writes
        # go through the engine's atomics. (The map is never closed: this view lives with it.)
        self.words = memoryview(self.map).cast("q")

    def hash(self, data: bytes) -> int:
        """64 bits of a keyed hash of `data` (the same in every worker)."""
        return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self.key).digest(), "little")


def create_table() -> int:
    """The table's fd, with a fresh hash key (made by the supervisor; inherited by workers)."""
    fd = os.memfd_create("charon-limits", 0)
    os.ftruncate(fd, TABLE_SIZE)
    os.pwrite(fd, secrets.token_bytes(_KEY_BYTES), WORD)
    return fd


_installed: SharedTable | None = None


def install(table: SharedTable) -> None:
    """The worker's table (main.py, from the supervisor's fd)."""
    global _installed
    _installed = table


def shared_table() -> SharedTable:
    """The table every limit of this process uses: the supervisor's, or a private one for a
    process started without it (a worker in a unit test)."""
    global _installed
    if _installed is None:
        _installed = SharedTable()
    return _installed
