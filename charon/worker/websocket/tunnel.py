"""A WebSocket tunnel: after a valid 101, bytes are copied both ways as they come.

Each direction has a FrameWalker that reads frame headers on the way, so the tunnel can count
messages, see Close codes, refuse unmasked or oversized client frames, and add a frame of its
own (Ping, Close) only at a frame boundary. Flow control is the transports': a peer that does not
read pauses reading from the other one, so memory per tunnel stays bounded.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING

from charon.worker.deadlines import NONE, TUNNEL_IDLE
from charon.worker.websocket.frames import (
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    FrameWalker,
    close_frame,
    matching_pong_size,
    ping_frame,
)

if TYPE_CHECKING:
    from charon.config.model import WebSocketSettings
    from charon.worker.context import WorkerContext


class TunnelInfo:
    """What the open and close events say about a tunnel."""

    __slots__ = ("host", "client_ip", "path", "subprotocol", "opened_at", "opened_clock")

    def __init__(self, host: str, client_ip: str, path: str, subprotocol: str) -> None:
        self.host = host
        self.client_ip = client_ip
        self.path = path
        self.subprotocol = subprotocol
        self.opened_at = time.time()
        self.opened_clock = time.monotonic()


class _Side(asyncio.Protocol):
    """The protocol of one of the tunnel's two connections."""

    __slots__ = ("tunnel", "from_client", "data_received")

    def __init__(self, tunnel: Tunnel, from_client: bool) -> None:
        self.tunnel = tunnel
        self.from_client = from_client
        # The tunnel's method for this direction, called by the transport directly.
        self.data_received = (  # type: ignore[method-assign]
            tunnel.from_client if from_client else tunnel.from_backend
        )

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.from_client and self.tunnel.ctx.listeners is not None:
            self.tunnel.ctx.listeners.closed_one()  # the client connection counted at accept
        self.tunnel.lost(self.from_client)

    def pause_writing(self) -> None:
        self.tunnel.peer_transport(self.from_client).pause_reading()

    def resume_writing(self) -> None:
        self.tunnel.peer_transport(self.from_client).resume_reading()


