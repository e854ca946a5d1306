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
from typing import Any

import msgpack
import zmq

from charon.events.schema import CONTROL, RECORDS

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


class EventPublisher:
    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: str | None, worker_id: int):
        self.loop = loop
        self.worker_id = worker_id
        self.pid = os.getpid()
        self.dropped = 0
        self._packer = msgpack.Packer(autoreset=False)
        self._count = 0  # events in the packer's buffer
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

    def emit(self, event: tuple[Any, ...]) -> None:
        """Queue one event; never blocks."""
        if self._socket is None:
            return
        self._packer.pack(event)
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
        if not count or self._socket is None:
            return
        packer = self._packer
        # The events as one msgpack array: its header, then the events packed one by one.
        packed = _array_header(count) + packer.bytes()
        packer.reset()
        try:
            message = [RECORDS, self.worker_id, self.pid, count, packed]
            self._socket.send(msgpack.packb(message), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += count
        except zmq.ZMQError as exc:
            self.dropped += count
            log.debug("event batch dropped: %s", exc)

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
