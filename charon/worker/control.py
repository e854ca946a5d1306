"""The supervisor's control channel: a socketpair end each worker inherits (--control-fd).

Both directions carry length-prefixed messages, a "!II" header then the payload:
- supervisor to worker: (config version, length), then the validated Config, pickled with its
  equal parts shared (config/sharing.py: unpickling 1,000 hosts costs ~2 ms of CPU, parsing
  their TOML ~160);
- worker to supervisor: (config version, length), then an error ("" when applied).
The worker reads with the loop's add_reader and applies a whole message in one callback, so
the swap falls between two events of its loop.

Health messages (issue 13) share the channel: their first header field is HEALTH (0; config
versions start at 1), their payload a msgpack array whose first element says what it is:
- supervisor to worker: ["verdicts", seq, [[backends name, url, up, since, down_for], ...]]:
  the supervisor's verdicts (`since`: seconds the state has lasted; `down_for`: seconds a
  passive mark-down by some worker still lasts, 0 for none), applied by HealthBoard.apply;
- worker to supervisor: ["applied", seq] once it applied them (the supervisor measures how
  fast a change reached every worker), and ["down", backends name, url, down_for] when its
  own passive checks marked a target down (HealthBoard.report_down).
Both ends write through an out-buffer, so a message never interleaves with another one that
only partly went out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
from collections.abc import Callable
from typing import Any

import msgpack

from charon.config.model import Config
from charon.worker.upstreams.health import HealthBoard, TargetKey

log = logging.getLogger("charon.worker")

HEADER = struct.Struct("!II")
MAX_MESSAGE = 16 * 1024 * 1024  # a config larger than this is refused, not buffered
HEALTH = 0  # the version field of a health message
VERDICTS, APPLIED, DOWN = "verdicts", "applied", "down"
MAX_OUT = 4 * 1024 * 1024  # health messages waiting for a supervisor that reads nothing: dropped


def encode(version: int, payload: bytes) -> bytes:
    return HEADER.pack(version, len(payload)) + payload


def encode_health(message: list[Any]) -> bytes:
    return encode(HEALTH, msgpack.packb(message))


def decode_health(payload: bytes) -> list[Any]:
    """A health message's array; ValueError if it is not one."""
    try:
        message = msgpack.unpackb(payload)
    except Exception as exc:
        raise ValueError(f"bad health message: {exc}") from None
    if not isinstance(message, list) or not message or not isinstance(message[0], str):
        raise ValueError("bad health message: not a tagged array")
    return message


class MessageReader:
    """Whole messages out of a byte stream, each at most MAX_MESSAGE bytes."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The messages `data` completes; ValueError when one announces too much."""
        buffer = self._buffer
        buffer += data
        messages = []
        while len(buffer) >= HEADER.size:
            version, length = HEADER.unpack_from(buffer)
            if length > MAX_MESSAGE:
                raise ValueError(f"control message of {length} bytes")
            end = HEADER.size + length
            if len(buffer) < end:
                break
            messages.append((version, bytes(buffer[HEADER.size:end])))
            del buffer[:end]
        return messages


class ControlChannel:
    """The worker's end: each config it receives goes to `apply`, whose answer (an error, or
    "") goes back with the version; health verdicts go to `board`, and the board's passive
    mark-downs go back up."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        apply: Callable[[Config], str],
        board: HealthBoard | None = None,
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._apply = apply
        self._board = board
        self._reader = MessageReader()
        self._out = bytearray()
        self.dropped = 0  # health messages that found the out-buffer full
        os.set_blocking(fd, False)
        if board is not None:
            board.reporter = self.report_down

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._readable)
        # Verdicts the supervisor sent at spawn are applied before the first request is served.
        self._readable()

    def close(self) -> None:
        if self._board is not None:
            self._board.reporter = None
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            if self._out:
                self._loop.remove_writer(self._fd)
                self._out.clear()
            os.close(self._fd)
            self._fd = -1

    def report_down(self, key: TargetKey, down_for: float) -> None:
        self._send(encode_health([DOWN, key[0], key[1], round(down_for, 3)]), droppable=True)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("control channel: %s", exc)
            data = b""
        if not data:  # the supervisor is gone: orphan.py handles that
            self.close()
            return
        try:
            messages = self._reader.feed(data)
        except ValueError as exc:
            log.error("control channel: %s; closing it", exc)
            self.close()
            return
        for version, payload in messages:
            if version == HEALTH:
                self._health(payload)
                continue
            try:
                error = self._apply(pickle.loads(payload))
            except Exception as exc:  # a worker that cannot apply says so and is replaced
                log.exception("cannot apply config version %d", version)
                error = f"{type(exc).__name__}: {exc}"
            self._send(encode(version, error.encode("utf-8")[:4096]))

    def _health(self, payload: bytes) -> None:
        try:
            message = decode_health(payload)
            if message[0] != VERDICTS or self._board is None:
                return
            _, seq, verdicts = message
            self._board.apply(verdicts)
        except (ValueError, TypeError) as exc:  # one bad message is skipped, not fatal
            log.error("control channel: %s", exc)
            return
        self._send(encode_health([APPLIED, seq]), droppable=True)

    def _send(self, message: bytes, droppable: bool = False) -> None:
        """Write `message` after what is still waiting; never blocks."""
        if self._fd < 0:
            return
        if self._out:
            if droppable and len(self._out) > MAX_OUT:
                self.dropped += 1
                return
            self._out += message
            return
        try:
            sent = os.write(self._fd, message)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.warning("control channel: cannot write: %s", exc)
            return
        if sent < len(message):
            self._out += message[sent:]
            self._loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        try:
            sent = os.write(self._fd, self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("control channel: cannot write: %s", exc)
            sent = len(self._out)
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self._fd)
