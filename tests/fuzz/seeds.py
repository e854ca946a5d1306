"""Seed inputs for the engine's fuzz targets (tests/fuzz/*.c), written into a corpus folder:
valid WebSocket frames cut across reads, a valid 101 for the dial, handshake heads for the
door. libFuzzer mutates from these; without them the dial would rarely reach a valid 101."""

from __future__ import annotations

import contextlib
import ssl
import struct
import sys
from pathlib import Path

ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
HANDSHAKE = (b"GET /chat HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\nSec-WebSocket-Protocol: chat\r\n\r\n")


def frame(opcode: int, payload: bytes, masked: bool, fin: bool = True) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    m = 0x80 if masked else 0
    n = len(payload)
    if n > 0xFFFF:
        head = struct.pack("!BBQ", b0, m | 127, n)
    elif n > 125:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BB", b0, m | n)
    if not masked:
        return head + payload
    key = b"\x11\x22\x33\x44"
    return head + key + bytes(c ^ key[i & 3] for i, c in enumerate(payload))


def chunks(side: int, data: bytes, size: int) -> bytes:
    """Script ops: side's peer sends data in pieces of `size` bytes (op 0 of driver.c)."""
    out = b""
    for i in range(0, len(data), size):
        piece = data[i : i + size]
        out += bytes([side, len(piece)]) + piece
    return out


def tunnel_seeds() -> dict[str, bytes]:
    client = (frame(1, b"hello", True) + frame(2, bytes(300), True, fin=False)
              + frame(0, b"end", True) + frame(9, b"p", True) + frame(8, b"\x03\xe8bye", True))
    backend = frame(1, b"hi", False) + frame(2, bytes(200), False) + frame(8, b"\x03\xe9", False)
    limit = b"\xff"
    return {
        "whole": limit + chunks(0, client, 255) + chunks(1, backend, 255),
        "cut": limit + chunks(0, client, 3) + chunks(1, backend, 5),
        "inject": limit + chunks(0, client[:9], 9) + bytes([13, 8]) + frame(8, b"\x03\xe9", True)
        + chunks(0, client[9:], 200) + bytes([16]),
        "pong": limit + bytes([14, 4]) + b"ping" + chunks(0, frame(10, b"ping", True), 2),
        "slow": limit + bytes([7]) + bytes([0, 40, 1]) + chunks(0, client, 255) + bytes([4, 200])
        + bytes([8]) + bytes([18]),
        "refused": b"\x01" + chunks(0, frame(2, bytes(100), True), 255)
        + chunks(0, frame(1, b"x", False), 255),
    }


def dial_seeds() -> dict[str, bytes]:
    head = b"\xff" + bytes([4]) + b"tail" + b"\xff" + bytes([5, 0])  # client tail, connect ok
    bare = b"\xff" + bytes([0]) + b"\xff" + bytes([5, 0])  # no client tail
    return {
        "101-no-tail": bare + chunks(1, SWITCHING, 255) + chunks(0, frame(1, b"yo", True), 255),
        "101": head + chunks(1, SWITCHING + frame(1, b"hi", False), 255)
        + chunks(0, frame(1, b"yo", True), 255),
        "101-cut": head + chunks(1, SWITCHING, 7),
        "404": head + chunks(1, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 255),
        "eof": head + chunks(1, SWITCHING[:40], 255) + bytes([9]),
    }


def door_seeds() -> dict[str, bytes]:
    return {
        "handshake": bytes([0, len(HANDSHAKE)]) + HANDSHAKE + b"\x03",
        "silent": b"\x00\x00" + bytes([1 | (0 << 3), 5]) + b"GET /" + b"\x03\x02\x12\x03",
        "many": b"\x08\x10GET / HTTP/1.1\r\n" + b"\x03" * 3,
        # op 9 (| 16: IPv6, | 32: TLS): a PROXY listener's connection, admitted by Python
        "admitted": bytes([9, len(HANDSHAKE)]) + HANDSHAKE + b"\x03" + bytes([9 | 16, 0, 3])
        + b"\x02\x03" + bytes([9 | 32, 4]) + b"\x16\x03\x01\x00\x03",
    }


