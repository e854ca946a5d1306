"""A small forward-auth service (aiohttp) for the forward-auth tests; binds 127.0.0.1 only,
exits on SIGTERM.

    python tests/backends/auth_backend.py --port PORT [--tls-cert CHAIN.pem --tls-key KEY.pem]
        [--keepalive SECONDS]

It answers any path; what it answers is chosen by the word that follows the proxied
request's X-Forwarded-Uri `?` (the client's own query):
  ?allow...    200, Remote-User: alice, Remote-Groups: admins, X-Not-Copied: 1, body "ok"
  ?anonymous...200 without Remote-User
  ?login...    302 to http://login.test/?rd=<X-Forwarded-Host><X-Forwarded-Uri>, a Set-Cookie,
               Content-Type text/html, body "<a>log in</a>"
  ?deny...     401, WWW-Authenticate: Bearer, X-Reason: nope, body "no entry"
  ?slow...     waits 3 s, then 200
  ?huge...     403 with a 100 KiB body
  /seen        JSON: the head fields ([name, value] pairs) and path of every request received
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl

from aiohttp import web

_seen: list[dict[str, object]] = []


async def handle(request: web.Request) -> web.StreamResponse:
    if request.path == "/seen":
        return web.Response(text=json.dumps(_seen), content_type="application/json")
    peer = request.transport.get_extra_info("peername") if request.transport else None
    _seen.append({"path": request.path_qs, "method": request.method,
                  "peer_port": peer[1] if peer else None,
                  "headers": [[k, v] for k, v in request.headers.items()]})
    uri = request.headers.get("X-Forwarded-Uri", "")
    word = uri.partition("?")[2]
    if word.startswith("allow"):
        return web.Response(text="ok", headers={"Remote-User": "alice",
                                                "Remote-Groups": "admins", "X-Not-Copied": "1"})
    if word.startswith("anonymous"):
        return web.Response(text="ok")
    if word.startswith("login"):
        target = request.headers.get("X-Forwarded-Host", "") + uri
        response = web.Response(status=302, text="<a>log in</a>", content_type="text/html",
                                headers={"Location": f"http://login.test/?rd={target}"})
        response.set_cookie("flow", "abc")
        return response
    if word.startswith("deny"):
        return web.Response(status=401, text="no entry",
                            headers={"WWW-Authenticate": "Bearer", "X-Reason": "nope"})
    if word.startswith("slow"):
        await asyncio.sleep(3)
        return web.Response(text="late")
    if word.startswith("huge"):
        return web.Response(status=403, body=b"x" * 100 * 1024)
    return web.Response(status=403, text="unknown")


async def _main(port: int, tls: ssl.SSLContext | None, keepalive: float) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5,
                           keepalive_timeout=keepalive)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-cert", help="serve https with this chain (and --tls-key)")
    parser.add_argument("--tls-key")
    parser.add_argument("--keepalive", type=float, default=75.0,
                        help="seconds an idle connection is kept (aiohttp's default: 75)")
    args = parser.parse_args()
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    asyncio.run(_main(args.port, tls, args.keepalive))


if __name__ == "__main__":
    main()
