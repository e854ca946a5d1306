"""Soak test: a real Charon (tests/harness.py) in front of the test suite's HTTP and WebSocket
backends on 127.0.0.1, under a mix of keep-alive HTTP, pipelined requests, WebSocket churn and
hostile clients (malformed heads, huge headers, slowloris, unmasked / oversized / bad-length
frames, connections dropped mid-request or mid-frame) for --seconds (10 minutes by default).

Every --interval seconds (10) it samples each worker's open fds and RSS. Growth is judged after
a warm-up (a fifth of the run, at most 2 minutes): the median of the last third of the samples
against the median of the first third after warm-up (RSS: --rss-tolerance, default 10% plus
4 MiB; fds: --fd-tolerance, default 16). When the load stops, each worker's fd count must come
back to what it was idle before the load (give or take 2). A worker that dies fails the run.
It prints the table of samples and what each kind of client saw; exit 1 on growth, 0 otherwise.

    .venv/bin/python bench/soak.py                  # 10 minutes
    .venv/bin/python bench/soak.py --seconds 60 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness import HOST, Backend, Charon  # noqa: E402

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
MAX_FRAME = 65536


def frame(opcode: int, payload: bytes, masked: bool = True, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    m = 0x80 if masked else 0
    if n > 0xFFFF:
        head = struct.pack("!BBQ", 0x80 | opcode, m | 127, n)
    elif n > 125:
        head = struct.pack("!BBH", 0x80 | opcode, m | 126, n)
    else:
        head = struct.pack("!BB", 0x80 | opcode, m | n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(c ^ key[i & 3] for i, c in enumerate(payload))


def handshake(path: bytes = b"/echo") -> bytes:
    return (b"GET " + path + b" HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")


def get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: soak.test\r\n" + extra + b"\r\n"


class Client:
    """One connection with a deadline on every step."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def __aenter__(self) -> Client:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, self.port), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.transport.abort()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), 10)

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 15)
        lines = raw.split(b"\r\n")
        fields = {}
        for line in lines[1:]:
            if b":" in line:
                name, value = line.split(b":", 1)
                fields[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), fields

    async def response(self) -> int:
        """A whole response (Content-Length or chunked body) read; its status."""
        status, fields = await self.head()
        if b"content-length" in fields:
            await asyncio.wait_for(self.reader.readexactly(int(fields[b"content-length"])), 15)
        elif fields.get(b"transfer-encoding", b"").endswith(b"chunked"):
            while True:
                size = int((await asyncio.wait_for(self.reader.readline(), 15)).split(b";")[0],
                           16)
                await asyncio.wait_for(self.reader.readexactly(size + 2), 15)
                if size == 0:
                    break
        return status

    async def drain_to_end(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(1 << 20), 15)


async def http_keepalive(port: int, seen: Counter[str]) -> None:
    async with Client(port) as c:
        for i in range(20):
            await c.send(get(b"/bytes/%d" % (i * 997 % 20000)))
            seen[f"http {await c.response()}"] += 1


async def http_pipelined(port: int, seen: Counter[str]) -> None:
    async with Client(port) as c:
        await c.send(b"".join(get(b"/echo/%d" % i) for i in range(10)))
        for _ in range(10):
            seen[f"pipelined {await c.response()}"] += 1


