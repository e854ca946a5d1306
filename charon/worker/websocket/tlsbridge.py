"""A WebSocket tunnel's backend leg over TLS (an https:// upstream).

The engine copies and walks frames between raw sockets, and a TLS session of Python's `ssl`
cannot be handed to C. So the engine gets one end of a socketpair as the tunnel's backend
socket, and this bridge copies plaintext between the other end and the uvloop TLS transport
of the backend connection. The engine's frame tracking, pings, close codes and drains work
unchanged; the backend leg costs a Python copy per read in each direction.
"""

from __future__ import annotations

import asyncio
import socket

READ_SIZE = 256 * 1024


class TlsBridge(asyncio.Protocol):
    """Becomes the protocol of `backend` (a TLS transport); `engine_end` is for the tunnel."""

    def __init__(self, loop: asyncio.AbstractEventLoop, backend: asyncio.Transport) -> None:
        self.engine_end, self.own = socket.socketpair()
        self.own.setblocking(False)
        self.loop = loop
        self.backend = backend
        self.pending = bytearray()  # plaintext from the backend the engine has not taken yet
        self.backend_gone = False
        self.closed = False
        self.reading = True  # the engine's end is watched for bytes toward the backend
        backend.set_protocol(self)
        loop.add_reader(self.own.fileno(), self._from_engine)

    def start(self) -> None:
        """The tunnel took its duplicate of `engine_end`: ours is not needed any more."""
        self.engine_end.close()
        self.backend.resume_reading()

    # -- backend -> engine ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.pending:
            self.pending += data
            return
        try:
            sent = self.own.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close()
            return
        if sent < len(data):
            self.pending += data[sent:]
            self.backend.pause_reading()  # until the engine takes what waits
            self.loop.add_writer(self.own.fileno(), self._flush)

    def _flush(self) -> None:
        try:
            sent = self.own.send(self.pending)
        except BlockingIOError:
            return
        except OSError:
            self._close()
            return
        del self.pending[:sent]
        if self.pending:
            return
        self.loop.remove_writer(self.own.fileno())
        if self.backend_gone:
            self._close()
        else:
            self.backend.resume_reading()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost ends the engine's side

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend_gone = True
        if not self.pending:  # else after the engine took the rest (the backend's Close)
            self._close()

    # -- engine -> backend ---------------------------------------------------------------

    def _from_engine(self) -> None:
        try:
            data = self.own.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the tunnel ended: the backend's TLS session closes cleanly
            self._close()
            return
        if not self.backend_gone:
            self.backend.write(data)

    def pause_writing(self) -> None:
        if self.reading and not self.closed:
            self.reading = False
            self.loop.remove_reader(self.own.fileno())

    def resume_writing(self) -> None:
        if not self.reading and not self.closed:
            self.reading = True
            self.loop.add_reader(self.own.fileno(), self._from_engine)

    def discard(self) -> None:
        """No tunnel after all: the socketpair goes; the backend is left to the caller."""
        self.backend_gone = True
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        fd = self.own.fileno()
        self.loop.remove_reader(fd)
        self.loop.remove_writer(fd)
        self.own.close()  # the engine reads the end of the backend's stream
        self.engine_end.close()
        if not self.backend_gone:
            self.backend.close()
