"""The client side of the proxy: one asyncio Protocol per accepted connection.

It parses requests with llhttp (httptools), turns each request head into an Exchange and runs
the exchanges one at a time, in order (pipelined requests wait their turn, bounded by pausing
reads). Callbacks named `on_*` are llhttp's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from charon.worker.deadlines import HEADER, KEEPALIVE, NONE, RESPONSE_IDLE
from charon.worker.http.errors import HttpError, error_response
from charon.worker.http.exchange import Exchange
from charon.worker.http.feeding import MAX_QUEUED, SLICE, SlicedFeed
from charon.worker.http.request import BODY_NONE, plan_request
from charon.worker.http.requestline import RequestLines
from charon.worker.http.sendwatch import LINGER_BYTES, close_transport, cut_off, watch_sending
from charon.worker.telemetry import PATH_LIMIT

if TYPE_CHECKING:
    from charon.config.model import Limits
    from charon.worker.context import WorkerContext
    from charon.worker.http.adopted import Handover
    from charon.worker.tlsinfo import TlsInfo

log = logging.getLogger("charon.worker")

# Why reading from the client is paused; reading resumes when no reason is left.
_PAUSE_BACKEND = 1  # the backend reads the request body slower than the client sends it
_PAUSE_BODY = 2  # request body waiting for the backend connection to open
_PAUSE_QUEUE = 4  # pipelined requests waiting their turn
_PAUSE_PARSE = 8  # the rest of a read waits to be parsed (http/feeding.py)

HELD_LIMIT = 64 * 1024  # bytes read past a WebSocket handshake before the backend answers


class ClientConnection(SlicedFeed):
    __slots__ = (
        "ctx", "transport", "parser", "peer_ip", "exchanges", "deadline", "deadline_kind",
        "closing", "_paused", "write_paused", "_url", "_url_size", "_headers", "_header_size",
        "_in_head", "_held", "_max_header_bytes", "_max_header_count", "first_read", "handover",
        "lines", "_head_read", "_max_head_read", "_limits", "tls", "dropped", "seat",
    )

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.exchanges: deque[Exchange] = deque()
        self.deadline = 0.0
        self.deadline_kind = NONE
        self.closing = False
        self._paused = 0
        self.write_paused = False
        # The request head being parsed.
        self._url: list[bytes] = []
        self._url_size = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_size = 0
        self._in_head = False
        self._held: bytearray | None = None
        self._head_read = 0
        self._take_limits(ctx.limits)
        # From the front door (http/adopted.py): bytes it read, and what it did with them.
        self.first_read = b""
        self.handover: Handover | None = None
        self.dropped = 0  # bytes read and dropped while closing
        self.tls: TlsInfo | None = None  # what a TLS connection negotiated (None: plain)
        self.lines = RequestLines()  # where each request line is, to refuse extra spaces
        self.seat = -1  # [server] max_connections_per_ip count (limits/server.py); -1: none

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.peer_ip:  # (adopt_client says: a TLS socketpair, a PROXY header's source)
            peer = transport.get_extra_info("peername")
            self.peer_ip = peer[0] if peer else ""
        self.ctx.connections.add(self)  # (counted for accept back-off by the front door)
        self.set_deadline(HEADER, self.ctx.timeouts.header)
        if self.first_read:
            data, self.first_read = self.first_read, b""
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._held is not None:
            self._hold(data)
            return
        if self.closing:
            # Dropped (a lingering close reads on, sendwatch.py), up to LINGER_BYTES: a client
            # that keeps sending is cut.
            self.dropped += len(data)
            if self.dropped > LINGER_BYTES and self.transport is not None:
                self.transport.abort()
            return
        if self._rest:
            data = self.take_rest(data)
        self.events = 0
        if len(data) > self.slice or self.line:
            self.feed(data, 0)
            return
        # Nearly every read: one slice (feeding.py's loop, unrolled for the hot path).
        self.lines.feed(data)
        try:
            self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            self.parse_failed(exc, data, 0)
            return
        self.lines.read_done(self._in_head)
        if self._in_head and self._head_too_long(len(data)):
            return
        if self.between and self.line_ends(data, 0, len(data)):
            return
        if self.body:
            self.flush_body()

    def parse(self, piece: bytes | memoryview, data: bytes, pos: int) -> bool:
        # The request lines follow every slice llhttp is given (feeding.py's loop).
        self.lines.feed(piece if isinstance(piece, bytes) else bytes(piece))
        if not super().parse(piece, data, pos):
            return False
        self.lines.read_done(self._in_head)
        return not (self._in_head and self._head_too_long(len(piece)))

    def _take_limits(self, limits: Limits) -> None:
        """Copied: read for every header field; taken again by the first request head after
        a reload in place changed them (one identity check per head)."""
        self._limits = limits
        self._max_header_bytes = limits.max_header_bytes
        self._max_header_count = limits.max_header_count
        # llhttp keeps a field's value until its line ends, and only then is it counted: the
        # raw bytes read into a head are bounded too (the slack covers the request line, the
        # whitespace around values and the read or slice the head began in).
        self._max_head_read = limits.max_header_bytes + limits.max_request_target + 8192

    def _head_too_long(self, read: int) -> bool:
        self._head_read += read
        if self._head_read <= self._max_head_read:
            return False
        self._reject(HttpError(431, "request header section too large"))
        return True

    def parse_failed(self, exc: Exception, data: bytes, pos: int) -> None:
        if isinstance(exc, HttpParserUpgrade):
            # llhttp stops after any request with `Connection: upgrade`.
            taken = exc.args[0]
            tail = data[pos + taken :]
            self.lines.rewind(len(self.lines.data) - taken)
            last = self.exchanges[-1] if self.exchanges else None
            if last is not None and last.plan is not None and last.plan.websocket_key:
                # Bytes past a WebSocket handshake wait for the backend's answer: frames for
                # the tunnel after a 101, the next HTTP request after anything else.
                self._held = bytearray(tail)
                if len(tail) > HELD_LIMIT:
                    self._pause(_PAUSE_QUEUE)
            elif tail:
                # Another protocol's upgrade went to the backend as a plain request.
                self.data_received(tail)
        elif isinstance(exc, HttpParserCallbackError):
            cause = exc.__context__
            if isinstance(cause, HttpError):
                self._reject(cause)
            else:
                log.error("request handling failed", exc_info=cause)
                self._reject(HttpError(500, "internal error"))
        else:
            self._reject(HttpError(400, "malformed request"))

    def line_too_long(self) -> None:
        self._reject(HttpError(400, "chunk-size line or trailer field too long"))

    def wait_for_rest(self) -> None:
        self._pause(_PAUSE_PARSE)

    def rest_parsed(self) -> None:
        self._resume(_PAUSE_PARSE)

    def eof_received(self) -> bool:
        # A client that half-closes after its request still gets the response.
        if not self.exchanges:
            return False
        self.closing = True
        last = self.exchanges[-1]
        if not last.request_done and not self._in_head:
            # Its body can never end: the backend's connection goes at once, not at a timeout.
            if last.finished:
                self.exchange_finished(last, False)  # answered already, the body was dropped
            else:
                last.request_failed(HttpError(400, "the request body ended early"))
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.ctx.connections.discard(self)
        self.ctx.send_watch.remove(self)
        if self.ctx.listeners is not None:
            seat, self.seat = self.seat, -1
            self.ctx.listeners.closed_one(seat)
        self.deadline_kind = NONE
        self.closing = True
        while self.exchanges:
            self.exchanges.popleft().client_lost()
        if self.handover is not None:
            self.handover.close()
            self.handover = None
        self.transport = None
        self._drop_parser()

    def pause_writing(self) -> None:
        # The client reads the response slower than the backend sends it.
        self.write_paused = True
        watch_sending(self)
        if self.exchanges and (upstream := self.exchanges[0].upstream) is not None:
            upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.ctx.send_watch.remove(self)
        if self.exchanges and (upstream := self.exchanges[0].upstream) is not None:
            upstream.resume_reading()

    # -- llhttp callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.events += 1
        self._url = []
        self._url_size = 0
        self._headers = []
        self._header_size = 0
        self._head_read = 0
        self._in_head = True
        if self.ctx.limits is not self._limits:
            self._take_limits(self.ctx.limits)
        if not self.exchanges:
            self.set_deadline(HEADER, self.ctx.timeouts.header)

    def on_url(self, part: bytes) -> None:
        self._url.append(part)
        self._url_size += len(part)
        if self._url_size > self.ctx.limits.max_request_target:
            raise HttpError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # else a trailer field of a chunked body: dropped, the proxy re-frames
            headers = self._headers
            headers.append((name, value))
            self._header_size += len(name) + len(value) + 4
            if self._header_size > self._max_header_bytes or len(headers) > self._max_header_count:
                self._header_limit_reached()
        else:  # trailers count against the same limits as the head
            self.between = True
            self._header_size += len(name) + len(value) + 4
            if self._header_size > self._max_header_bytes:
                self._header_limit_reached()

    def _header_limit_reached(self) -> None:
        if self._header_size > self._max_header_bytes:
            raise HttpError(431, "request header section too large")
        raise HttpError(431, "too many request header fields")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.between = True
        parser = self.parser
        version = parser.get_http_version()
        keep_alive = parser.should_keep_alive() and not self.ctx.draining
        method = parser.get_method()
        target = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        try:
            plan = plan_request(
                method,
                target,
                version,
                self._headers,
                self.peer_ip,
                self.tls,
                self.ctx.router,
                self.ctx.forwarded,
                self.handover is None,  # else the front door's target is kept (exchange.py)
                self.handover is None,  # else the front door admitted it (door.py)
            )
        except HttpError as error:
            if error.close:
                raise
            if parser.should_upgrade():
                raise error.closing() from None
            exchange = Exchange(
                self, None, version == "1.1", keep_alive, error, method, target
            )
        else:
            if plan.body != BODY_NONE and parser.should_upgrade():
                # llhttp skips the body of an upgrade request; it would be read as a new request.
                raise HttpError(400, "an upgrade request cannot carry a body")
            if self.handover is not None:  # what the front door's admission counted
                plan.leases, self.handover.leases = self.handover.leases, None
            exchange = Exchange(self, plan, version == "1.1", keep_alive, None, method, target)
        if self.lines.head_done(
            len(method) + len(target), exchange.plan, self._headers, self._header_size
        ):
            raise HttpError(400, "extra spaces in the request line")
        self._enqueue(exchange)

    # (on_body, on_chunk_header and on_chunk_complete: feeding.py)

    def on_message_complete(self) -> None:
        self.between = False
        self.slice = SLICE
        if self.body:
            self.flush_body()
        if self.exchanges:  # (none if the request was answered early and the connection closed)
            self.exchanges[-1].request_complete()

    # -- exchanges -------------------------------------------------------------------------

    def _enqueue(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)
        if len(self.exchanges) == 1:
            exchange.start()
        elif len(self.exchanges) >= MAX_QUEUED:
            self._pause(_PAUSE_QUEUE)

    def exchange_finished(self, exchange: Exchange, keep_alive: bool) -> None:
        """The active exchange's response is complete (or was answered by the proxy)."""
        if self.exchanges and self.exchanges[0] is exchange:
            self.exchanges.popleft()
        self._resume(_PAUSE_QUEUE | _PAUSE_BODY | _PAUSE_BACKEND)
        if self._rest:
            self.schedule_rest()
        transport = self.transport
        if transport is None:
            return
        # A client that half-closed, or whose later request was refused, still gets the
        # responses queued before that.
        if not keep_alive or (self.closing and not self.exchanges) or self.ctx.draining:
            self.closing = True
            self.deadline_kind = NONE
            self.exchanges.clear()
            close_transport(self, transport)
            return
        if self.exchanges:
            self.exchanges[0].start()
        else:
            self.set_deadline(KEEPALIVE, self.ctx.timeouts.idle)
        if self._held is not None and exchange.plan is not None and exchange.plan.websocket_key:
            # The backend refused the upgrade: what the client sent after it is HTTP again.
            held, self._held = bytes(self._held), None
            if held:
                self.data_received(held)

    def _hold(self, data: bytes) -> None:
        assert self._held is not None
        self._held += data
        if len(self._held) > HELD_LIMIT:
            self._pause(_PAUSE_QUEUE)

    def become_tunnel(self) -> bytes:
        """Leave the connection to a WebSocket tunnel; the bytes held past the handshake.

        Reading stays paused if it was: the socket leaves uvloop for the tunnel engine."""
        held = bytes(self._held or b"")
        self._held = None
        self.ctx.connections.discard(self)
        self.closing = True
        self.deadline_kind = NONE
        self.exchanges.clear()
        self._paused = 0
        self.transport = None
        self._drop_parser()
        return held

    def _drop_parser(self) -> None:
        """The parser and this protocol refer to each other: breaking the cycle frees both at
        once instead of at the next garbage collection (one per closed connection)."""
        self.parser = None  # type: ignore[assignment]

    def _reject(self, error: HttpError) -> None:
        """A request the proxy cannot parse or accept: answer it in turn, then close."""
        self.closing = True
        self._pause(_PAUSE_QUEUE)
        self.body = []
        last = self.exchanges[-1] if self.exchanges else None
        if last is not None and not last.request_done and not self._in_head:
            last.request_failed(error)  # e.g. a malformed chunked body of an accepted request
            return
        # A response to HEAD has no body (RFC 9110 9.3.2); the method is known once a target was.
        # Logged with what was read of the request line: llhttp's method and target so far,
        # or, refused before its target, the line's raw bytes as the target.
        if self._url:
            method, target = self.parser.get_method(), b"".join(self._url)[:PATH_LIMIT]
        else:
            method, target = b"-", self.lines.partial_line(PATH_LIMIT)
        exchange = Exchange(self, None, True, False, error.closing(), method, target)
        exchange.request_done = True
        self._enqueue(exchange)

    # -- flow control, deadlines, shutdown -------------------------------------------------

    def pause_reading_for_backend(self) -> None:
        self._pause(_PAUSE_BACKEND)

    def resume_reading_for_backend(self) -> None:
        self._resume(_PAUSE_BACKEND)

    def pause_reading_for_body(self) -> None:
        self._pause(_PAUSE_BODY)

    def resume_reading_for_body(self) -> None:
        self._resume(_PAUSE_BODY)

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reasons: int) -> None:
        was = self._paused
        self._paused &= ~reasons
        if was and not self._paused and self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def set_deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.ctx.loop.time() + seconds

    def on_deadline(self, kind: int) -> None:
        if kind in (HEADER, KEEPALIVE):
            if kind == HEADER and self._in_head and self.transport is not None:
                head = bool(self._url) and self.parser.get_method() == b"HEAD"
                self.transport.write(error_response(408, "request header timeout", True, head))
            self.close()
        elif self.exchanges:
            exchange = self.exchanges[0]
            if kind == RESPONSE_IDLE and self.write_paused and exchange.plan is not None:
                # The backend waits for a client that does not read (the send watch's call):
                # it gets its idle time again once the client reads.
                self.set_deadline(kind, exchange.plan.route.timeouts.idle)
                return
            exchange.on_deadline(kind)

    def abort_after_flush(self) -> None:
        """Cut the connection after what was written: a response that broke midway."""
        self.exchanges.clear()
        self.close()

    def close(self) -> None:
        self.closing = True
        self.deadline_kind = NONE
        if self.transport is not None:
            close_transport(self, self.transport)

    def send_timed_out(self) -> None:
        """The client stopped taking its response (http/sendwatch.py)."""
        self.closing = True
        self.deadline_kind = NONE
        if self.transport is not None:
            cut_off(self.transport)

    def shutdown(self) -> None:
        """Graceful stop: an idle connection closes now, a busy one after its response."""
        if not self.exchanges:
            self.close()
