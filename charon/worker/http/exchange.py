"""One proxied request and its response.

The client connection feeds the request side (`request_body`, `request_complete`); the backend
connection feeds the response side (`upstream_data`, which drives a fresh llhttp response parser
whose callbacks are the `on_*` methods here). Bytes for the client are batched per backend read
and written once.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import TYPE_CHECKING

import httptools

from charon.worker.deadlines import (
    BODY_IDLE,
    CONNECT,
    FIRST_BYTE,
    RESPONSE_IDLE,
)
from charon.worker.http import reports, waits
from charon.worker.http.bodyrate import body_wait
from charon.worker.http.errors import CLIENT_CLOSED, HttpError, local_response
from charon.worker.http.headerrules import own_fields
from charon.worker.http.request import BODY_CHUNKED, BODY_NONE, RequestPlan
from charon.worker.http.response import (
    OUT_CHUNKED,
    OUT_NONE,
    OUT_UNTIL_CLOSE,
    final_head,
    has_no_body,
    interim_head,
)
from charon.worker.upstreams import failure as failures
from charon.worker.upstreams import retries
from charon.worker.upstreams.failure import UpstreamFailure
from charon.worker.upstreams.retries import (
    may_send_again,
    response_status,
    stale_connection,
)
from charon.worker.websocket.handshake import switching_response
from charon.worker.websocket.tunnel import TunnelInfo, open_tunnel

if TYPE_CHECKING:
    from charon.worker.http.client import ClientConnection
    from charon.worker.upstreams.connecting import Connecting
    from charon.worker.upstreams.connection import UpstreamConnection
    from charon.worker.upstreams.group import TargetState

log = logging.getLogger("charon.worker")

PENDING_BODY_LIMIT = 256 * 1024  # request body held while the backend connection opens


class Exchange:
    __slots__ = (
        "client", "method", "target", "started", "status", "body_bytes", "plan", "error",
        "http11", "keep_alive", "request_done", "pending", "pending_size", "upstream",
        "connecting", "finished", "parser", "reason", "headers", "in_head", "interim", "framing",
        "delimited", "response_started", "response_done", "upstream_reusable", "out", "reused",
        "retried", "switching", "answered", "received", "chosen", "tried", "attempt_at",
        "informed", "failure", "waiting",
    )

    def __init__(
        self,
        client: ClientConnection,
        plan: RequestPlan | None,
        http11: bool,
        keep_alive: bool,
        error: HttpError | None = None,
        method: bytes = b"-",
        target: bytes = b"",
    ) -> None:
        self.client = client
        self.method = method
        self.target = target
        self.started = time.monotonic()  # uvloop's clock has millisecond steps
        self.status = 0
        self.body_bytes = 0
        self.plan = plan
        self.error = error
        self.http11 = http11
        self.keep_alive = keep_alive
        self.request_done = False
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.upstream: UpstreamConnection | None = None
        self.connecting: Connecting | None = None
        self.finished = False
        # Response side.
        self.parser: httptools.HttpResponseParser | None = None
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []  # a new list per response head (_attach)
        self.in_head = True
        self.interim = False
        self.framing = OUT_NONE
        self.delimited = True
        self.response_started = False  # a byte of the final response reached the client
        self.response_done = False
        self.upstream_reusable = True
        self.out: list[bytes] = []
        self.reused = False  # the backend connection came from the pool (see _may_retry)
        self.retried = False
        self.switching = False
        self.answered: bytes | None = None  # the backend's answer read by the front door
        self.received = 0  # request body bytes
        self.chosen: TargetState | None = None  # the target of the attempt under way
        self.tried: tuple[TargetState, ...] | None = None  # targets whose attempts failed
        self.attempt_at = self.started  # when the attempt under way chose its target
        self.informed = False  # a 1xx went to the client: the request is not sent again
        self.failure: UpstreamFailure | None = None  # why the last attempt failed
        self.waiting: asyncio.Task[HttpError | None] | None = None  # the plan's waits (rules)

    # -- lifecycle, driven by the client connection ------------------------------------------

    def start(self) -> None:
        """Become the active exchange of the client connection."""
        if self.error is not None:
            self._answer_locally(self.error)
            return
        assert self.plan is not None
        handover = self.client.handover
        if handover is not None:
            self.client.handover = None
            self._resume_handover(handover)
            return
        if self.plan.waits:
            waits.begin(self, self.plan)
            return
        self.send()

    def send(self) -> None:
        """Send the planned request: on an idle connection to its target, or a new one."""
        assert self.plan is not None
        target = self.chosen = self.plan.target
        assert target is not None  # (plan_request chose it: no handover)
        target.active += 1  # until _report (attempt_at is `started`)
        conn = target.pool.take_idle()
        if conn is not None:
            self._attach(conn, reused=True)
        else:
            self.connect()

    def client_lost(self) -> None:
        if not self.finished:  # logged and counted, as nginx does: 499 if nothing was answered
            self._report(self.status if self.response_started else CLIENT_CLOSED)
        self.finished = True
        self.parser = None  # (see _release_upstream)
        if self.waiting is not None:
            waits.cancel(self)
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None and not self.response_done:
            self.upstream.abort()
            self.upstream = None

    def on_deadline(self, kind: int) -> None:
        if self.waiting is not None:
            waits.timed_out(self)
            return
        if kind == BODY_IDLE:
            self._fail(408, "the request body stalled or came too slowly")
            return
        assert self.plan is not None  # (backend deadlines are set for planned requests only)
        timeouts = self.plan.route.timeouts
        if kind == CONNECT:
            if self.connecting is not None:
                self.connecting.cancel()
                self.connecting = None
            self.attempt_failed(
                504, "the backend did not accept the connection in time",
                failures.timed_out(failures.CONNECT, timeouts.connect),
            )
        elif kind == FIRST_BYTE:
            self.attempt_failed(504, "the backend did not answer in time",
                                failures.timed_out(failures.FIRST_BYTE, timeouts.first_byte), False)
        else:  # RESPONSE_IDLE
            self.attempt_failed(504, "the backend stalled",
                                failures.timed_out(failures.BODY, timeouts.idle), False)

    # -- request side ------------------------------------------------------------------------

    def request_body(self, pieces: list[bytes], size: int) -> None:
        """The body parsed in one turn of the loop: written at once, as one chunk if chunked."""
        if self.plan is None or self.finished:
            return  # a locally answered request: its body is read and dropped
        if len(pieces) > 16:
            pieces = [b"".join(pieces)]  # (many tiny chunks: one buffer, not an iovec each)
        if self.plan.body == BODY_CHUNKED:
            pieces = [b"%x\r\n" % size, *pieces, b"\r\n"]
        self.received += size
        limit = self.plan.route.max_body_size
        if limit and self.received > limit:  # (a chunked body: a Content-Length was checked)
            self._body_too_large()
            return
        if self.upstream is not None:
            self.upstream.transport.writelines(pieces)
            self.client.set_deadline(
                BODY_IDLE, body_wait(self.plan.route.timeouts, self.started, self.received)
            )
        else:
            self.pending += pieces
            self.pending_size += size
            if self.pending_size > PENDING_BODY_LIMIT:
                self.client.pause_reading_for_body()

    def request_failed(self, error: HttpError) -> None:
        """The client's request body turned out malformed: the exchange ends with `error`."""
        self.request_done = True
        self.keep_alive = False
        if self.client.exchanges and self.client.exchanges[0] is self:
            self._fail(error.status, error.detail)
        else:
            if self.plan is not None:
                self.plan.release()
            self.plan, self.error = None, error

    def request_complete(self) -> None:
        self.request_done = True
        if self.plan is None:
            if self.finished and self.client.exchanges and self.client.exchanges[0] is self:
                self.client.exchange_finished(self, self.keep_alive)
            return
        if self.plan.body == BODY_CHUNKED:
            if self.upstream is not None:
                self.upstream.transport.write(b"0\r\n\r\n")
            else:
                self.pending.append(b"0\r\n\r\n")
        # (Without a body, _attach started the first-byte deadline: the request was complete.)
        if self.upstream is not None and not self.response_started and self.plan.body != BODY_NONE:
            self.client.set_deadline(FIRST_BYTE, self.plan.route.timeouts.first_byte)

    # -- backend connection ----------------------------------------------------------------

    def connect(self) -> None:
        assert self.plan is not None and self.chosen is not None
        self.client.set_deadline(CONNECT, self.plan.route.timeouts.connect)
        self.connecting = connecting = self.chosen.pool.connect(self)
        connecting.start()

    def count(self, target: TargetState) -> None:
        """`target` takes the attempt: counted in its `active` until the attempt ends."""
        if self.chosen is not None:
            self.chosen.active -= 1
        target.active += 1
        self.chosen = target
        self.attempt_at = time.monotonic()

    _resume_handover = retries.resume_handover

    def upstream_connected(self, conn: UpstreamConnection) -> None:
        """The connection opened for this exchange is up (its `connection_made`): the request
        goes out at once, unless a pause is due. uvloop starts reading right after
        connection_made, which would undo it: such a connection joins in `connect_done`."""
        if self.finished:  # its connect was cancelled: uvloop closes it, so it is not pooled
            conn.abort()
        elif not self.client.write_paused:
            self._join(conn)

    def connect_done(
        self, connecting: Connecting, conn: UpstreamConnection | None, exc: BaseException | None
    ) -> None:
        """A connect of this exchange is complete or failed: its own if it still waits for it."""
        if connecting is not self.connecting:
            return  # joined in connection_made (or given up, or a retry's connect is under way)
        self.connecting = None
        if conn is not None:
            self._join(conn)
            return
        if self.finished:
            return
        failure = failures.from_exception(exc, failures.CONNECT)
        if isinstance(exc, ssl.SSLError):
            self.attempt_failed(502, "TLS with the backend failed", failure)
            return
        if not isinstance(exc, OSError):
            log.error("connecting to the backend failed", exc_info=exc)
        self.attempt_failed(502, "cannot connect to the backend", failure)

    def attempt_failed(
        self, status: int, detail: str, failure: UpstreamFailure, resend: bool = True
    ) -> None:
        """The attempt on the target failed; `resend`: nothing of the request was sent, so it
        may go whole to another target (decision 11, retries.py) instead of being answered."""
        if not self.finished and retries.attempt_failed(self, status, failure, resend):
            self.parser = None
            self.connect()
            return
        self._fail(status, detail, failure)

    def _join(self, conn: UpstreamConnection) -> None:
        self.connecting = None
        if self.finished:
            conn.pool.release(conn)
            return
        self._attach(conn, reused=False)

    def _attach(self, conn: UpstreamConnection, reused: bool) -> None:
        assert self.plan is not None
        self.upstream = conn
        self.reused = reused
        conn.exchange = self
        if self.client.write_paused:
            conn.pause_reading()  # the client is still slow: this response waits for it too
        self.parser = httptools.HttpResponseParser(self)
        self.in_head = True
        self.headers = []
        answered, self.answered = self.answered, None
        if answered is not None:  # the request went out before the connection was handed over
            self.client.set_deadline(FIRST_BYTE, self.plan.route.timeouts.first_byte)
            if answered:
                self.upstream_data(answered)
            return
        conn.transport.write(self.plan.head)
        if self.pending:
            conn.transport.writelines(self.pending)
            self.pending = []
            self.pending_size = 0
            self.client.resume_reading_for_body()
        timeouts = self.plan.route.timeouts
        if self.request_done or self.plan.body == BODY_NONE:
            self.client.set_deadline(FIRST_BYTE, timeouts.first_byte)
        else:
            self.client.set_deadline(BODY_IDLE, body_wait(timeouts, self.started, self.received))

    def upstream_data(self, data: bytes) -> None:
        if self.response_done or self.parser is None:
            self.upstream_reusable = False  # bytes after a complete response: never forwarded
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.plan is not None and self.plan.websocket_key is not None:
                self._open_tunnel(data[exc.args[0] :])
                return
            self.attempt_failed(
                502, "the backend switched protocols unasked",
                failures.bad_response(failures.FIRST_BYTE, "switched protocols unasked"), False,
            )
        except httptools.HttpParserError as exc:
            self.upstream_reusable = False
            self.attempt_failed(
                502, "the backend sent an invalid response",
                failures.bad_response(failures.response_phase(self.response_started, False),
                                      f"invalid response ({exc})"),
                False,
            )
        self._flush()
        if self.response_done:
            self._release_upstream()
        elif self.plan is not None and self.response_started:
            self.client.set_deadline(RESPONSE_IDLE, self.plan.route.timeouts.idle)

    def _open_tunnel(self, backend_tail: bytes) -> None:
        """The backend answered 101: check it, then hand both connections to the tunnel engine
        (which sends the 101 to the client itself, before any frame)."""
        plan, conn, client, target = self.plan, self.upstream, self.client, self.chosen
        assert plan is not None and plan.websocket_key is not None and conn and target
        if plan.set_cookie is not None:
            self.headers.append(plan.set_cookie)
        rules = plan.route.headers
        switching = switching_response(
            self.headers, plan.websocket_key, plan.head, rules.switching if rules else None
        )
        if switching is None:
            self.upstream_reusable = False
            self.attempt_failed(
                502, "the backend's 101 is not a valid WebSocket handshake",
                failures.bad_response(failures.FIRST_BYTE, "not a valid WebSocket 101"), False,
            )
            return
        transport = client.transport
        if transport is None or transport.is_closing():
            self._fail(502, "the client left")
            return
        head, subprotocol = switching
        self.parser = None  # (see _release_upstream)
        self.response_started = self.response_done = self.finished = True
        self._report(101)
        conn.exchange = None
        self.upstream = None
        info = TunnelInfo(plan.route.host.name, plan.client_ip, plan.path.decode("latin-1"),
                          subprotocol.decode("latin-1"))
        info.release = plan.release  # the tunnel holds the plan's counts until it closes
        info.seat, client.seat = client.seat, -1  # and the connection's (limits/server.py)
        open_tunnel(client.ctx, transport, conn.transport, head, client.become_tunnel(),
                    backend_tail, plan.route, info, target)

    def upstream_closed(self, exc: BaseException | None = None) -> None:
        """The backend closed or reset its connection while this exchange used it (`exc`: the
        error that ended it, None for an orderly close)."""
        self.upstream = None
        if self.response_done or self.finished:
            return
        if not self.in_head and not self.delimited and not self.interim:
            self._complete_response()  # a read-until-close body ends here
            self._flush()
            return
        if self.in_head and not self.response_started:
            if stale_connection(self):
                self.retried = True
                self.parser = None
                self.connect()
                return
            assert self.plan is not None
            sending = not self.request_done and self.plan.body != BODY_NONE
            self.attempt_failed(
                502, "the backend closed the connection early",
                failures.closed(failures.response_phase(False, sending), exc),
                may_send_again(self),
            )
            return
        self.attempt_failed(502, "the backend closed the connection early",
                            failures.closed(failures.BODY, exc), False)

    def _release_upstream(self) -> None:
        conn, self.upstream = self.upstream, None
        if conn is None:
            return
        conn.exchange = None
        if self.upstream_reusable and self.request_done and self.delimited:
            conn.pool.release(conn)
        else:
            conn.close()
        # The parser and this exchange refer to each other: breaking the cycle frees both now,
        # not at the next garbage collection.
        self.parser = None

    # -- response parser callbacks ------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.headers.append((name, value))
        # Trailers are dropped: the proxy re-frames the body.

    def on_headers_complete(self) -> None:
        assert self.parser is not None and self.plan is not None
        if self.response_done:
            # A second response in the same read: never forwarded (decision 4).
            self.upstream_reusable = False
            return
        status = self.parser.get_status_code()
        self.in_head = False
        if 100 <= status < 200 and status != 101:
            self.interim = True
            if self.http11:
                self.informed = True
                self.out.append(interim_head(status, self.reason, self.headers))
            self.headers = []
            self.reason = b""
            return
        if status == 101:
            self.switching = True  # llhttp completes the message, then raises HttpParserUpgrade
            return
        self.status = status
        plan = self.plan
        if plan.route.group.passive:
            response_status(self, status)
        if plan.set_cookie is not None:
            self.headers.append(plan.set_cookie)
        rules = plan.route.headers
        if rules is not None and rules.response is not None:
            self.headers = rules.response.apply(self.headers)
        no_body = has_no_body(status, self.plan.method)
        keep_alive = self.keep_alive and not self.client.ctx.draining
        head, self.framing, self.keep_alive, self.delimited = final_head(
            status, self.reason, self.headers, no_body, self.http11, keep_alive, self.plan.hsts
        )
        self.out.append(head)
        self.response_started = True
        if self.plan.method == b"HEAD":
            if not self.parser.should_keep_alive():
                self.upstream_reusable = False
            self._complete_response()

    def on_body(self, data: bytes) -> None:
        if self.response_done:
            self.upstream_reusable = False
            return
        self.body_bytes += len(data)
        if self.framing == OUT_CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            self.out.append(data)

    def on_message_complete(self) -> None:
        if self.switching:
            return
        if self.interim:
            self.interim = False
            self.in_head = True
            return
        if not self.response_done and not self.in_head:
            assert self.parser is not None
            # Asked now: llhttp forgets the message's keep-alive state once it returns.
            if not self.parser.should_keep_alive():
                self.upstream_reusable = False
            self._complete_response()

    # -- endings -----------------------------------------------------------------------------

    def _complete_response(self) -> None:
        self.response_done = True
        if self.framing == OUT_CHUNKED:
            self.out.append(b"0\r\n\r\n")
        if self.framing == OUT_UNTIL_CLOSE:
            self.keep_alive = False
        self.finished = True
        self._flush()  # before the client connection may close or start the next exchange
        self._report(self.status)
        self.client.exchange_finished(self, self.keep_alive and self.request_done)

    def _flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            transport = self.client.transport
            if transport is not None and not transport.is_closing():
                transport.writelines(out) if len(out) > 1 else transport.write(out[0])

    def _fail(self, status: int, detail: str, failure: UpstreamFailure | None = None) -> None:
        """End the exchange on an error: an error response if nothing was sent yet, else a cut.

        `failure`: the backend's, for the logs and the upstream error metric."""
        self.parser = None  # never called from a parser callback (see _release_upstream)
        if self.finished:
            return
        if failure is not None:
            self._report_upstream_error(failure, status)
        if self.waiting is not None:
            waits.cancel(self)
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.upstream is not None:
            self.upstream.exchange = None
            self.upstream.abort()
            self.upstream = None
        if self.response_started:
            self.finished = True
            self._flush()
            self._report(self.status)
            self.client.abort_after_flush()
            return
        self.out = []
        self._answer_locally(HttpError(status, detail, close=True))

    def _body_too_large(self) -> None:
        """A chunked body passed max_body_size: 413 if no byte of the response went out (the
        backend's connection, which has part of the body, is closed), else the client is cut."""
        self.pending = []
        self.keep_alive = False
        if self.response_started:
            self._fail(413, "request body too large")
            return
        self.parser = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.upstream is not None:
            self.upstream.exchange = None
            self.upstream.abort()
            self.upstream = None
        self._answer_locally(HttpError(413, "request body too large", denied="body_size"))

    def _answer_locally(self, error: HttpError) -> None:
        self.error = error  # (its `denied` goes in the request's record: reports.py)
        head_only = self.method == b"HEAD"  # (also without a plan: a 404 has none)
        keep_alive = self.keep_alive and not error.close and not self.client.ctx.draining
        transport = self.client.transport
        if transport is not None and not transport.is_closing():
            plan = self.plan
            # (Refused while planning, a request has no plan: the error carries them.)
            extra = own_fields(plan.hsts, plan.route.headers) if plan is not None else error.extra
            response = local_response(error, not keep_alive, head_only, extra)
            transport.write(response)
            # Logged with what was sent (its body, as relayed responses count theirs).
            self.body_bytes = len(response) - response.index(b"\r\n\r\n") - 4
        self.response_started = True
        self.response_done = True
        self.finished = True
        self.keep_alive = keep_alive
        self._report(error.status)
        if error.status >= 500 and self.failure is None:  # (a failure was logged: reports.py)
            log.info("answered %d: %s", error.status, error.detail)
        if self.request_done or not keep_alive:
            self.client.exchange_finished(self, keep_alive and self.request_done)
        # else: request_complete() finishes it once the unread body has been dropped

    # -- telemetry (reports.py) ----------------------------------------------------------------

    _report = reports.report
    attempt_over = reports.attempt_over
    _report_upstream_error = reports.upstream_error
