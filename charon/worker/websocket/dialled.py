"""A tunnel whose backend the engine dials (dial.c), for a handshake the front door took.

The request was planned as the HTTP path plans one (`plan_request`); the engine connects,
sends it and reads the answer's head. A 101 comes here (SWITCHING) and is judged as the HTTP
path judges one: llhttp parses it, `switching_response` checks it; a valid one starts the
tunnel in the engine (`switch`). Anything else comes back (HANDED_BACK, or handed back from
here) and the connection goes on as HTTP with the backend's answer, so a 401 or a bad 101 gets
exactly the HTTP path's response. Deadlines are the HTTP path's:
connect, then the first byte (decision 12); either one ends with 504.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import httptools

from charon.worker.deadlines import CONNECT, FIRST_BYTE, NONE
from charon.worker.http.adopted import Handover, adopt_client
from charon.worker.tlspump import serve_http
from charon.worker.upstreams import failure as failures
from charon.worker.websocket._engine import CLIENT, HANDED_BACK, SWITCHING
from charon.worker.websocket.handshake import switching_response
from charon.worker.websocket.tunnel import Tunnel, TunnelInfo

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.http.headerrules import ResponseOps
    from charon.worker.http.request import RequestPlan
    from charon.worker.upstreams.failure import UpstreamFailure

log = logging.getLogger("charon.worker")


class Handshake:
    """What a dialled tunnel keeps until its 101: enough to go on as HTTP without it."""

    __slots__ = ("plan", "target", "peer_ip", "first_read", "started")

    def __init__(self, plan: RequestPlan, target: bytes, peer_ip: str, first_read: bytes):
        self.plan = plan
        self.target = target  # as the client sent it, for the request record
        self.peer_ip = peer_ip
        self.first_read = first_read  # all of it: the HTTP path reads it again if handed back
        self.started = time.monotonic()


class DialledTunnel(Tunnel):
    __slots__ = ("handshake",)

    def __init__(self, ctx: WorkerContext, client_fd: int, handshake: Handshake) -> None:
        plan = handshake.plan
        info = TunnelInfo(plan.route.host_name, plan.client_ip, plan.path.decode("latin-1"), "")
        info.release = plan.release
        super().__init__(ctx, client_fd, -1, plan.route, info, adopt=True, target=plan.target)
        self.handshake: Handshake | None = handshake  # None once open: an idle tunnel is small

    def begin(self, client_tail: bytes) -> None:
        assert self.handshake is not None
        ctx, plan = self.ctx, self.handshake.plan
        assert plan.websocket_key is not None and plan.target is not None
        target = plan.target
        self.count()  # an in-flight request on its target, then a tunnel
        # Its address (a name's next resolved one: the door dials only resolved names).
        host = target.pool.next_host() if target.named else target.upstream.host
        self.dial(host, target.upstream.port, plan.head, client_tail)
        if self.dial_error:  # e.g. no fd left for the socket: the HTTP path tries again
            self._hand_back(None, refused=False)
            return
        ctx.dialling.add(self)
        timeouts = plan.route.timeouts
        self.deadline = ctx.loop.time() + min(timeouts.connect, timeouts.first_byte)
        self.deadline_kind = CONNECT

    def on_report(self, flags: int, code: int) -> None:
        if flags & HANDED_BACK:
            self._hand_back(None)
            return
        if flags & SWITCHING:
            self._switching()
            return
        super().on_report(flags, code)

    def on_deadline(self, kind: int) -> None:
        handshake = self.handshake
        if handshake is None:
            super().on_deadline(kind)
            return
        timeouts = handshake.plan.route.timeouts
        connected_at = self.connected_at
        if connected_at is None:
            due = handshake.started + timeouts.connect
        else:
            due = connected_at + timeouts.first_byte
        left = due - time.monotonic()
        if left <= 0:
            if connected_at is None:
                failure = (504, "the backend did not accept the connection in time",
                           failures.timed_out(failures.CONNECT, timeouts.connect))
            else:
                failure = (504, "the backend did not answer in time",
                           failures.timed_out(failures.FIRST_BYTE, timeouts.first_byte))
            # Nothing was sent before a connect timed out: another target may take it.
            self._hand_back(failure, refused=connected_at is None)
            return
        if connected_at is None:
            left = min(left, timeouts.first_byte)  # it may connect any time from now
        self.deadline = self.ctx.loop.time() + left
        self.deadline_kind = FIRST_BYTE if connected_at is not None else CONNECT

    def _switching(self) -> None:
        """The backend answered 101: the tunnel starts if the HTTP path would start it."""
        handshake = self.handshake
        if handshake is None:
            return
        plan = handshake.plan
        assert plan.websocket_key is not None
        try:
            rules = plan.route.headers
            switching = _check_101(
                self.answer_head(), plan.websocket_key, plan.head, plan.set_cookie,
                rules.switching if rules is not None else None,
            )
        except Exception:  # a bug: the HTTP path takes the connection, never left waiting
            log.exception("checking a dialled 101 failed")
            switching = None
        if switching is None or not self.switch(switching[0]):
            self._hand_back(None)  # the HTTP path answers it (502), as it would have
            return
        self._opened(switching[1])

    def _opened(self, subprotocol: bytes) -> None:
        handshake, self.handshake = self.handshake, None
        assert handshake is not None
        ctx, plan = self.ctx, handshake.plan
        ctx.dialling.discard(self)
        self.info.subprotocol = subprotocol.decode("latin-1")
        duration = time.monotonic() - handshake.started
        ctx.telemetry.request(
            plan.route.host_name, plan.method, 101, duration, 0, plan.client_ip, handshake.target
        )
        if self.target is not None:
            self.target.totals.request(101, duration)
        self.running()

    def _hand_back(
        self, failure: tuple[int, str, UpstreamFailure] | None, refused: bool = True
    ) -> None:
        """The connection goes on as HTTP with the target dialled: with the backend's answer
        so far, or the failure to answer. With nothing read (a failed connect, a close), the
        HTTP path sends the request to another target, or connects again to a lone one;
        `refused` False: the dial never began (a local failure), the same target is tried."""
        handshake, self.handshake = self.handshake, None
        if handshake is None:
            return  # handed back already (a deadline came first)
        ctx = self.ctx
        ctx.dialling.discard(self)
        self.deadline_kind = NONE
        self._done = True
        self.uncount()  # the HTTP path's exchange counts it again
        error = self.dial_error  # (the engine's errno, while it still holds the dial)
        client_fd, backend_fd, answered = self.hand_back()
        if backend_fd >= 0 and (failure is not None or not answered):
            os.close(backend_fd)
            backend_fd = -1
        # Nothing came back: a connect that failed or timed out, a close before any answer.
        refused = refused and backend_fd < 0 and (failure is None or self.connected_at is None)
        if refused and failure is None:
            failure = _dial_failure(error, self.connected_at is not None)
        leases, handshake.plan.leases = handshake.plan.leases, None
        handover = Handover(backend_fd, answered, failure, self.target, refused, leases)
        session = self.take_tls(CLIENT)
        seat = self.info.take_seat()  # the HTTP path gives it back from now on
        if session is not None:
            serve_http(ctx, client_fd, handshake.peer_ip, handshake.first_read, session, handover,
                       seat=seat)
            return
        adopt_client(ctx, client_fd, handshake.peer_ip, handshake.first_read, handover, seat=seat)


def _dial_failure(error: int, connected: bool) -> tuple[int, str, UpstreamFailure]:
    """Why the engine's dial got nothing back: `error` is its errno (a refused connect, a reset;
    ECONNRESET too for a close before any byte, which the engine does not tell apart)."""
    if error > 0:
        cause: OSError | None = OSError(error, os.strerror(error))
    else:
        cause = None
    if not connected:
        return (502, "cannot connect to the backend",
                failures.from_exception(cause, failures.CONNECT))
    return (502, "the backend closed the connection early",
            failures.closed(failures.FIRST_BYTE, cause))


class _Fields:
    """llhttp's callbacks for a 101 head: its fields, as the HTTP path's Exchange gets them."""

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))


def _check_101(
    head: bytes, key: bytes, request_head: bytes, set_cookie: tuple[bytes, bytes] | None,
    rules: ResponseOps | None = None,
) -> tuple[bytes, bytes] | None:
    """The 101 for the client and the subprotocol, if llhttp takes `head` as a whole 101 head
    (the end the engine found: llhttp's) and switching_response accepts it; else None.
    `set_cookie`: the cookie policy's field, added to the client's 101; `rules`: the route's
    response header rules for a 101."""
    fields = _Fields()
    parser = httptools.HttpResponseParser(fields)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade as upgrade:
        if upgrade.args[0] != len(head):
            return None
    except httptools.HttpParserError:
        return None
    else:
        return None  # llhttp's head does not end where the engine's does
    if set_cookie is not None:
        fields.fields.append(set_cookie)
    return switching_response(fields.fields, key, request_head, rules)
