"""A backend that names itself in every answer and counts what it got (HTTP and WebSocket), for
the tests with several targets behind one proxy host; binds 127.0.0.1 only, exits on SIGTERM.

    python tests/backends/named_backend.py --port PORT --name NAME [--record FILE]

Every HTTP answer carries `X-Backend: NAME`.
HTTP paths (any method):
  /name            "NAME" (text)
  /count/<key>     counts the request under <key> and, with --record, appends the line
                   "NAME METHOD KEY" to FILE (O_APPEND, one write, before answering: so the
                   record survives the process being killed right after); then sleeps
                   `?delay=S` seconds (default 0) and answers "NAME"
  /stats           JSON {"name", "requests", "keys": {key: n}, "ws_open", "ws_total"}
  /healthz         "ok" (for active health checks)
  /stats and /healthz are not counted in "requests"; every other request is
  anything else    as /name
WebSocket (GET with Upgrade):
  /ws              sends "NAME" as its first text message, then echoes text and binary
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections import Counter

from aiohttp import WSMsgType, web


class State:
    def __init__(self, name: str, record: str | None) -> None:
        self.name = name
        self.requests = 0
        self.keys: Counter[str] = Counter()
        self.ws_open = 0
        self.ws_total = 0
        self.record_fd = (
            os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if record else None
        )


def make_app(state: State) -> web.Application:
    @web.middleware
    async def named(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.path not in ("/stats", "/healthz"):
            state.requests += 1
        response = await handler(request)
        if not isinstance(response, web.WebSocketResponse):
            response.headers["X-Backend"] = state.name
        return response

    async def name(_request: web.Request) -> web.Response:
        return web.Response(text=state.name)

    async def count(request: web.Request) -> web.Response:
        key = request.match_info["key"]
        state.keys[key] += 1
        if state.record_fd is not None:
            os.write(state.record_fd, f"{state.name} {request.method} {key}\n".encode())
        await request.read()
        await asyncio.sleep(float(request.query.get("delay", "0")))
        return web.Response(text=state.name)

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response({
            "name": state.name,
            "requests": state.requests,
            "keys": dict(state.keys),
            "ws_open": state.ws_open,
            "ws_total": state.ws_total,
        })

    async def ws(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return await name(request)
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        state.ws_open += 1
        state.ws_total += 1
        try:
            await sock.send_str(state.name)
            async for msg in sock:
                if msg.type == WSMsgType.TEXT:
                    await sock.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await sock.send_bytes(msg.data)
        finally:
            state.ws_open -= 1
        return sock

    app = web.Application(middlewares=[named])
    app.router.add_route("*", "/count/{key}", count)
    app.router.add_route("*", "/stats", stats)
    app.router.add_route("*", "/healthz", healthz)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/{tail:.*}", name)
    return app


async def main(port: int, name: str, record: str | None) -> None:
    runner = web.AppRunner(
        make_app(State(name, record)), access_log=None, handle_signals=False, shutdown_timeout=0.5
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    await stop
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--record")
    args = parser.parse_args()
    asyncio.run(main(args.port, args.name, args.record))
