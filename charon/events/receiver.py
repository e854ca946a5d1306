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

from charon.events.schema import CONTROL, RECORDS

log = logging.getLogger("charon.events")

RECEIVE_HWM = 50  # batches per worker; beyond this ZeroMQ pushes back and workers drop and count
MAX_MESSAGES_PER_TURN = 64  # batches read in one loop turn; the rest on the next


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
    """Reads the PULL socket whenever ZeroMQ signals it, without a Future per message.

    zmq.asyncio's `await recv()` costs a Future, a reader registration and a loop turn for
    every message; here one wake-up reads every batch that is queued (bounded per turn)."""

    def __init__(self, hub: EventHub, endpoint: str | None = None) -> None:
        self.hub = hub
        self.endpoint = endpoint or default_endpoint()
        self.bad_messages = 0
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1

    def start(self) -> None:
        self._socket.bind(self.endpoint)
        self._loop = asyncio.get_running_loop()
        fd = self._socket.getsockopt(zmq.FD)
        assert isinstance(fd, int)
        self._fd = fd
        self._loop.add_reader(self._fd, self._drain)
        self._loop.call_soon(self._drain)  # the FD signals edges: what came before is read now

    def _drain(self) -> None:
        # ZeroMQ's FD is edge-triggered: read until nothing is left. A flood is read over several
        # loop turns (no new edge would come for what is left, so the next turn is scheduled).
        socket = self._socket
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                message = socket.recv(zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again: nothing left; another error: closed by stop()
                return
            self._handle(message)
        assert self._loop is not None
        self._loop.call_soon(self._drain)

    def _handle(self, message: bytes) -> None:
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
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        self._socket.close(linger=0)
        self._context.term()
        if self.endpoint.startswith("ipc://"):
            with contextlib.suppress(OSError):
                os.unlink(self.endpoint[len("ipc://") :])
