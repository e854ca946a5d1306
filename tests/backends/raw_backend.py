"""A raw asyncio backend that misbehaves on purpose; binds 127.0.0.1 only, exits on SIGTERM.

    python tests/backends/raw_backend.py --port PORT

It reads a request head, then acts according to the path (the query is ignored):
  /ok                 200 "conn=<connection number> req=<request number on it>", keep-alive
  /blob?size=N        200 with Content-Length: N, head and body in one write, keep-alive
  /early-hints        103 Early Hints (with a Link header), then a 200
  /continue           if `Expect: 100-continue`: 100 Continue; then reads the Content-Length
                      body and answers 200 "expect=<0|1> length=<n>"
  /garbage            non-HTTP bytes, then close
  /bad-length         200 with `Content-Length: abc`
  /obs-fold           200 with a folded header line
  /truncated          Content-Length: 100, only 10 body bytes, close
  /truncated-chunked  a chunked body cut before its last chunk, close
  /close-delimited    200 with no framing; `?size=N` body bytes (default 100000), then close
  /no-answer          reads and never answers (until the peer closes)
  /extra-bytes        a complete response and junk bytes in the same write
  /extra-response     a complete response and a second, smuggled one in the same write
  /reset              closes at once with SO_LINGER 0 (an RST)
  /stall              Content-Length: 100, 10 body bytes, then silence (until the peer closes)
  /te-gzip            200 with `Transfer-Encoding: gzip, chunked` (a gzip member, chunked)
  /te-gzip-close      200 with `Transfer-Encoding: gzip`: close-delimited (RFC 9112 6.3), close
  /204-length         204 with a (forbidden) Content-Length: 3
  /head               HEAD: Content-Length: 5 and no body; GET: "hello"; keep-alive
Anything else: 404.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import signal
import socket
import struct

_conn_ids = itertools.count(1)

GZIP_CONTENT = b"hello from a transfer-coded body\n" * 10


def close_delimited_body(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, bytes, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    method, target, _ = lines[0].split(b" ", 2)
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn_id = next(_conn_ids)
    requests = 0
    try:
        while True:
            try:
                method, target, headers = await _read_head(reader)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                return
            requests += 1
            path, _, query = target.partition(b"?")
            if not await _act(path, query, method, headers, reader, writer, conn_id, requests):
                return
    except (ConnectionError, asyncio.CancelledError):
        return
    finally:
        if not writer.is_closing():
            writer.close()


async def _act(
    path: bytes,
    query: bytes,
    method: bytes,
    headers: dict[bytes, bytes],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    conn_id: int,
    requests: int,
) -> bool:
    """Answer one request; False closes the connection."""
    w = writer.write
    if path == b"/ok":
        body = b"conn=%d req=%d" % (conn_id, requests)
        w(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        return True
    if path == b"/blob":
        size = int(query[5:]) if query.startswith(b"size=") else 100000
        w(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (size, close_delimited_body(size)))
        await writer.drain()
        return True
    if path == b"/early-hints":
        w(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        w(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
        await writer.drain()
        return True
    if path == b"/continue":
        expect = headers.get(b"expect", b"").lower() == b"100-continue"
        if expect:
            w(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        length = int(headers.get(b"content-length", b"0"))
        body = await reader.readexactly(length)
        answer = b"expect=%d length=%d" % (expect, len(body))
        w(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        await writer.drain()
        return True
    if path == b"/garbage":
        w(b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff\xfe not http at all\r\n\r\n")
        await writer.drain()
        return False
    if path == b"/bad-length":
        w(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello")
        await writer.drain()
        return False
    if path == b"/obs-fold":
        w(b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n  b\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        return False
    if path == b"/truncated":
        w(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        return False
    if path == b"/truncated-chunked":
        w(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
        await writer.drain()
        return False
    if path == b"/close-delimited":
        size = 100000
        if query.startswith(b"size="):
            size = int(query[5:])
        w(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        w(close_delimited_body(size))
        await writer.drain()
        return False
    if path == b"/no-answer":
        while await reader.read(65536):
            pass
        return False
    if path == b"/extra-bytes":
        w(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloJUNK\x00JUNK garbage after the end")
        await writer.drain()
        await asyncio.sleep(0.2)
        return False
    if path == b"/extra-response":
        w(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Smuggled: 1\r\n\r\nsmuggled"
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        return False
    if path == b"/reset":
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        return False
    if path == b"/stall":
        w(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        while await reader.read(65536):
            pass
        return False
    if path == b"/te-gzip":
        body = gzip.compress(GZIP_CONTENT, mtime=0)
        w(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
        w(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        await writer.drain()
        return True
    if path == b"/te-gzip-close":
        w(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
        w(gzip.compress(GZIP_CONTENT, mtime=0))
        await writer.drain()
        return False
    if path == b"/204-length":
        w(b"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n\r\n")
        await writer.drain()
        return True
    if path == b"/head":
        if method == b"HEAD":
            w(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        else:
            w(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()
        return True
    w(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found")
    await writer.drain()
    return True


async def _main(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_main(args.port))


if __name__ == "__main__":
    main()
