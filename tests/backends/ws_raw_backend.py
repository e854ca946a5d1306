"""A raw asyncio WebSocket backend that misbehaves on purpose; 127.0.0.1 only, exits on SIGTERM.

    python tests/backends/ws_raw_backend.py --port PORT

It reads one request head, then acts according to the path (the query is ignored):
  /bad-accept          101 with a wrong Sec-WebSocket-Accept
  /no-upgrade          101 with the right accept but no Upgrade header
  /push-after-101      the 101 and, in the same write, a text frame "pushed by the backend";
                       then echoes (see below)
  /half-frame-then-die the 101, then the first half of a 100-byte text frame, then an RST
  /slow-frame          the 101, then one 100000-byte binary frame whose payload (SLOW_PAYLOAD)
                       trickles out over 2 s, then a text frame "done"; then echoes
  /record              a correct 101; then echoes, and remembers every frame it receives;
                       a text message "ping me" makes it send a Ping "backend"; a text message
                       "report" is answered with the JSON list of [opcode, payload] received
  /hang                reads the handshake and never answers (until the peer closes)
  /flood               the 101, then 1 MiB binary frames of FLOOD_PAYLOAD for as long as the
                       connection takes them (it reads nothing)
  /trickle-header      the 101, then a 300-byte text frame, a 70000-byte binary frame and a
                       Close 4002 "split", each header written one byte at a time (30 ms apart;
                       the Close whole byte by byte); then reads the peer's Close and closes
  /burst               the 101, a text frame "one", a binary frame "two" and a Close 4004
                       "burst", all in one write; then reads the peer's Close and closes
  /big                 an HTTP 200 with a BIG_SIZE-byte body (BIG_PAYLOAD), then closes
  /answer?a=B64[&b=B64] writes the base64url-decoded `a` as its whole answer ("{accept}" in it
                       becomes the right accept value), after 50 ms `b` if given; then a text
                       frame holding the request head it read (after a 101), and echoes;
                       after any other answer it closes
Anything else: 404. "Echoes": text and binary frames come back unmasked, Ping gets a Pong,
Close gets a Close with the same payload and the connection ends.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import signal
import socket
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HALF_FRAME = bytes((0x81, 100)) + b"x" * 50
SLOW_PAYLOAD = (b"0123456789abcdef" * 6250)[:100000]
FLOOD_PAYLOAD = bytes(i % 251 for i in range(1 << 20))  # 1 MiB
BIG_SIZE = 16 * 1024 * 1024
TRICKLE_TEXT = (b"split header " * 30)[:300]
TRICKLE_BINARY = bytes(i % 256 for i in range(70000))


def accept_for(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + struct.pack("!H", n)
    else:
        head = bytes((0x80 | opcode, 127)) + struct.pack("!Q", n)
    return head + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
    payload = await reader.readexactly(n)
    return b0 & 0x0F, bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def switching(key: bytes, upgrade: bool = True, accept: bytes | None = None) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        + (b"Upgrade: websocket\r\n" if upgrade else b"")
        + b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
        + (accept if accept is not None else accept_for(key))
        + b"\r\n\r\n"
    )


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    received: list[tuple[int, str]] = []
    while True:
        opcode, payload = await read_frame(reader)
        received.append((opcode, payload.decode("latin-1")))
        if opcode == 0x8:
            writer.write(frame(0x8, payload))
            await writer.drain()
            return
        if opcode == 0x9:
            writer.write(frame(0xA, payload))
        elif opcode == 0x1 and payload == b"report":
            writer.write(frame(0x1, json.dumps(received).encode()))
        elif opcode == 0x1 and payload == b"ping me":
            writer.write(frame(0x9, b"backend"))
        elif opcode in (0x0, 0x1, 0x2):
            writer.write(frame(opcode, payload))
        await writer.drain()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        path, _, query = lines[0].split(b" ")[1].partition(b"?")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get(b"sec-websocket-key", b"")
        if path == b"/bad-accept":
            writer.write(switching(key, accept=base64.b64encode(b"0123456789abcdefghij")))
            await writer.drain()
            await reader.read()
        elif path == b"/no-upgrade":
            writer.write(switching(key, upgrade=False))
            await writer.drain()
            await reader.read()
        elif path == b"/push-after-101":
            writer.write(switching(key) + frame(0x1, b"pushed by the backend"))
            await echo(reader, writer)
        elif path == b"/half-frame-then-die":
            writer.write(switching(key) + HALF_FRAME)
            await writer.drain()
            await asyncio.sleep(0.3)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        elif path == b"/slow-frame":
            whole = frame(0x2, SLOW_PAYLOAD)
            head_size = len(whole) - len(SLOW_PAYLOAD)
            writer.write(switching(key) + whole[:head_size])
            for at in range(head_size, len(whole), 5000):
                await asyncio.sleep(0.1)
                writer.write(whole[at : at + 5000])
                await writer.drain()
            writer.write(frame(0x1, b"done"))
            await echo(reader, writer)
        elif path == b"/hang":
            await reader.read()
        elif path == b"/flood":
            writer.write(switching(key))
            whole = frame(0x2, FLOOD_PAYLOAD)
            while True:
                writer.write(whole)
                await writer.drain()
        elif path == b"/trickle-header":
            writer.write(switching(key))
            for whole, head_size in ((frame(0x1, TRICKLE_TEXT), 4),
                                     (frame(0x2, TRICKLE_BINARY), 10),
                                     (frame(0x8, struct.pack("!H", 4002) + b"split"), 9)):
                for at in range(head_size):
                    writer.write(whole[at : at + 1])
                    await writer.drain()
                    await asyncio.sleep(0.03)
                writer.write(whole[head_size:])
                await writer.drain()
            await read_frame(reader)  # the peer's Close: the closing handshake is complete
        elif path == b"/burst":
            writer.write(switching(key) + frame(0x1, b"one") + frame(0x2, b"two")
                         + frame(0x8, struct.pack("!H", 4004) + b"burst"))
            await writer.drain()
            await read_frame(reader)
        elif path == b"/big":
            body = (FLOOD_PAYLOAD * 17)[:BIG_SIZE]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_SIZE + body)
            await writer.drain()
        elif path == b"/answer":
            parts = dict(p.partition(b"=")[::2] for p in query.split(b"&"))
            whole = b""
            for name in (b"a", b"b"):
                if name in parts:
                    answer = base64.urlsafe_b64decode(parts[name])
                    whole += answer
                    writer.write(answer.replace(b"{accept}", accept_for(key)))
                    await writer.drain()
                    await asyncio.sleep(0.05)
            if b"HTTP/1.1 101" in whole:
                writer.write(frame(0x1, head))
                await echo(reader, writer)
        elif path == b"/record":
            writer.write(switching(key))
            await echo(reader, writer)
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, IndexError):
        pass
    finally:
        if not writer.is_closing():
            writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
