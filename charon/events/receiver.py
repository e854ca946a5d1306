"""The supervisor's end of the event bus: a ZeroMQ PULL socket read in the asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from typing import Any, Protocol

import msgpack
import zmq
import zmq.asyncio

from charon.events.schema import CONTROL, RECORDS

log = logging.getLogger("charon.events")

RECEIVE_HWM = 50  # batches per worker; beyond this ZeroMQ pushes back and workers drop and count


class EventSink(Protocol):
    def on_batch(self, worker_id: int, pid: int, batch: list[list[Any]]) -> None:
        """Events to act on, decoded."""

    def on_records(self, worker_id: int, pid: int, count: int, packed: bytes) -> None:
        """`count` live-log records, still msgpack-packed: decode them only if needed."""


class EventHub:
    """Hands every event, from workers and from the supervisor itself, to each sink."""

    def __init__(self) -> None:
        self._sinks: list[EventSink] = []

    def add_sink(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def dispatch(self, worker_id: int, pid: int, batch: list[list[Any]]) -> None:
        # Whole batches: a sink that only keeps them (the live log with nobody watching) pays
        # nothing per event.
        for sink in self._sinks:
            try:
                sink.on_batch(worker_id, pid, batch)
            except Exception:  # one sink's bug must not starve the others
                log.exception("event sink %r failed on a batch of %d", sink, len(batch))

    def records(self, worker_id: int, pid: int, count: int, packed: bytes) -> None:
        for sink in self._sinks:
            try:
                sink.on_records(worker_id, pid, count, packed)
            except Exception:
                log.exception("event sink %r failed on %d records", sink, count)

    def supervisor_event(self, event: list[Any]) -> None:
        self.dispatch(-1, os.getpid(), [event])


def default_endpoint() -> str:
    folder = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    if not folder or not os.access(folder, os.W_OK):
        folder = tempfile.gettempdir()
    return f"ipc://{folder}/charon-{os.getpid()}.events"


class EventReceiver:
    def __init__(self, hub: EventHub, endpoint: str | None = None) -> None:
        self.hub = hub
        self.endpoint = endpoint or default_endpoint()
        self.bad_messages = 0
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._socket.bind(self.endpoint)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            message = await self._socket.recv()
            try:
                tag, worker_id, pid, *rest = msgpack.unpackb(message)
                if tag == RECORDS:
                    count, packed = rest
                    self.hub.records(worker_id, pid, count, packed)
                elif tag == CONTROL:
                    self.hub.dispatch(worker_id, pid, rest[0])
                else:
                    raise ValueError(f"unknown message tag {tag!r}")
            except Exception:  # a bad message must not stop the bus
                self.bad_messages += 1
                log.exception("bad event message dropped")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._socket.close(linger=0)
        self._context.term()
        if self.endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint[len("ipc://") :])
