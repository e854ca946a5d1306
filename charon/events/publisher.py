"""The worker's side of the event bus: batched, non-blocking, bounded (decision 13).

Events are packed at once into one msgpack buffer (the only cost on the request path) and sent
as one message per FLUSH_INTERVAL, or sooner when MAX_BATCH events wait. Packing at once, rather
than keeping the event tuples until the flush, matters: tuples that live for tens of
milliseconds survive the young garbage collections and make every collection slower. The ZeroMQ
PUSH socket has a bounded high-water mark and is never waited on: when the supervisor is slow
or gone, a batch that does not fit is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from array import array
from typing import Any

import msgpack
import zmq

from charon.events.schema import CONTROL, RECORDS, REQUEST_COLUMNS, pack_text

log = logging.getLogger("charon.events")

FLUSH_INTERVAL = 0.05
MAX_BATCH = 512
# Batches queued toward the supervisor (in this worker) before new ones are dropped. With the
# supervisor's own queue of as many, a worker holds at most ~100 batches (a few MiB at full
# load) for a stalled supervisor: 1.5 s of events at 33k requests/s, 5 s at low rates.
SEND_HWM = 50


_header_packer = msgpack.Packer()


def _array_header(count: int) -> bytes:
    return _header_packer.pack_array_header(count)  # type: ignore[no-any-return]


class RequestColumns:
    """The REQUEST records of the batch being gathered, one list per field (FIELDS[REQUEST]):
    a request costs eight appends; the batch is packed once, at the flush."""

    __slots__ = (
        "time", "host", "method", "status", "duration", "response_bytes", "client_ip", "path",
    )

    def __init__(self) -> None:
        self.time: list[float] = []
        self.host: list[str] = []
        self.method: list[str] = []
        self.status: list[int] = []
        self.duration: list[float] = []
        self.response_bytes: list[int] = []
        self.client_ip: list[str] = []
        self.path: list[str] = []

    def __len__(self) -> int:
        return len(self.time)

    def pack(self) -> list[Any]:
        """[count, column, ...]: numbers as native arrays' bytes, text joined with NUL."""
        packed: list[Any] = [len(self)]
        for name, typecode in REQUEST_COLUMNS:
            values = getattr(self, name)
            packed.append(array(typecode, values).tobytes() if typecode else pack_text(values))
            values.clear()
        return packed


assert RequestColumns.__slots__ == tuple(name for name, _ in REQUEST_COLUMNS)


class EventPublisher:
    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: str | None, worker_id: int):
        self.loop = loop
        self.worker_id = worker_id
        self.pid = os.getpid()
        self.dropped = 0  # records lost, in all
        # When the records lost since the last METRICS went (time.time()); 0.0: none lost.
        self.dropped_first = 0.0
        self.dropped_last = 0.0
        self._packer = msgpack.Packer(autoreset=False)
        self._count = 0  # records queued: events in the packer's buffer, and `requests`
        # REQUEST records, appended to by Telemetry.request; None when events go nowhere.
        self.requests: RequestColumns | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._socket: zmq.Socket[bytes] | None = None
        if endpoint:
            # Made here, in the worker process: a ZeroMQ context must not cross a fork.
            self._context = zmq.Context(io_threads=1)
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self._socket = sock
            self.requests = RequestColumns()

    def emit(self, event: tuple[Any, ...]) -> None:
        """Queue one event (not a REQUEST: those go into `requests`); never blocks."""
        if self._socket is None:
            return
        self._packer.pack(event)
        self.added()

    def added(self) -> None:
        """A record was queued (by `emit`, or appended to `requests`): flush when due."""
        self._count += 1
        if self._count >= MAX_BATCH:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        count, self._count = self._count, 0
        requests = self.requests
        if not count or requests is None or self._socket is None:
            return
        packer = self._packer
        # [request columns, events]: the events as one msgpack array, its header and then the
        # events packed one by one (see schema.unpack_records).
        events = count - len(requests)
        columns = msgpack.packb(requests.pack() if events < count else None)
        packed = _array_header(2) + columns + _array_header(events) + packer.bytes()
        packer.reset()
        try:
            message = [RECORDS, self.worker_id, self.pid, count, packed]
            self._socket.send(msgpack.packb(message), zmq.NOBLOCK)
        except zmq.Again:
            self._lost(count)
        except zmq.ZMQError as exc:
            self._lost(count)
            log.debug("event batch dropped: %s", exc)

    def _lost(self, count: int) -> None:
        self.dropped += count
        self.dropped_last = time.time()
        if not self.dropped_first:
            self.dropped_first = self.dropped_last

    def send_now(self, event: tuple[Any, ...]) -> bool:
        """Send one event as its own message at once; False if it could not be queued."""
        self.flush()
        if self._socket is None:
            return False
        try:
            message = [CONTROL, self.worker_id, self.pid, [event]]
            self._socket.send(msgpack.packb(message), zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def close(self) -> None:
        self.flush()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None
