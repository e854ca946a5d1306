"""The tunnel engine driven directly over two socketpairs: the test plays the client and the
backend of one Tunnel, decides where reads are cut (each chunk is read by the engine before the
next is sent), and sees exactly the bytes the engine forwards. No Charon process: the walker's
properties can be checked on thousands of inputs in seconds."""

from __future__ import annotations

import contextlib
import fcntl
import select
import socket
import struct
import termios
import time
from dataclasses import dataclass, field

from charon.worker.websocket._engine import BACKEND, CLIENT, Engine, Tunnel

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
NO_LIMIT = 2**63 - 1


@dataclass(frozen=True)
class WsFrame:
    opcode: int
    payload: bytes
    fin: bool = True
    mask: bytes | None = None  # 4 bytes: a masked frame (every client frame)
    wide: int = 0  # 0: shortest length encoding, 2 or 8: that many length bytes anyway

    def header(self) -> bytes:
        n = len(self.payload)
        b0 = (0x80 if self.fin else 0) | self.opcode
        m = 0x80 if self.mask is not None else 0
        if self.wide == 8 or n > 0xFFFF:
            head = struct.pack("!BBQ", b0, m | 127, n)
        elif self.wide == 2 or n > 125:
            head = struct.pack("!BBH", b0, m | 126, n)
        else:
            head = struct.pack("!BB", b0, m | n)
        return head + (self.mask or b"")

    def wire(self) -> bytes:
        body = self.payload
        if self.mask is not None:
            body = bytes(c ^ self.mask[i & 3] for i, c in enumerate(body))
        return self.header() + body


@dataclass
class Pair:
    """One Engine and one started Tunnel; `client` and `backend` are the test's ends."""

    max_frame_size: int = NO_LIMIT
    engine: Engine = field(init=False)
    tunnel: Tunnel = field(init=False)
    reports: list[tuple[int, int]] = field(default_factory=list)
    got: dict[int, bytearray] = field(
        default_factory=lambda: {CLIENT: bytearray(), BACKEND: bytearray()})

    def __post_init__(self) -> None:
        self.engine = Engine()
        self.client, self._client_proxy = socket.socketpair()
        self._backend_proxy, self.backend = socket.socketpair()
        # The tunnel works on its own copies; the test keeps these to see what is unread.
        self.tunnel = Tunnel(self.engine, self._client_proxy.fileno(),
                             self._backend_proxy.fileno(), self.max_frame_size)
        self.tunnel.start(b"", b"", b"")
        for s in (self.client, self.backend):
            s.setblocking(False)

    def close(self) -> None:
        self.tunnel.finish()
        for s in (self.client, self.backend, self._client_proxy, self._backend_proxy):
            s.close()

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self) -> None:
        result = self.engine.run()
        if result is not None and result[0]:
            self.reports.extend((flags, code) for _, flags, code in result[0])

    def unread(self, side: int) -> int:
        """Bytes the engine has not read yet from `side`."""
        proxy = self._client_proxy if side == CLIENT else self._backend_proxy
        buf = fcntl.ioctl(proxy.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])

    def drain(self) -> bool:
        """Take what the engine forwarded to both ends; whether anything came."""
        came = False
        for side, sock in ((CLIENT, self.client), (BACKEND, self.backend)):
            while True:
                try:
                    chunk = sock.recv(1 << 20)
                except (BlockingIOError, ConnectionError):
                    break
                if not chunk:
                    break
                self.got[side] += chunk
                came = True
        return came

    def deliver(self, side: int, data: bytes, timeout: float = 5.0) -> None:
        """Send data from `side`'s peer and run the engine until it has read all of it (or
        it reported something, e.g. a refused frame that stops its reads)."""
        sock = self.client if side == CLIENT else self.backend
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if view:
                with contextlib.suppress(BlockingIOError):
                    view = view[sock.send(view):]
            self.run()
            self.drain()
            if self.reports or (not view and not self.unread(side)):
                break
            select.select([self.engine.fileno()], [], [], 0.01)
        self.run()
        self.drain()

    def received(self, side: int, timeout: float = 5.0) -> bytes:
        """Everything the engine forwarded to `side`, once it is idle: this process alone
        drives it, so with nothing drained and its epoll fd not readable, nothing is coming."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.run()
            if not self.drain() and not select.select([self.engine.fileno()], [], [], 0)[0]:
                break
        return bytes(self.got[side])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """data in pieces at the given offsets (sorted, deduplicated, empty pieces dropped)."""
    edges = [0, *sorted({p for p in points if 0 < p < len(data)}), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]
