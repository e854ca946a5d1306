"""One TCP connection to a backend, used by one exchange at a time."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charon.worker.http.exchange import Exchange
    from charon.worker.upstreams.pool import UpstreamPool


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "exchange", "closed", "idle_since")

    def __init__(self, pool: UpstreamPool, exchange: Exchange | None = None) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set on connect
        self.exchange = exchange  # the exchange it was opened for, until it is attached
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_connected(self)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # an idle backend connection has nothing to say
            return
        exchange.upstream_data(data)

    def eof_received(self) -> bool:
        return False  # close our side too: a half-closed backend connection is not reusable

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.upstream_closed(exc)

    def pause_writing(self) -> None:
        # The backend reads the request body slower than the client sends it.
        if self.exchange is not None:
            self.exchange.client.pause_reading_for_backend()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.client.resume_reading_for_backend()

    def pause_reading(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def __repr__(self) -> Any:
        return f"<UpstreamConnection {self.pool.upstream.url} closed={self.closed}>"
