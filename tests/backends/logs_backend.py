"""A small backend for the live log tests (aiohttp); binds 127.0.0.1 only, exits on SIGTERM.

    python tests/backends/logs_backend.py --port PORT

  /status/<code>   answers with that status and the body "status <code>"
  /ws              WebSocket echo (subprotocol "logs.v1" when offered); the text message
                   "close <code>" makes it close with that code
  anything else    200 "ok <path>"
"""

from __future__ import annotations

import argparse

from aiohttp import WSMsgType, web


async def status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, text=f"status {code}")


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(protocols=("logs.v1",))
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT and message.data.startswith("close "):
            await ws.close(code=int(message.data.split()[1]), message=b"asked")
            break
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def anything(request: web.Request) -> web.Response:
    return web.Response(text=f"ok {request.path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/status/{code:[0-9]{3}}", status)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", anything)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
