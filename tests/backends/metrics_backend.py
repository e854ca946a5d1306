"""A small backend for the metrics tests (aiohttp); binds 127.0.0.1 only, exits on SIGTERM.

    python tests/backends/metrics_backend.py --port PORT

  GET /ok          200, the body BODY (a known size for charon_http_response_bytes_total)
  GET /slow?ms=N   200 "slow" after N milliseconds
  /ws              WebSocket echo (text and binary, no compression); the text "close:CODE"
                   makes it close with CODE instead
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import WSMsgType, web

BODY = b"metrics-ok\n"


async def ok(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="text/plain")


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(int(request.query.get("ms", "100")) / 1000)
    return web.Response(text="slow")


async def ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False, autoping=True, heartbeat=None)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            if msg.data.startswith("close:"):
                await ws.close(code=int(msg.data[6:]), message=b"asked")
                break
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", ws_echo)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
