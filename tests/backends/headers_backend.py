"""A backend for the header rules tests (aiohttp); binds 127.0.0.1 only, exits on SIGTERM.

    python tests/backends/headers_backend.py --port PORT [--name NAME]

Every answer carries `X-Backend: NAME`, `X-Remove-Me: 1` and one response field per `h` query
parameter (`?h=Name:Value`, repeatable), besides aiohttp's own (Server, Date, ...).
  /ws       a WebSocket handshake (its 101 carries the fields above); the first message is
            the handshake request's headers as a JSON list of [name, value] pairs
  anything else  JSON: {"backend", "headers": the request's [name, value] pairs in order}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from aiohttp import web
from multidict import CIMultiDict


def _answer_fields(request: web.Request, name: str) -> CIMultiDict[str]:
    fields: CIMultiDict[str] = CIMultiDict()
    fields.add("X-Backend", name)
    fields.add("X-Remove-Me", "1")
    for item in request.query.getall("h", []):
        field, _, value = item.partition(":")
        fields.add(field, value)
    return fields


def _request_fields(request: web.Request) -> list[list[str]]:
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]


def _make_app(name: str) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        body = {"backend": name, "headers": _request_fields(request)}
        return web.json_response(body, headers=_answer_fields(request, name))

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        ws.headers.extend(_answer_fields(request, name))
        await ws.prepare(request)
        await ws.send_str(json.dumps(_request_fields(request)))
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def _main(port: int, name: str) -> None:
    runner = web.AppRunner(_make_app(name), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="headers")
    args = parser.parse_args()
    asyncio.run(_main(args.port, args.name))


if __name__ == "__main__":
    main()
