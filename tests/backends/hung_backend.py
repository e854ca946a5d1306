"""A backend that accepts connections, reads what comes and never answers: a hung process that
still holds its listening socket (a connect succeeds, a health check times out). Binds
127.0.0.1 only, exits on SIGTERM.

    python tests/backends/hung_backend.py --port PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal


async def _swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(_swallow, "127.0.0.1", port)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