async def ws_churn(port: int, seen: Counter[str]) -> None:
    async with Client(port) as c:
        await c.send(handshake())
        status, _ = await c.head()
        seen[f"ws handshake {status}"] += 1
        for size in (5, 300, 70000 % MAX_FRAME):
            await c.send(frame(0x2, os.urandom(size)))
            got = 0
            while got < size:  # the echo: one unmasked frame back
                head = await asyncio.wait_for(c.reader.readexactly(2), 15)
                n = head[1] & 0x7F
                if n == 126:
                    n = struct.unpack("!H", await c.reader.readexactly(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", await c.reader.readexactly(8))[0]
                await asyncio.wait_for(c.reader.readexactly(n), 15)
                got += n
        if random.random() < 0.5:
            await c.send(frame(0x8, struct.pack("!H", 1000)))
            await c.drain_to_end()
            seen["ws closed"] += 1
        else:
            await c.send(frame(0x2, b"x" * 50)[:20])  # gone mid-frame
            seen["ws dropped mid-frame"] += 1


HOSTILE_HTTP = {
    "bare LF": b"GET / HTTP/1.1\nHost: soak.test\n\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: soak.test\r\nX: a\r\n b\r\n\r\n",
    "CL and TE": b"POST / HTTP/1.1\r\nHost: soak.test\r\nContent-Length: 3\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad CL": b"POST / HTTP/1.1\r\nHost: soak.test\r\nContent-Length: 1, 2\r\n\r\n",
    "huge header": get(b"/", b"X-Big: " + b"a" * 60000 + b"\r\n"),
    "many headers": get(b"/", b"".join(b"X-%d: y\r\n" % i for i in range(300))),
    "no Host": b"GET / HTTP/1.1\r\n\r\n",
    "unknown Host": b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n",
    "garbage": os.urandom(200) + b"\r\n\r\n",
    "NUL in value": get(b"/", b"X: a\x00b\r\n"),
    "bad ws version": handshake().replace(b"Version: 13", b"Version: 8"),
    "cut head": b"GET / HTTP/1.1\r\nHost: soa",
}
HOSTILE_WS = {
    "unmasked frame": frame(0x1, b"hello", masked=False),
    "frame over limit": frame(0x2, b"", length=MAX_FRAME * 4)[:14] + b"x" * 100,
    "64-bit length top bit": struct.pack("!BBQ", 0x82, 0xFF, 1 << 63) + b"abcd",
    "cut header": frame(0x2, b"y" * 300)[:3],
}


async def hostile(port: int, seen: Counter[str]) -> None:
    kind = random.choice(["http", "http", "ws", "slowloris", "silent"])
    async with Client(port) as c:
        if kind == "http":
            name, data = random.choice(list(HOSTILE_HTTP.items()))
            await c.send(data)
            try:
                status, _ = await c.head()
                seen[f"hostile {name}: {status}"] += 1
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                seen[f"hostile {name}: closed"] += 1
        elif kind == "ws":
            name, data = random.choice(list(HOSTILE_WS.items()))
            await c.send(handshake())
            await c.head()
            await c.send(data)
            if name == "cut header":
                seen[f"hostile {name}: dropped"] += 1
                return
            tail = await c.drain_to_end()  # the proxy's Close (1002/1009), then the end
            code = struct.unpack("!H", tail[2:4])[0] if len(tail) >= 4 else None
            seen[f"hostile {name}: close {code}"] += 1
        elif kind == "slowloris":  # a byte every 0.5 s: the header timeout (2 s) answers
            try:
                for b in get(b"/slow")[:12]:
                    await c.send(bytes([b]))
                    try:
                        status, _ = await asyncio.wait_for(c.head(), 0.5)
                    except TimeoutError:
                        continue
                    seen[f"slowloris: {status}"] += 1
                    return
                seen["slowloris: never answered"] += 1
            except (asyncio.IncompleteReadError, ConnectionError):
                seen["slowloris: closed unanswered"] += 1
        else:
            seen["connect and leave"] += 1


async def actor(job, port: int, deadline: float, seen: Counter[str]) -> None:  # type: ignore[no-untyped-def]
    while time.monotonic() < deadline:
        try:
            await job(port, seen)
        except (TimeoutError, asyncio.IncompleteReadError, OSError, ValueError,
                IndexError) as error:
            seen[f"{job.__name__} error {type(error).__name__}"] += 1
            await asyncio.sleep(0.1)


def sample(pid: int) -> tuple[int, int]:
    """(open fds, RSS in KiB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return fds, rss


def upstream_sockets(pid: int, backend_ports: set[int]) -> int:
    """How many of a worker's fds are connections to a backend (the pools' idle connections
    stay open after the load, by design)."""
    peers: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in list(f)[1:]:
                cols = line.split()
                peers[cols[9]] = int(cols[2].rsplit(":", 1)[1], 16)  # inode -> remote port
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and peers.get(link[8:-1]) in backend_ports:
            count += 1
    return count


async def soak(charon: Charon, backend_ports: set[int], args: argparse.Namespace) -> int:
    pids = charon.worker_pids()
    idle = {pid: sample(pid)[0] - upstream_sockets(pid, backend_ports) for pid in pids}
    seen: Counter[str] = Counter()
    start = time.monotonic()
    deadline = start + args.seconds
    jobs = ([http_keepalive] * 3 + [http_pipelined] * 2 + [ws_churn] * 3 + [hostile] * 4)
    tasks = [asyncio.create_task(actor(job, charon.port, deadline, seen)) for job in jobs]
    rows: list[tuple[float, dict[int, tuple[int, int]]]] = []
    print(f"{'t (s)':>6}  " + "  ".join(f"{'worker ' + str(p):>22}" for p in pids))
    while time.monotonic() < deadline:
        await asyncio.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))
        now = charon.worker_pids()
        if sorted(now) != sorted(pids):
            print(f"workers changed: {pids} -> {now} (a worker died)")
            for t in tasks:
                t.cancel()
            return 1
        row = {pid: sample(pid) for pid in pids}
        rows.append((time.monotonic() - start, row))
        print(f"{rows[-1][0]:6.0f}  " + "  ".join(
            f"{row[p][0]:>6} fds {row[p][1] / 1024:>8.1f} MiB" for p in pids), flush=True)
    await asyncio.gather(*tasks, return_exceptions=True)

    print("\nwhat the clients saw:")
    for what, count in sorted(seen.items()):
        print(f"  {count:>8}  {what}")
    failed = 0
    warm = min(args.seconds / 5, 120)
    after = [r for t, r in rows if t >= warm]
    third = max(1, len(after) // 3)
    for pid in pids:
        if len(after) < 2:
            print("too few samples after warm-up to judge growth")
            break
        first = [r[pid] for r in after[:third]]
        last = [r[pid] for r in after[-third:]]
        fd0, fd1 = statistics.median(f for f, _ in first), statistics.median(f for f, _ in last)
        rss0, rss1 = statistics.median(m for _, m in first), statistics.median(m for _, m in last)
        rss_limit = rss0 * (1 + args.rss_tolerance / 100) + 4096
        verdict = "ok"
        if fd1 > fd0 + args.fd_tolerance or rss1 > rss_limit:
            verdict, failed = "GROWS", 1
        print(f"worker {pid}: fds {fd0:.0f} -> {fd1:.0f}, RSS {rss0 / 1024:.1f} -> "
              f"{rss1 / 1024:.1f} MiB (limit {rss_limit / 1024:.1f}): {verdict}")
    await asyncio.sleep(3)  # connections closing, tunnels flushing
    for pid in pids:
        fds, pooled = sample(pid)[0], upstream_sockets(pid, backend_ports)
        ok = abs(fds - pooled - idle[pid]) <= 2
        failed |= not ok
        print(f"worker {pid}: idle fds before {idle[pid]}, after {fds} of which {pooled} "
              f"idle backend connections: {'ok' if ok else 'LEAK'}")
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--interval", type=float, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fd-tolerance", type=int, default=16)
    ap.add_argument("--rss-tolerance", type=float, default=10, help="percent")
    args = ap.parse_args()
    http = Backend("http_backend.py")
    ws = Backend("ws_backend.py")
    tmp = Path(tempfile.mkdtemp(prefix="charon-soak-"))
    charon = Charon(tmp, f"""
        [[hosts]]
        domains = ["soak.test"]
        upstream = "{http.url}"

        [[hosts]]
        domains = ["ws.test"]
        upstream = "{ws.url}"
        websocket_max_frame_size = {MAX_FRAME}
        """, workers=args.workers, extra_toml='[timeouts]\nheader = "2s"\n')
    try:
        charon.start()
        return asyncio.run(soak(charon, {http.port, ws.port}, args))
    finally:
        charon.stop()
        http.stop()
        ws.stop()
        print(f"Charon's log: {charon.log_path}")


if __name__ == "__main__":
    sys.exit(main())
