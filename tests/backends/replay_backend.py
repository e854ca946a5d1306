"""A backend that answers each request with the bytes its path spells in hex, then closes:
`GET /replay/<hex>` makes it write bytes.fromhex(<hex>) and close the connection. For tests
that choose the backend's exact response (tests/test_http_response_properties.py). Binds
127.0.0.1 only, exits on SIGTERM.

    python tests/backends/replay_backend.py --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ", 2)[1]
        if target.startswith(b"/replay/"):
            writer.write(bytes.fromhex(target[8:].decode()))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError,
            ConnectionError):
        pass
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_handle, "127.0.0.1", port)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    asyncio.run(_main(ap.parse_args().port))


if __name__ == "__main__":
    main()
