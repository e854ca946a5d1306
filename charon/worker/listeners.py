"""The worker's side of the shared listening sockets, with accept back-off (decision 1).

All workers wait on the same accept queue, and Linux wakes the most recently idle one first: when
connections arrive one at a time (WebSockets opening through the day) one worker collects most of
them. So each worker writes its count of open client connections into a small table shared by
all workers (a memfd the supervisor made), and a worker holding clearly more than the mean stops
accepting until it is back near it. The worker with the fewest connections is never above the
mean, so some worker always accepts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import mmap
import os
import socket
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING

from charon.worker.limits.server import release as release_seat

if TYPE_CHECKING:
    from charon.config.model import ListenAddress
    from charon.worker.proxydoor import ProxyDoor
    from charon.worker.websocket._engine import Engine

log = logging.getLogger("charon.worker")

PAUSE_ABOVE = 1.25  # pause accepting above this many times the mean ...
PAUSE_SLACK = 8  # ... plus this many connections (no flapping at small numbers)
RESUME_AT = 1.05  # accept again at or below this many times the mean plus RESUME_SLACK
RESUME_SLACK = 2
PAUSED_RECHECK = 0.05  # seconds between looks at the table while not accepting

def fds_bound_to(fds: Iterable[int], addresses: Iterable[ListenAddress]) -> frozenset[int]:
    """Which of the inherited listening `fds` are bound to one of `addresses` (by the socket's
    own address: the supervisor passes them all alike, socket activation's included)."""
    wanted = {(ipaddress.ip_address(a.host), a.port) for a in addresses}
    if not wanted:
        return frozenset()
    found = set()
    for fd in fds:
        sock = socket.socket(fileno=fd)
        try:
            name = sock.getsockname()
        finally:
            sock.detach()
        if isinstance(name, tuple) and (ipaddress.ip_address(name[0]), name[1]) in wanted:
            found.add(fd)
    return frozenset(found)


_SLOT = struct.Struct("q")
TABLE_SLOTS = 256
TABLE_SIZE = _SLOT.size * TABLE_SLOTS


def create_table() -> int:
    """The shared table's fd (made by the supervisor; inherited by every worker)."""
    fd = os.memfd_create("charon-connections", 0)
    os.ftruncate(fd, TABLE_SIZE)
    return fd


def clear_slot(fd: int, generation: int, worker_id: int) -> None:
    """The supervisor's part: a worker that exited counts no connection any more (a SIGKILL
    leaves its last count; [server] max_connections adds up every slot)."""
    os.pwrite(fd, bytes(_SLOT.size), slot_of(generation, worker_id) * _SLOT.size)


def slot_of(generation: int, worker_id: int) -> int:
    """A worker's slot in the table: each generation of workers has a range of its own."""
    return (generation * GENERATION_SLOTS) % TABLE_SLOTS + worker_id % GENERATION_SLOTS


_ALL = struct.Struct(f"{TABLE_SLOTS}q")
GENERATION_SLOTS = 64  # each generation of workers (see reload) has its own range of slots


class LoadTable:
    """This worker's slot in the shared table, and the mean over its generation's slots."""

    def __init__(self, fd: int, generation: int, worker_id: int, workers: int) -> None:
        self._map = mmap.mmap(fd, TABLE_SIZE)
        os.close(fd)
        self.first = (generation * GENERATION_SLOTS) % TABLE_SLOTS
        self.slot = slot_of(generation, worker_id)
        self.workers = max(1, min(workers, GENERATION_SLOTS))
        self._mean_format = struct.Struct(f"{self.workers}q")
        self.count = 0
        # The mean counts this worker too (mean >= count / workers), so up to this count the
        # pause test below cannot pass and the table need not be read.
        share = 1 - PAUSE_ABOVE / self.workers
        self.never_above = PAUSE_SLACK / share if share > 0 else float("inf")
        self.write(0)

    def write(self, count: int) -> None:
        self.count = count
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, count)

    def total(self) -> int:
        """Open client connections of every worker, all generations ([server] max_connections)."""
        return sum(_ALL.unpack_from(self._map, 0))

    def mean(self) -> float:
        return sum(self._mean_format.unpack_from(self._map, self.first * _SLOT.size)) / self.workers


class Listeners:
    """The inherited listening fds, served by the engine's front door (door.c); pauses and
    resumes accepting by load."""

    def __init__(
        self, engine: Engine, fds: list[int], table: LoadTable | None,
        tls_fds: frozenset[int] = frozenset(),
        proxied: frozenset[int] = frozenset(),
        proxy_door: ProxyDoor | None = None,
    ) -> None:
        self.tls_fds = tls_fds  # the TLS listeners among fds
        # The PROXY protocol listeners among fds: accepted by proxy_door, not the engine.
        self.proxied = proxied
        self.proxy_door = proxy_door
        self.engine = engine
        self.fds = fds  # ours (the supervisor keeps its own): closed when this worker stops
        self.table = table
        self.paused = False
        self.closed = False
        self.loop = asyncio.get_running_loop()

    def start(self) -> None:
        for fd in self.fds:
            os.set_blocking(fd, False)  # the front door takes until the queue is empty
            if fd in self.proxied and self.proxy_door is not None:
                self.proxy_door.watch(fd, tls=fd in self.tls_fds)
            else:
                self.engine.listen(fd, tls=fd in self.tls_fds)

    def set_proxied(self, proxied: frozenset[int]) -> None:
        """A reload in place changed which listeners take a PROXY header: the same sockets
        are accepted on by the other side from now on (connections accepted before keep the
        way they started)."""
        if proxied == self.proxied:
            return
        if self.closed or self.paused:
            self.proxied = proxied  # (start() uses it when accepting again)
            return
        self._stop_accepting()
        self.proxied = proxied
        self.start()

    def opened(self, count: int = 1) -> None:
        table = self.table
        if table is None:
            return
        table.write(table.count + count)
        if (
            not self.paused
            and table.count > table.never_above
            and table.count > table.mean() * PAUSE_ABOVE + PAUSE_SLACK
        ):
            self.paused = True
            self._stop_accepting()
            # Others' counts move too: look again soon, or two workers could both stay paused.
            self.loop.call_later(PAUSED_RECHECK, self._recheck)

    def closed_one(self, seat: int = -1) -> None:
        """A client connection ended; `seat`: its [server] max_connections_per_ip count."""
        if seat >= 0:
            release_seat(seat)
        table = self.table
        if table is None:
            return
        table.write(table.count - 1)
        if self.paused:
            self.check()

    def check(self) -> None:
        """Accept again once near the mean (also called each second: others' counts move),
        or after the front door ran out of fds (its listening fds left the epoll set)."""
        error = self.engine.take_accept_error()
        if error and not self.closed:
            log.warning("accepting paused for a second: %s", os.strerror(error))
            if not self.paused:
                self.start()
        table = self.table
        if (
            self.paused
            and not self.closed
            and table is not None
            and table.count <= table.mean() * RESUME_AT + RESUME_SLACK
        ):
            self.paused = False
            self.start()

    def _recheck(self) -> None:
        if self.paused and not self.closed:
            self.check()
            self.loop.call_later(PAUSED_RECHECK, self._recheck)

    def close(self) -> None:
        """Stop accepting for good (drain, retire); the table no longer counts this worker."""
        self.closed = True
        self._stop_accepting()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        # The count is kept up to date while the connections end: a worker retired by TTOU stays
        # in its generation's mean until it is gone.

    def _stop_accepting(self) -> None:
        for fd in self.fds:
            self.engine.unlisten(fd)
            if self.proxy_door is not None:
                self.proxy_door.unwatch(fd)
