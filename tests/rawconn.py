"""One raw keep-alive client connection that reads whole responses (Content-Length bodies)
and leaves what follows (WebSocket frames) in `buf`: for tests that need exact bytes."""

from __future__ import annotations

import socket

from test_websocket_handshake import Head


class RawConn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def fill(self) -> bool:
        """Read once more into `buf`; False at EOF."""
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self, request: bytes) -> tuple[Head, bytes]:
        """Send `request`; the response's head and (Content-Length) body."""
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            if not self.fill():
                raise EOFError(f"closed before a response: {bytes(self.buf)!r}")
        end = self.buf.index(b"\r\n\r\n") + 4
        raw = bytes(self.buf[:end])
        del self.buf[:end]
        lines = raw[:-4].decode("latin-1").split("\r\n")
        fields = [(n.strip(), v.strip()) for n, _, v in (x.partition(":") for x in lines[1:])]
        head = Head(int(lines[0].split(" ")[1]), fields, raw)
        length = int(head.get("Content-Length") or 0)
        while len(self.buf) < length and self.fill():
            pass
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return head, body

    def closed(self) -> bool:
        """The proxy closes the connection (after what it sent)."""
        self.sock.settimeout(5)
        try:
            return not self.fill()
        except ConnectionResetError:
            return True
