"""A small raw-socket HTTP/1.x client for the data-path tests: exact bytes in, exact bytes out.

Every socket operation has a timeout; a response is parsed by its own framing (1xx, HEAD,
Content-Length, chunked, or until close) so tests can see precisely what the proxy wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

HOST = "127.0.0.1"


@dataclass
class Response:
    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[str, str]]
    head: bytes  # the raw head, final CRLF included
    body: bytes = b""
    framing: str = ""  # "none", "length", "chunked" or "close"
    interim: list[Response] = field(default_factory=list)  # 1xx responses before this one

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def has(self, name: str) -> bool:
        return bool(self.all(name))

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """One client connection; `read_response` parses whatever the server sends next."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()  # a failed test: the proxy must not keep a half-closed exchange
        self.close()

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        """Close with an RST (SO_LINGER 0): the proxy sees the client gone, not a half-close."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError("connection closed by the server")
        self.buf += chunk

    def read_until(self, sep: bytes, limit: int = 1 << 20) -> bytes:
        start = 0
        while True:
            at = self.buf.find(sep, start)
            if at != -1:
                out = bytes(self.buf[: at + len(sep)])
                del self.buf[: at + len(sep)]
                return out
            if len(self.buf) > limit:
                raise AssertionError(f"no {sep!r} within {limit} bytes")
            start = max(0, len(self.buf) - len(sep) + 1)
            self._fill()

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_all(self) -> bytes:
        """Everything until the server closes the connection."""
        while True:
            try:
                self._fill()
            except EOFError:
                out = bytes(self.buf)
                self.buf.clear()
                return out

    def read_head(self) -> Response:
        head = self.read_until(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            assert sep, f"malformed header line {line!r}"
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        return Response(version, int(code), reason, headers, head)

    def read_response(self, head_request: bool = False, sink: Any = None) -> Response:
        """The next final response (1xx ones are collected in `interim`).

        `sink(chunk)`, when given, receives the body instead of `Response.body` (big bodies).
        """
        interim = []
        while True:
            resp = self.read_head()
            if 100 <= resp.status < 200 and resp.status != 101:
                interim.append(resp)
                continue
            break
        resp.interim = interim
        parts: list[bytes] = []
        put = sink if sink is not None else parts.append
        te = resp.header("Transfer-Encoding")
        length = resp.header("Content-Length")
        if head_request or resp.status in (101, 204, 304):
            resp.framing = "none"
        elif te is not None:
            assert te.lower().replace(" ", "").split(",")[-1] == "chunked", te
            resp.framing = "chunked"
            while True:
                size_line = self.read_until(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while self.read_until(b"\r\n") != b"\r\n":
                        pass  # trailer fields
                    break
                self._stream(size, put)
                assert self.read_exact(2) == b"\r\n", "chunk not followed by CRLF"
        elif length is not None:
            resp.framing = "length"
            self._stream(int(length), put)
        else:
            resp.framing = "close"
            while True:
                if self.buf:
                    put(bytes(self.buf))
                    self.buf.clear()
                try:
                    self._fill()
                except EOFError:
                    break
        resp.body = b"".join(parts)
        return resp

    def _stream(self, n: int, put: Any) -> None:
        while n > 0:
            if not self.buf:
                self._fill()
            take = min(n, len(self.buf))
            put(bytes(self.buf[:take]))
            del self.buf[:take]
            n -= take

    def closed_within(self, timeout: float) -> bool:
        """True when the server closes (FIN or RST) within `timeout` with nothing more sent."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        if data:
            self.buf += data
            return False
        return True


def request(port: int, data: bytes, head_request: bool = False, timeout: float = 5.0) -> Response:
    """Send one raw request on a new connection and parse the response."""
    with Client(port, timeout) as client:
        client.send(data)
        return client.read_response(head_request)


def get(
    port: int, host: str, target: str = "/echo", extra: str = "", method: str = "GET"
) -> Response:
    data = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"
    return request(port, data.encode("latin-1"), head_request=method == "HEAD")


class Hasher:
    """A sink for `read_response`: counts and hashes a body as it arrives."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.length = 0

    def __call__(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.length += len(chunk)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
