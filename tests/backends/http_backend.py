"""An aiohttp backend for the HTTP data-path tests; binds 127.0.0.1 only, exits on SIGTERM.

    python tests/backends/http_backend.py --port PORT [--name NAME] [--cert PEM --key KEY]

With --cert and --key it serves HTTPS (the chain and key as PEM files).

Routes (any method unless noted):
  /echo, /echo/...   JSON: backend name, method, raw path, version, the request headers as
                     [name, value] pairs in arrival order, body length and sha256 (read streaming)
  /upload            JSON: body length and sha256, read streaming (?delay=S: only after S s)
  /chunks            JSON: body length, sha256 and how many HTTP chunks carried it
  /bytes/<n>         n bytes of `pattern()` with Content-Length; ?chunked=1: chunked instead
  /sleep/<seconds>   sleeps, then answers "slept"
  /status/<code>     answers with that status (no body for 1xx/204/304)
  /headers           a response carrying hop-by-hop headers (and end-to-end ones)
  /sts               "sts" with its own Strict-Transport-Security: max-age=1
  anything else      as /echo

Bodies are never decompressed or altered (auto_decompress off, streamed reads).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import ssl

from aiohttp import web

BLOCK = 64 * 1024


def pattern_block(index: int) -> bytes:
    """Block `index` (64 KiB) of the deterministic byte stream served by /bytes/<n>."""
    return hashlib.sha256(index.to_bytes(8, "big")).digest() * (BLOCK // 32)


def pattern(n: int):  # type: ignore[no-untyped-def]
    """The first n bytes of the stream, as 64 KiB blocks (the last one shorter)."""
    index = 0
    while n > 0:
        block = pattern_block(index)
        yield block[: min(n, BLOCK)]
        n -= BLOCK
        index += 1


async def _read_body(request: web.Request) -> tuple[int, str]:
    digest = hashlib.sha256()
    length = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        length += len(chunk)
    return length, digest.hexdigest()


def _make_app(name: str) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        length, sha = await _read_body(request)
        return web.json_response(
            {
                "backend": name,
                "method": request.method,
                "raw_path": request.raw_path,
                "version": f"{request.version.major}.{request.version.minor}",
                "headers": [
                    [k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers
                ],
                "body_length": length,
                "body_sha256": sha,
            }
        )

    async def upload(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "0")))
        length, sha = await _read_body(request)
        return web.json_response({"backend": name, "length": length, "sha256": sha})

    async def chunks(request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        length = count = 0
        async for data, chunk_end in request.content.iter_chunks():
            digest.update(data)
            length += len(data)
            count += chunk_end
        return web.json_response({"length": length, "sha256": digest.hexdigest(), "chunks": count})

    async def send_bytes(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") == "1":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = n
        await resp.prepare(request)
        if request.method != "HEAD":
            for block in pattern(n):
                await resp.write(block)
        await resp.write_eof()
        return resp

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(text="slept")

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code < 200 or code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}")

    async def headers(request: web.Request) -> web.Response:
        hop = {
            "Connection": "X-Drop-Me, Keep-Alive",
            "X-Drop-Me": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Connection": "keep-alive",
            "Trailer": "X-Checksum",
            "Upgrade": "h2c",
            "Proxy-Authenticate": "Basic realm=x",
            "TE": "trailers",
            "X-Keep-Me": "yes",
            "Cache-Control": "max-age=60",
            "Set-Cookie": "a=1",
        }
        resp = web.Response(text="headers", headers=hop)
        resp.headers.add("Set-Cookie", "b=2")
        return resp

    app = web.Application(client_max_size=1 << 40)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_route("*", "/upload", upload)
    app.router.add_route("*", "/chunks", chunks)
    app.router.add_route("*", "/bytes/{n:[0-9]+}", send_bytes)
    app.router.add_route("*", "/sleep/{seconds}", sleep)
    app.router.add_route("*", "/status/{code:[0-9]+}", status)
    app.router.add_route("*", "/headers", headers)
    app.router.add_route("*", "/sts", sts)
    app.router.add_route("*", "/{tail:.*}", echo)  # any other path: echo too
    return app


async def sts(_request: web.Request) -> web.Response:
    return web.Response(text="sts", headers={"Strict-Transport-Security": "max-age=1"})


async def _main(port: int, name: str, tls: ssl.SSLContext | None = None) -> None:
    runner = web.AppRunner(
        _make_app(name), access_log=None, auto_decompress=False, shutdown_timeout=0.5
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=tls)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="http")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    asyncio.run(_main(args.port, args.name, tls))


if __name__ == "__main__":
    main()
