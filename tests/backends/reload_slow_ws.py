"""A WebSocket echo backend that answers the handshake late; binds 127.0.0.1, exits on SIGTERM.

    python tests/backends/reload_slow_ws.py --port PORT

  /slow-echo?delay=S  waits S seconds (default 2) before the 101, then echoes text and binary
  /pending            how many /slow-echo handshakes are waiting now
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from aiohttp import WSMsgType, web

PENDING = 0


async def slow_echo(request: web.Request) -> web.StreamResponse:
    global PENDING
    PENDING += 1
    try:
        await asyncio.sleep(float(request.query.get("delay", "2")))
    finally:
        PENDING -= 1
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def pending(request: web.Request) -> web.StreamResponse:
    return web.Response(text=str(PENDING))


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/slow-echo", slow_echo)
    app.router.add_get("/pending", pending)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    await stop
    await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
