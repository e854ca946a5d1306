"""A well-behaved WebSocket backend (aiohttp); binds 127.0.0.1 only, exits on SIGTERM.

    python tests/backends/ws_backend.py --port PORT [--cert PEM --key KEY]

With --cert and --key it serves over TLS (wss:// and https://).

WebSocket paths (any query is ignored, except `id`, see /last-close):
  /echo            echoes text and binary messages (up to 64 MiB); subprotocols "v2.chat" and
                   "v1.chat": the first of the client's offers that is one of those is chosen;
                   permessage-deflate when the client offers it
  /headers         the handshake request headers it received, as a JSON list of [name, value]
                   pairs in the first text message; then echoes
  /close/<code>    closes at once with that code and the reason "bye <code>"
  /die             echoes the first message; on the second one the connection is reset (RST)
  /silent          accepts, reads and drops everything, never sends
  /slow-echo       waits `?delay=S` seconds (default 2) before the 101, then as /echo
HTTP paths:
  /reject/<status> a plain response with that status and the body "denied" (302 adds a Location)
  /plain           200 "plain"
  /last-close      JSON {"id", "path", "code", "reason"} of the last WebSocket connection that
                   ended (`?id=X`: the last one opened with `?id=X`), 404 if none yet
  /seen            JSON list of every request received: {"method", "path", "upgrade"}
  /pending         how many /slow-echo handshakes are waiting for their 101 now
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import ssl
import struct

from aiohttp import WSMsgType, web

SUBPROTOCOLS = ("v2.chat", "v1.chat")
MAX_MESSAGE = 64 * 1024 * 1024

_closes: dict[str, dict[str, object]] = {}
_seen: list[dict[str, object]] = []
_pending = 0  # /slow-echo handshakes not answered yet


@web.middleware
async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
    _seen.append({
        "method": request.method,
        "path": request.path_qs,
        "upgrade": request.headers.get("Upgrade", ""),
    })
    return await handler(request)


def _remember(request: web.Request, code: int | None, reason: str) -> None:
    entry = {"id": request.query.get("id", ""), "path": request.path, "code": code,
             "reason": reason}
    _closes[""] = entry
    if entry["id"]:
        _closes[str(entry["id"])] = entry


async def _prepare(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=SUBPROTOCOLS, max_msg_size=MAX_MESSAGE, compress=True)
    await ws.prepare(request)
    return ws


async def _serve(request: web.Request, ws: web.WebSocketResponse, echo: bool,
                 die_on: int = 0) -> None:
    """Receive until the connection ends; echo if asked; record how it ended."""
    code: int | None = None
    reason = ""
    received = 0
    try:
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.CLOSE:
                code, reason = int(msg.data), str(msg.extra or "")
                break
            if msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                code = ws.close_code
                break
            received += 1
            if die_on and received >= die_on:
                _reset(request)
                code = -1  # the backend itself killed this one
                break
            if not echo:
                continue
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
    finally:
        _remember(request, code, reason)


def _reset(request: web.Request) -> None:
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def echo(request: web.Request) -> web.StreamResponse:
    ws = await _prepare(request)
    await _serve(request, ws, echo=True)
    return ws


async def headers(request: web.Request) -> web.StreamResponse:
    ws = await _prepare(request)
    raw = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]
    await ws.send_str(json.dumps(raw))
    await _serve(request, ws, echo=True)
    return ws


async def close(request: web.Request) -> web.StreamResponse:
    code = int(request.match_info["code"])
    ws = await _prepare(request)
    await ws.close(code=code, message=f"bye {code}".encode())
    _remember(request, ws.close_code, "")
    return ws


async def die(request: web.Request) -> web.StreamResponse:
    ws = await _prepare(request)
    await _serve(request, ws, echo=True, die_on=2)
    return ws


async def silent(request: web.Request) -> web.StreamResponse:
    ws = await _prepare(request)
    await _serve(request, ws, echo=False)
    return ws


async def slow_echo(request: web.Request) -> web.StreamResponse:
    global _pending
    _pending += 1
    try:
        await asyncio.sleep(float(request.query.get("delay", "2")))
    finally:
        _pending -= 1
    return await echo(request)


async def pending(request: web.Request) -> web.StreamResponse:
    return web.Response(text=str(_pending))


async def reject(request: web.Request) -> web.StreamResponse:
    status = int(request.match_info["status"])
    extra = {"Location": "/elsewhere"} if 300 <= status < 400 else {}
    return web.Response(status=status, text="denied", headers=extra)


async def plain(request: web.Request) -> web.StreamResponse:
    return web.Response(text="plain")


async def last_close(request: web.Request) -> web.StreamResponse:
    entry = _closes.get(request.query.get("id", ""))
    if entry is None:
        return web.Response(status=404, text="no close recorded")
    return web.json_response(entry)


async def seen(request: web.Request) -> web.StreamResponse:
    return web.json_response(_seen)


async def main(port: int, tls: ssl.SSLContext | None = None) -> None:
    app = web.Application(middlewares=[record])
    app.router.add_get("/echo", echo)
    app.router.add_get("/headers", headers)
    app.router.add_get("/close/{code:\\d+}", close)
    app.router.add_get("/die", die)
    app.router.add_get("/silent", silent)
    app.router.add_get("/slow-echo", slow_echo)
    app.router.add_get("/pending", pending)
    app.router.add_route("*", "/reject/{status:\\d+}", reject)
    app.router.add_route("*", "/plain", plain)
    app.router.add_get("/last-close", last_close)
    app.router.add_get("/seen", seen)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    await stop
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    asyncio.run(main(args.port, tls))