def atomics_seeds() -> dict[str, bytes]:
    """fuzz_atomics: words, offset, then (op, index, 8-byte values...) steps."""
    step = bytes([0x41, 3]) + bytes(8) + (5).to_bytes(8, "big")  # a CAS that succeeds
    add = bytes([2, 3]) + (-7 & (1 << 64) - 1).to_bytes(8, "big") + bytes(8)
    return {"cas-add": bytes([8, 0]) + step + add + bytes([0, 3]) + bytes(16),
            "bad-index": bytes([4, 0, 0, 0x85]) + bytes(16) + bytes([2, 0xC1]) + bytes(24),
            "misaligned": bytes([4, 0x83, 0, 1]) + bytes(16)}


def client_hello(name: str | None, alpn: list[str] | None, tls13: bool = True) -> bytes:
    """The first flight of Python's ssl client (a ClientHello) for the raw mode of fuzz_tls."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):  # (it waits for the ServerHello)
        client.do_handshake()
    return outgoing.read()


def tls_seeds() -> dict[str, bytes]:
    """fuzz_tls: byte 0 = server (bits 0-1) | client mode (4); raw mode: piece size, the
    server's socket room (x64), then the client's bytes; client mode: SNI (low 4 bits) and ALPN
    (bits 4-6) choices, options (bit 0: TLS 1.2 only, 1: resume, 2: through a TlsConn, 4-6:
    room), piece size, then steps (op, length, bytes)."""
    http = ["http/1.1"]
    seeds = {
        "raw-a": b"\x00\x00\x00" + client_hello("a.test", http),
        "raw-wild-cut": b"\x01\x05\x10" + client_hello("x.wild.test", None),
        "raw-acme": b"\x00\x30\x00" + client_hello("acme.test", ["acme-tls/1"]),
        "raw-12": b"\x02\x00\x00" + client_hello("b.test", http, tls13=False),
        "raw-nosni": b"\x01\x00\x00" + client_hello(None, None) + bytes(40),
    }
    steps = (bytes([0, 5]) + b"GET /" + bytes([1 | 8, 3]) + b"200" + bytes([0x80 | 0x18, 1])
             + b"x" + bytes([0x81 | 0x20, 2]) + b"ab" + bytes([2, 0, 3, 0, 5, 0]))
    for name, server, sni, alpn, more, piece in [
        ("a", 0, 1, 1, 0x04, 0), ("wild-12", 1, 2, 0, 0x01 | 0x70, 7),
        ("resume", 1, 3, 1, 0x02 | 0x04, 0), ("unknown", 0, 4, 0, 0, 0),
        ("acme", 0, 5, 2, 0, 0), ("star", 1, 4, 3, 0x82, 100), ("default-13", 2, 4, 1, 0x10, 3),
        ("h2-only", 2, 1, 4, 0, 0), ("drop", 0, 6, 1, 0x0C, 0),
    ]:
        seeds[f"client-{name}"] = bytes([4 | server, sni | alpn << 4, more, piece]) + steps
    seeds["client-named"] = bytes([4, 15 | 5 << 4, 0, 0, 6]) + b"Q.Wild" + b"\x09\x08http/1.1"
    seeds["client-closes"] = (bytes([4, 1 | 1 << 4, 0x10, 0]) + bytes([1, 4]) + b"bye!"
                              + bytes([4, 0]))
    seeds["client-resume-12"] = bytes([5, 2 | 1 << 4, 0x03, 0]) + steps
    return seeds


def write(target: str, folder: Path) -> None:
    seeds = {"fuzz_tunnel": tunnel_seeds, "fuzz_dial": dial_seeds, "fuzz_door": door_seeds,
             "fuzz_tls": tls_seeds, "fuzz_atomics": atomics_seeds,
             "fuzz_head": lambda: {"handshake": HANDSHAKE, "101": SWITCHING}}[target]()
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (folder / f"seed-{name}").write_bytes(data)


if __name__ == "__main__":
    write(sys.argv[1], Path(sys.argv[2]))
