"""A backend whose health the test sets; binds 127.0.0.1 only, exits on SIGTERM.

    python tests/backends/health_backend.py --port PORT [--mode ok|hang|status:N|bad-accept]
                                            [--cert PEM --key KEY]

Every request is read whole (head only: checks carry no body) and answered by the mode:
  ok          200 "ok" (a WebSocket handshake: a valid 101, then it reads until the peer goes)
  hang        accepts and reads, never answers (a hung backend)
  status:N    answers with status N
  bad-accept  a WebSocket handshake gets a 101 with a wrong Sec-WebSocket-Accept
Control paths, answered whatever the mode:
  /_mode/<mode>  sets the mode, answers "ok"
  /_hits         JSON: {"requests": n, "websocket": n, "hosts": [Host of each, last 20],
                 "agents": [User-Agent of each, last 20], "by_agent": {User-Agent: count},
                 "most_open": the most connections open at once (control ones included)}
                 of every request but control ones
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import signal
import ssl

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
state: dict[str, object] = {"mode": "ok", "requests": 0, "websocket": 0, "hosts": [],
                            "agents": [], "by_agent": {}, "open": 0, "most_open": 0}


def response(status: int, body: bytes, close: bool = False) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    state["open"] += 1  # type: ignore[operator]
    state["most_open"] = max(state["most_open"], state["open"])  # type: ignore[type-var]
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            target = lines[0].split(" ")[1]
            fields = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                fields[name.strip().lower()] = value.strip()
            if target.startswith("/_mode/"):
                state["mode"] = target[len("/_mode/"):]
                writer.write(response(200, b"ok"))
                continue
            if target == "/_hits":
                writer.write(response(200, json.dumps({
                    k: state[k]
                    for k in ("requests", "websocket", "hosts", "agents", "by_agent", "most_open")
                }).encode()))
                continue
            state["requests"] += 1  # type: ignore[operator]
            agents = state["by_agent"]
            assert isinstance(agents, dict)
            agent = fields.get("user-agent", "")
            agents[agent] = agents.get(agent, 0) + 1
            for name, value in (("hosts", fields.get("host", "")),
                                ("agents", fields.get("user-agent", ""))):
                seen = state[name]
                assert isinstance(seen, list)
                seen.append(value)
                del seen[:-20]
            mode = str(state["mode"])
            key = fields.get("sec-websocket-key")
            if key is not None and "websocket" in fields.get("upgrade", "").lower():
                state["websocket"] += 1  # type: ignore[operator]
                if mode == "hang":
                    await reader.read()
                    return
                accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
                if mode == "bad-accept":
                    accept = base64.b64encode(b"x" * 20).decode()
                if mode.startswith("status:"):
                    writer.write(response(int(mode[7:]), b"no", close=True))
                    await writer.drain()
                    return
                writer.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
                )
                await reader.read()  # the client's Close frame, then its FIN
                return
            if mode == "hang":
                await reader.read()  # until the peer gives up
                return
            status = int(mode[7:]) if mode.startswith("status:") else 200
            writer.write(response(status, b"ok"))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, IndexError, ValueError):
        pass
    finally:
        state["open"] -= 1  # type: ignore[operator]
        with contextlib.suppress(Exception):
            writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", default="ok")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    state["mode"] = args.mode
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    server = await asyncio.start_server(handle, "127.0.0.1", args.port, ssl=context)
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    async with server:
        await stop


if __name__ == "__main__":
    asyncio.run(main())
