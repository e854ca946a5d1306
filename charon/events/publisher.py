"""The worker's side of the event bus: batched, non-blocking, bounded (decision 13).

Events are appended to a list (the only cost on the request path) and sent as one msgpack
message per FLUSH_INTERVAL, or sooner when MAX_BATCH events wait. The ZeroMQ PUSH socket has a
bounded high-water mark and is never waited on: when the supervisor is slow or gone, a batch
that does not fit is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import msgpack
import zmq

log = logging.getLogger("charon.events")

FLUSH_INTERVAL = 0.05
MAX_BATCH = 512
SEND_HWM = 200  # batches queued toward the supervisor before new ones are dropped


class EventPublisher:
    def __init__(self, loop: asyncio.AbstractEventLoop, endpoint: str | None, worker_id: int):
        self.loop = loop
        self.worker_id = worker_id
        self.pid = os.getpid()
        self.dropped = 0
        self._batch: list[Any] = []
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
        batch = self._batch
        batch.append(event)
        if len(batch) >= MAX_BATCH:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self.loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch, self._batch = self._batch, []
        if not batch or self._socket is None:
            return
        try:
            self._socket.send(msgpack.packb([self.worker_id, self.pid, batch]), zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += len(batch)
        except zmq.ZMQError as exc:
            self.dropped += len(batch)
            log.debug("event batch dropped: %s", exc)

    def send_now(self, event: tuple[Any, ...]) -> bool:
        """Send one event as its own message at once; False if it could not be queued."""
        self.flush()
        if self._socket is None:
            return False
        try:
            self._socket.send(msgpack.packb([self.worker_id, self.pid, [event]]), zmq.NOBLOCK)
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
