"""The supervisor's control channel: a socketpair end each worker inherits (--control-fd).

Both directions carry length-prefixed messages, a "!II" header then the payload:
- supervisor to worker: (config version, length), then the validated Config, pickled with its
  equal parts shared (config/sharing.py: unpickling 1,000 hosts costs ~2 ms of CPU, parsing
  their TOML ~160);
- worker to supervisor: (config version, length), then an error ("" when applied).
The worker reads with the loop's add_reader and applies a whole message in one callback, so
the swap falls between two events of its loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
from collections.abc import Callable

from charon.config.model import Config

log = logging.getLogger("charon.worker")

HEADER = struct.Struct("!II")
MAX_MESSAGE = 16 * 1024 * 1024  # a config larger than this is refused, not buffered


def encode(version: int, payload: bytes) -> bytes:
    return HEADER.pack(version, len(payload)) + payload


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
    "") goes back with the version."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, fd: int, apply: Callable[[Config], str]
    ) -> None:
        self._loop = loop
        self._fd = fd
        self._apply = apply
        self._reader = MessageReader()
        os.set_blocking(fd, False)

    def start(self) -> None:
        self._loop.add_reader(self._fd, self._readable)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

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
            try:
                error = self._apply(pickle.loads(payload))
            except Exception as exc:  # a worker that cannot apply says so and is replaced
                log.exception("cannot apply config version %d", version)
                error = f"{type(exc).__name__}: {exc}"
            self._reply(version, error)

    def _reply(self, version: int, error: str) -> None:
        message = encode(version, error.encode("utf-8")[:4096])
        try:
            os.write(self._fd, message)  # small, on a socket the supervisor reads: no wait
        except OSError as exc:
            log.warning("control channel: cannot answer: %s", exc)
