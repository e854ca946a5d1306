"""A tiny backend for the supervisor tests: `/ok` answers at once, `/sleep/<s>` after s seconds,
`/sleeping` tells how many `/sleep/` requests are being served right now.

Run with ``python sup_backend.py --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from aiohttp import web


async def ok(request: web.Request) -> web.Response:
    return web.Response(text=f"ok {os.getpid()}\n")


SLEEPING = 0


async def sleep(request: web.Request) -> web.Response:
    global SLEEPING
    seconds = float(request.match_info["seconds"])
    SLEEPING += 1
    try:
        await asyncio.sleep(seconds)
    finally:
        SLEEPING -= 1
    return web.Response(text=f"slept {seconds}\n")


async def sleeping(request: web.Request) -> web.Response:
    return web.Response(text=str(SLEEPING))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/sleep/{seconds}", sleep)
    app.router.add_get("/sleeping", sleeping)
    # A short shutdown timeout so that a request still sleeping does not delay the teardown.
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None,
                shutdown_timeout=1.0, backlog=1024)


if __name__ == "__main__":
    main()
