"""The demo backend started by `charon demo`: a page, a WebSocket chat room and a request mirror.

Run it with ``python -m charon.demo.backend --host 127.0.0.1 --port 8081``.

Routes:

* ``GET /``          the self-contained demo page (``index.html`` next to this module)
* ``GET /ws``        WebSocket chat room, subprotocol ``chat.v1``; text is broadcast as JSON to
                     everyone (sender included), binary frames are echoed to the sender only
* ``* /api/info``    JSON description of the request exactly as the backend received it
* ``GET /healthz``   ``ok``
* ``* /<anything>``  any other path answers like ``/api/info`` (``traefik/whoami`` style), so
                     what the proxy forwards can be probed with arbitrary, even odd, raw paths
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

CHAT_PROTOCOLS = ("chat.v1",)
MAX_MESSAGE_SIZE = 64 * 1024  # larger frames close the socket with 1009 (message too big)
SEND_TIMEOUT = 5.0  # a client that cannot take a broadcast within this is dropped


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class ChatRoom:
    """The connected WebSockets, keyed by socket, with their short ids."""

    def __init__(self) -> None:
        self.clients: dict[web.WebSocketResponse, str] = {}
        self._closing: set[asyncio.Task[bool]] = set()

    def new_id(self) -> str:
        while True:
            client_id = secrets.token_hex(3)
            if client_id not in self.clients.values():
                return client_id

    async def broadcast(
        self, payload: dict[str, Any], *, exclude: web.WebSocketResponse | None = None
    ) -> None:
        data = json.dumps(payload)
        targets = [ws for ws in self.clients if ws is not exclude and not ws.closed]
        if not targets:
            return
        results = await asyncio.gather(
            *(asyncio.wait_for(ws.send_str(data), SEND_TIMEOUT) for ws in targets),
            return_exceptions=True,
        )
        for ws, result in zip(targets, results, strict=True):
            if isinstance(result, TimeoutError):
                # Too slow to keep up: close it in the background rather than stall the room.
                # Its own handler then sees the close, leaves the room and tells the others.
                task = asyncio.create_task(
                    ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow")
                )
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            # Other send errors mean the peer is gone; its own handler cleans up.

    async def close_all(self) -> None:
        await asyncio.gather(
            *(
                ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                for ws in list(self.clients)
            ),
            return_exceptions=True,
        )


ROOM_KEY = web.AppKey("room", ChatRoom)
INDEX_KEY = web.AppKey("index_html", str)


async def index(request: web.Request) -> web.Response:
    return web.Response(
        text=request.app[INDEX_KEY],
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def api_info(request: web.Request) -> web.Response:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    body = await request.read()
    info = {
        "method": request.method,
        "raw_path": request.raw_path,
        "path": request.path,
        "query_string": request.query_string,
        "http_version": f"HTTP/{request.version.major}.{request.version.minor}",
        "headers": headers,
        # Every header line in arrival order, names as sent (latin-1 decoded).
        "raw_headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "remote": request.remote,
        "body_bytes": len(body),
        "backend_pid": os.getpid(),
    }
    return web.json_response(info, dumps=lambda obj: json.dumps(obj, indent=2))


async def chat(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(
        heartbeat=None, autoping=True, protocols=CHAT_PROTOCOLS, max_msg_size=MAX_MESSAGE_SIZE
    )
    if not ws.can_prepare(request).ok:
        return web.Response(
            status=426,
            text="this endpoint only speaks WebSocket\n",
            headers={"Upgrade": "websocket", "Connection": "Upgrade"},
        )
    await ws.prepare(request)

    room = request.app[ROOM_KEY]
    client_id = room.new_id()
    room.clients[ws] = client_id
    try:
        await ws.send_json({"system": "welcome", "you": client_id, "online": len(room.clients)})
        await room.broadcast(
            {"system": "join", "id": client_id, "online": len(room.clients), "at": _now()},
            exclude=ws,
        )
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await room.broadcast({"from": client_id, "text": msg.data, "at": _now()})
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.ERROR:
                break
    except (ConnectionResetError, TimeoutError):
        pass
    finally:
        if room.clients.pop(ws, None) is not None:
            await room.broadcast(
                {"system": "leave", "id": client_id, "online": len(room.clients), "at": _now()}
            )
    return ws


async def _close_websockets(app: web.Application) -> None:
    await app[ROOM_KEY].close_all()


def make_app() -> web.Application:
    """Build the demo application (the page is read once, here)."""
    app = web.Application()
    app[ROOM_KEY] = ChatRoom()
    app[INDEX_KEY] = (
        resources.files("charon.demo").joinpath("index.html").read_text(encoding="utf-8")
    )
    app.router.add_get("/", index)
    app.router.add_get("/ws", chat)
    app.router.add_route("*", "/api/info", api_info)
    app.router.add_get("/healthz", healthz)
    # Last, so it only gets what nothing above matched (aiohttp keeps registration order).
    app.router.add_route("*", "/{tail:.*}", api_info)
    app.on_shutdown.append(_close_websockets)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m charon.demo.backend", description="Charon demo backend."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8081, help="port to bind (default %(default)s)")
    args = parser.parse_args(argv)
    # run_app turns SIGINT/SIGTERM into a graceful shutdown and returns normally (exit code 0).
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        handle_signals=True,
    )


if __name__ == "__main__":
    main()