class Tunnel:
    __slots__ = (
        "ctx",
        "info",
        "settings",
        "client",
        "backend",
        "upstream",
        "downstream",
        "deadline",
        "deadline_kind",
        "_ping_due",
        "_pong_due",
        "_dropping",
        "_ping_payload",
        "_next_ping",
        "_last_traffic",
        "_pongs_at_ping",
        "_closed_by",
        "_idle_timeout",
        "_done",
    )

    def __init__(
        self,
        ctx: WorkerContext,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        settings: WebSocketSettings,
        info: TunnelInfo,
    ) -> None:
        self.ctx = ctx
        self.info = info
        self.settings = settings
        self.client = client
        self.backend = backend
        # client->backend, then backend->client
        self.upstream = FrameWalker(masked=True, max_size=settings.max_frame_size)
        self.downstream = FrameWalker(masked=False, max_size=1 << 62)
        self.deadline = 0.0
        self.deadline_kind = NONE
        now = ctx.loop.time()
        self._next_ping = now + settings.ping_interval
        self._last_traffic = now
        self._pong_due = False  # the next client Pong answers our Ping: it is not forwarded
        self._dropping = 0  # bytes of that Pong frame still to drop
        self._ping_payload = b""
        self._ping_due = False  # a ping waits for a frame boundary toward the client
        self._pongs_at_ping = -1  # client pongs counted when the last ping went out; -1: none
        self._closed_by = ""
        self._idle_timeout = bool(settings.idle_timeout)
        self._done = False

    def start(self, client_tail: bytes, backend_tail: bytes) -> None:
        """Take over both connections; the tails are bytes read past the handshake."""
        self.ctx.tunnels.add(self)
        self.client.set_protocol(_Side(self, from_client=True))
        self.backend.set_protocol(_Side(self, from_client=False))
        self._arm_deadline()
        if backend_tail:
            self.forward(False, backend_tail)
        if client_tail:
            self.forward(True, client_tail)
        self.ctx.telemetry.websocket_open(self.info)
        if self.ctx.closing_tunnels:
            self.shutdown()  # the handshake finished after this worker closed its tunnels

    def peer_transport(self, from_client: bool) -> asyncio.Transport:
        return self.backend if from_client else self.client

    # -- data ------------------------------------------------------------------------------

    def forward(self, from_client: bool, data: bytes) -> None:
        if from_client:
            self.from_client(data)
        else:
            self.from_backend(data)

    def from_client(self, data: bytes) -> None:
        """Bytes read from the client (the hot path: one walk, one write)."""
        if self._pong_due or self._dropping or self._done:
            if not self._done:
                self._forward_taking_pong(data)
            return
        walker = self.upstream
        pos = walker.walk(data)
        if pos == len(data) and walker.close_code is None:
            self.backend.write(data)
        else:
            self._walked_to(True, data, pos)
        if self._idle_timeout:
            self._last_traffic = self.ctx.loop.time()

    def from_backend(self, data: bytes) -> None:
        """Bytes read from the backend."""
        if self._ping_due or self._done:
            if not self._done:
                self._forward_to_boundary(data)
            return
        walker = self.downstream
        pos = walker.walk(data)
        if pos == len(data) and walker.close_code is None:
            self.client.write(data)
        else:
            self._walked_to(False, data, pos)
        if self._idle_timeout:
            self._last_traffic = self.ctx.loop.time()

    def _walked_to(self, from_client: bool, data: bytes, pos: int) -> None:
        """The walk saw a Close or stopped at a frame that breaks the rules."""
        if from_client:
            walker, out = self.upstream, self.backend
        else:
            walker, out = self.downstream, self.client
        if walker.close_code is not None and not self._closed_by:
            self._note_close(from_client)
        if pos == len(data):
            out.write(data)
            return
        if pos:
            out.write(data[:pos])
        self._refuse(walker.error)

    def _forward_taking_pong(self, data: bytes) -> None:
        """Client->backend data while our Ping awaits its Pong: that Pong is not forwarded."""
        if self.settings.idle_timeout:
            self._last_traffic = self.ctx.loop.time()
        walker = self.upstream
        pos, end = 0, len(data)
        while pos < end:
            if self._dropping:
                take = min(self._dropping, end - pos)
                self._dropping -= take
                pos += take
                continue
            if self._pong_due and walker.at_boundary:
                size = matching_pong_size(data, pos, self._ping_payload)
                if size is not None:
                    walker.pongs += 1
                    self._pong_due = False
                    take = min(size, end - pos)
                    self._dropping = size - take
                    pos += take
                    continue
            stop = walker.walk(data, pos, stop_at_boundary=True)
            if walker.close_code is not None and not self._closed_by:
                self._note_close(True)
            if stop > pos:
                self.backend.write(data[pos:stop])
            if walker.error:
                self._refuse(walker.error)
                return
            pos = stop

    def _forward_to_boundary(self, data: bytes) -> None:
        """Backend->client data while a Ping waits: send it at the first frame boundary."""
        if self.settings.idle_timeout:
            self._last_traffic = self.ctx.loop.time()
        walker = self.downstream
        pos = 0
        if not walker.at_boundary:
            pos = walker.walk(data, 0, stop_at_boundary=True)
            if walker.close_code is not None and not self._closed_by:
                self._note_close(False)
            self.client.write(data[:pos])
        if walker.at_boundary:
            self._send_ping()
            if pos < len(data):
                self.forward(False, data[pos:])

    # -- endings ---------------------------------------------------------------------------

    def lost(self, from_client: bool) -> None:
        """One side's connection closed: the other hears it with a Close at a frame boundary,
        unless a closing handshake had begun (then the peer owes no further frame)."""
        if self._done:
            return
        handshake_begun = (
            self.upstream.close_code is not None or self.downstream.close_code is not None
        )
        if from_client:
            self._closed_by = self._closed_by or "client"
            if not handshake_begun and self.upstream.at_boundary:
                self.backend.write(close_frame(CLOSE_GOING_AWAY, masked=True))
            self._finish(self.backend)
        else:
            self._closed_by = self._closed_by or "backend"
            if not handshake_begun and self.downstream.at_boundary:
                self.client.write(close_frame(CLOSE_INTERNAL_ERROR, b"backend closed"))
            self._finish(self.client)

    def close(self, code: int, reason: bytes = b"") -> None:
        """End the tunnel from the proxy's side (drain, timeout): a Close to each peer."""
        if self._done:
            return
        self._closed_by = self._closed_by or "proxy"
        if self.downstream.at_boundary and self.downstream.close_code is None:
            self.client.write(close_frame(code, reason))
        if self.upstream.at_boundary and self.upstream.close_code is None:
            self.backend.write(close_frame(code, reason, masked=True))
        self._finish(self.client, self.backend)

    def _refuse(self, code: int) -> None:
        """A client frame broke the rules (unmasked, too big): Close both ways with its code."""
        self._closed_by = "proxy"
        self.close(code)

    def _finish(self, *transports: asyncio.Transport) -> None:
        self._done = True
        self.deadline_kind = NONE
        self.ctx.tunnels.discard(self)
        for transport in transports:
            transport.close()  # after what is buffered has been written
        for transport in (self.client, self.backend):
            if transport not in transports and not transport.is_closing():
                transport.close()
        self.ctx.telemetry.websocket_close(self.info, self.summary())

    def summary(self) -> dict[str, object]:
        up, down = self.upstream, self.downstream
        return {
            "duration": time.monotonic() - self.info.opened_clock,
            "messages_in": up.messages,
            "messages_out": down.messages,
            "bytes_in": up.payload_bytes,
            "bytes_out": down.payload_bytes,
            "client_close_code": up.close_code,
            "backend_close_code": down.close_code,
            "closed_by": self._closed_by,
            "close_code": self._close_code(),
        }

    def _note_close(self, from_client: bool) -> None:
        """Who began the closing handshake, not whose TCP connection went first."""
        self._closed_by = "client" if from_client else "backend"

    def _close_code(self) -> int:
        """The code of whoever began the closing handshake; 1006 if nobody sent a Close."""
        first, second = self.upstream.close_code, self.downstream.close_code
        if self._closed_by == "backend":
            first, second = second, first
        if first is not None:
            return first
        return second if second is not None else CLOSE_ABNORMAL

    # -- idle timeout and pings ------------------------------------------------------------

    def _arm_deadline(self) -> None:
        """The next time the sweep must look at this tunnel: a ping due or the idle limit."""
        settings = self.settings
        due = [self._next_ping] if settings.ping_interval else []
        if settings.idle_timeout:
            due.append(self._last_traffic + settings.idle_timeout)
        if due:
            self.deadline = min(due)
            self.deadline_kind = TUNNEL_IDLE

    def on_deadline(self, kind: int) -> None:
        settings = self.settings
        now = self.ctx.loop.time()
        if settings.idle_timeout and now >= self._last_traffic + settings.idle_timeout:
            self.close(CLOSE_GOING_AWAY, b"idle timeout")
            return
        if settings.ping_interval and now >= self._next_ping:
            # The previous ping must have been answered by now.
            if self._pongs_at_ping >= 0 and self.upstream.pongs <= self._pongs_at_ping:
                self.close(CLOSE_INTERNAL_ERROR, b"ping timeout")
                return
            if self.downstream.at_boundary:
                self._send_ping()
            else:
                self._ping_due = True
            self._next_ping = now + settings.ping_interval
        self._arm_deadline()

    def _send_ping(self) -> None:
        self._ping_due = False
        self._pongs_at_ping = self.upstream.pongs
        self._pong_due = True
        self._ping_payload = os.urandom(8)
        self.client.write(ping_frame(self._ping_payload))

    def shutdown(self) -> None:
        self.close(CLOSE_GOING_AWAY, b"server shutting down")
