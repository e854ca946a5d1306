"""A WebSocket tunnel: after a valid 101, bytes are copied both ways as they come.

The copying and the frame walking run in C (`engine/`): both sockets of every tunnel of a
worker are in one epoll set, which the worker's `TunnelEngine` serves whenever it is ready. A
tunnel opened on the HTTP path takes them from uvloop (`open_tunnel`); one the engine dialled
(dialled.py) never had them in uvloop. This module keeps the policy: what the proxy does when a
side vanishes, when a client frame breaks a rule, on idle timeout, with pings, on drain and
stop, and what the events say.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from charon.worker.deadlines import NONE, TUNNEL_IDLE
from charon.worker.swap import retarget
from charon.worker.websocket import _engine
from charon.worker.websocket._engine import BACKEND, BACKEND_LOST, CLIENT, CLIENT_LOST, REFUSED
from charon.worker.websocket.frames import (
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    close_frame,
    ping_frame,
)
from charon.worker.websocket.msgcap import message_cap
from charon.worker.websocket.tlsbridge import TlsBridge

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.routing import Route
    from charon.worker.upstreams.group import TargetState
    from charon.worker.websocket._engine import Arrival

log = logging.getLogger("charon.worker")

_SIDE_NAMES = ("client", "backend")


class TunnelInfo:
    """What the open and close events say about a tunnel."""

    __slots__ = ("host", "client_ip", "path", "subprotocol", "opened_at", "opened_clock",
                 "release", "seat")

    def __init__(self, host: str, client_ip: str, path: str, subprotocol: str) -> None:
        self.host = host
        self.client_ip = client_ip
        self.path = path
        self.subprotocol = subprotocol
        self.opened_at = time.time()
        self.opened_clock = time.monotonic()
        # Gives back the counts its handshake's plan took (worker/limits/checks.py) at the end.
        self.release: Callable[[], None] | None = None
        # Its client connection's [server] max_connections_per_ip count (-1: none), given
        # back with the connection (Listeners.closed_one).
        self.seat = -1

    def released(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()

    def take_seat(self) -> int:
        """The seat, once (whoever closes the client connection gives it back)."""
        seat, self.seat = self.seat, -1
        return seat


class TunnelEngine:
    """The worker's engine: read when its epoll fd is ready, swept with the deadlines.

    It is also the front door (door.c): `on_arrivals` gets the connections it accepted (and
    how many more connections are open than at the last call)."""

    __slots__ = ("engine", "deadline", "deadline_kind", "_loop", "on_arrivals")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.on_arrivals: Callable[[list[Arrival] | None, int], None] | None = None
        self.engine = _engine.Engine()
        loop.add_reader(self.engine.fileno(), self._ready)
        # The sweep looks at the engine every time: finished tunnels that cannot flush are
        # cut after the engine's flush limit.
        self.deadline = 0.0
        self.deadline_kind = TUNNEL_IDLE

    def _ready(self) -> None:
        ran = self.engine.run()
        if ran is None:
            return
        reports, arrivals, accepted = ran
        if reports is not None:
            for tunnel, flags, code in reports:
                try:
                    tunnel.on_report(flags, code)  # type: ignore[attr-defined]
                except Exception:  # the other reports and this run's arrivals still go on
                    log.exception("handling a tunnel's report failed")
        if arrivals is not None or accepted:
            if self.on_arrivals is not None:
                self.on_arrivals(arrivals, accepted)
            elif arrivals is not None:  # not serving (yet or any more)
                for fd, *_ in arrivals:
                    os.close(fd)

    def on_deadline(self, kind: int) -> None:
        self.engine.expire()  # tunnels that could not flush; silent new connections
        self.deadline_kind = TUNNEL_IDLE

    @property
    def flushing(self) -> int:
        return self.engine.flushing

    @property
    def waiting(self) -> int:
        """Accepted connections the front door still waits on (at most 0.5 s each): not in
        ctx.connections yet, but a worker that ends before handing them over cuts them."""
        return self.engine.waiting

    def close(self) -> None:
        self._loop.remove_reader(self.engine.fileno())


class Tunnel(_engine.Tunnel):
    """One tunnel's policy; the C base holds its sockets, frame state and counts."""

    __slots__ = (
        "ctx",
        "info",
        "route",
        "settings",
        "_drain_at",
        "deadline",
        "deadline_kind",
        "_next_ping",
        "_pongs_at_ping",
        "_closed_by",
        "_done",
        "target",
        "counted",
        "gauged",
    )

    def __init__(
        self,
        ctx: WorkerContext,
        client_fd: int,
        backend_fd: int,
        route: Route,
        info: TunnelInfo,
        adopt: bool = False,
        target: TargetState | None = None,
    ) -> None:
        settings = route.websocket
        # The engine works on its own duplicates of the fds, or on these (adopt).
        super().__init__(ctx.engine.engine, client_fd, backend_fd, settings.max_frame_size, adopt)
        self.ctx = ctx
        self.info = info
        self.route = route  # matched against a reloaded config's hosts (see swap.py)
        self.settings = settings
        self._drain_at = 0.0  # loop time when a reload that removed its route closes it; 0: no
        self.deadline = 0.0
        self.deadline_kind = NONE
        self._next_ping = ctx.loop.time() + settings.ping_interval
        self._pongs_at_ping = -1  # client pongs counted when the last ping went out; -1: none
        self._closed_by = ""
        self._done = False
        self.target = target  # the route's target it goes to (re-matched by URL on reloads)
        self.counted = False  # in target.active (least_conn, max_connections)
        self.gauged = False  # in its target's open tunnels gauge

    def count(self) -> None:
        """It weighs on its target from now on until it ends (least_conn counts tunnels)."""
        if not self.counted and self.target is not None:
            self.counted = True
            self.target.active += 1

    def uncount(self) -> None:
        target = self.target
        if target is not None:
            if self.counted:
                self.counted = False
                target.active -= 1
            if self.gauged:
                self.gauged = False
                target.totals.tunnels -= 1

    def open(self, head: bytes, client_tail: bytes, backend_tail: bytes) -> None:
        """Start serving: the 101 head goes to the client first, then the tails (bytes read
        past the handshake on each side) go on as frames."""
        try:
            self.start(head, backend_tail, client_tail)
        except OSError as exc:  # could not join the epoll set: the sockets close with self
            log.warning("cannot start a WebSocket tunnel: %s", exc)
            self.info.released()
            if self.ctx.listeners is not None:
                self.ctx.listeners.closed_one(self.info.take_seat())
            return
        self.running()

    def running(self) -> None:
        """The engine serves the tunnel from now on."""
        ctx = self.ctx
        ctx.tunnels.add(self)
        self.count()
        if self.target is not None:
            self.gauged = True
            self.target.totals.tunnels += 1
        if self.route.generation != ctx.router.generation:  # planned before a reload
            retarget(ctx, self, ctx.loop.time() + ctx.config.server.drain_timeout)
        self._arm_deadline()
        cap = message_cap(self.route)
        if cap:
            ctx.message_watch.watch(self, cap)
        self.ctx.telemetry.websocket_open(self.info)
        if self.ctx.closing_tunnels:
            self.shutdown()  # the handshake finished after this worker closed its tunnels

    def on_report(self, flags: int, code: int) -> None:
        """What the engine saw: a client frame broke a rule, or a side's connection ended."""
        if self._done:
            return
        if flags & REFUSED:
            self._closed_by = "proxy"
            self.close(code)
        elif flags & CLIENT_LOST:
            self.lost(CLIENT)
        elif flags & BACKEND_LOST:
            self.lost(BACKEND)

    # -- endings ---------------------------------------------------------------------------

    def lost(self, side: int) -> None:
        """One side's connection ended: the other hears it with a Close at a frame boundary,
        unless a closing handshake had begun (then the peer owes no further frame)."""
        self._closed_by = self._closer(_SIDE_NAMES[side])
        handshake_begun = (
            self.client_close_code is not None or self.backend_close_code is not None
        )
        if not handshake_begun:
            if side == CLIENT and self.at_boundary(BACKEND):
                self.inject(BACKEND, close_frame(CLOSE_GOING_AWAY, masked=True))
            elif side == BACKEND and self.at_boundary(CLIENT):
                self.inject(CLIENT, close_frame(CLOSE_INTERNAL_ERROR, b"backend closed"))
        self._finish()

    def close(self, code: int, reason: bytes = b"") -> None:
        """End the tunnel from the proxy's side (drain, timeout, a broken rule): a Close to
        each peer that may still get one."""
        if self._done:
            return
        self._closed_by = self._closer("proxy")
        if self.at_boundary(CLIENT) and self.backend_close_code is None:
            self.inject(CLIENT, close_frame(code, reason))
        if self.at_boundary(BACKEND) and self.client_close_code is None:
            self.inject(BACKEND, close_frame(code, reason, masked=True))
        self._finish()

    def _closer(self, otherwise: str) -> str:
        """Who began the closing handshake, not whose TCP connection went first."""
        if self._closed_by:
            return self._closed_by
        first = self.first_close
        return _SIDE_NAMES[first] if first is not None else otherwise

    def _finish(self) -> None:
        """Stop reading; each socket closes once what waits for it is sent (the engine cuts
        a peer that does not read within its flush limit)."""
        self._done = True
        self.deadline_kind = NONE
        self.ctx.tunnels.discard(self)
        self.uncount()
        self.finish()
        self.info.released()
        if self.ctx.listeners is not None:  # the client connection counted at accept
            self.ctx.listeners.closed_one(self.info.take_seat())
        self.ctx.telemetry.websocket_close(self.info, self.summary())

    def summary(self) -> dict[str, object]:
        return {
            "duration": time.monotonic() - self.info.opened_clock,
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "client_close_code": self.client_close_code,
            "backend_close_code": self.backend_close_code,
            "closed_by": self._closer(""),
            "close_code": self._close_code(),
        }

    def _close_code(self) -> int:
        """The code of whoever began the closing handshake; 1006 if nobody sent a Close."""
        first, second = self.client_close_code, self.backend_close_code
        if self._closer("") == "backend":
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
            due.append(self.last_traffic + settings.idle_timeout)
        if self._drain_at:
            due.append(self._drain_at)
        if due:
            self.deadline = min(due)
            self.deadline_kind = TUNNEL_IDLE

    def on_deadline(self, kind: int) -> None:
        settings = self.settings
        now = self.ctx.loop.time()
        if self._drain_at and now >= self._drain_at:
            self.close(CLOSE_GOING_AWAY, b"host removed by a reload")
            return
        # The engine's clock is time.monotonic(); uvloop's shares its origin (ms steps).
        if settings.idle_timeout and time.monotonic() >= self.last_traffic + settings.idle_timeout:
            self.close(CLOSE_GOING_AWAY, b"idle timeout")
            return
        if settings.ping_interval and now >= self._next_ping:
            if not self.injecting(CLIENT):  # else the last ping still waits for a boundary
                # The previous ping must have been answered by now.
                if self._pongs_at_ping >= 0 and self.pongs_in <= self._pongs_at_ping:
                    self.close(CLOSE_INTERNAL_ERROR, b"ping timeout")
                    return
                payload = os.urandom(8)
                self._pongs_at_ping = self.pongs_in
                self.expect_pong(payload)  # its Pong is consumed, not forwarded
                self.inject(CLIENT, ping_frame(payload))  # at the next frame boundary
            self._next_ping = now + settings.ping_interval
        self._arm_deadline()

    def shutdown(self) -> None:
        self.close(CLOSE_GOING_AWAY, b"server shutting down")

    # -- reloads (swap.py) -----------------------------------------------------------------

    def retarget(self, route: Route, target: TargetState | None = None) -> None:
        """The reloaded config still routes here, to `target` (the reloaded route's state of
        the same URL, which its counts move to): its idle timeout and ping interval apply
        from the next sweep on, its frame limit from the next client frame."""
        old = self.target
        if target is not None and old is not None and target is not old:
            counted, gauged = self.counted, self.gauged
            self.uncount()
            self.target = target
            if counted:
                self.count()
            if gauged:
                self.gauged = True
                target.totals.tunnels += 1
        if message_cap(route) or message_cap(self.route):
            self.ctx.message_watch.watch(self, message_cap(route))
        self.route, self.settings = route, route.websocket
        self.max_frame_size = route.websocket.max_frame_size
        self._drain_at = 0.0
        if route.websocket.ping_interval:
            self._next_ping = min(
                self._next_ping, self.ctx.loop.time() + route.websocket.ping_interval
            )
        self._arm_deadline()

    def drain(self, at: float) -> None:
        """Its host or backend is gone from the config: closed with 1001 at loop time `at`."""
        if not self._drain_at:
            self._drain_at = at
        self._arm_deadline()


class _Detached(asyncio.Protocol):
    """The protocol of a transport whose socket the engine took: uvloop only closes its fd
    (no shutdown(): the engine's duplicate keeps the connection)."""

    def eof_received(self) -> bool:
        return False


_DETACHED = _Detached()


def open_tunnel(
    ctx: WorkerContext,
    client: asyncio.Transport,
    backend: asyncio.Transport,
    head: bytes,
    client_tail: bytes,
    backend_tail: bytes,
    route: Route,
    info: TunnelInfo,
    target: TargetState | None = None,
) -> None:
    """Hand both connections to a tunnel of the engine after a valid 101 (`head` is the 101
    for the client, not yet written; the tails are bytes read past the handshake)."""
    args = (ctx, client, backend, head, client_tail, backend_tail, route, info, target)
    if client.get_write_buffer_size() or backend.get_write_buffer_size():
        _Drain(*args)  # the engine's bytes must follow what uvloop still holds
    else:
        _take_over(*args)


def _take_over(
    ctx: WorkerContext,
    client: asyncio.Transport,
    backend: asyncio.Transport,
    head: bytes,
    client_tail: bytes,
    backend_tail: bytes,
    route: Route,
    info: TunnelInfo,
    target: TargetState | None,
) -> None:
    bridge = None
    try:
        client_fd = client.get_extra_info("socket").fileno()
        upstream = target.upstream if target is not None else route.upstream
        if upstream.tls:  # the engine gets a plaintext socketpair end (tlsbridge.py)
            bridge = TlsBridge(ctx.loop, backend)
            backend_fd = bridge.engine_end.fileno()
        else:
            backend_fd = backend.get_extra_info("socket").fileno()
        tunnel = Tunnel(ctx, client_fd, backend_fd, route, info, target=target)
    except OSError as exc:  # e.g. out of fds for the duplicates
        log.warning("cannot open a WebSocket tunnel: %s", exc)
        if bridge is not None:
            bridge.discard()
        _abandon(ctx, client, backend, info)
        return
    client.set_protocol(_DETACHED)
    client.close()  # stops reading now; the fd itself is closed on the next turn
    if bridge is not None:
        bridge.start()
    else:
        backend.set_protocol(_DETACHED)
        backend.close()
    tunnel.open(head, client_tail, backend_tail)


class _Drain(asyncio.Protocol):
    """Both transports, reading paused, until uvloop has written all they hold."""

    def __init__(
        self,
        ctx: WorkerContext,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        *rest: object,
    ) -> None:
        self.args = (ctx, client, backend, *rest)
        self.ctx = ctx
        info = rest[4]  # (open_tunnel's order: head, tails, route, info, target)
        assert isinstance(info, TunnelInfo)
        self.info = info
        self.transports = (client, backend)
        self.done = False
        for transport in self.transports:
            transport.pause_reading()
            transport.set_protocol(self)
            # resume_writing() comes when the buffer is empty, not merely low.
            transport.set_write_buffer_limits(high=0, low=0)

    def resume_writing(self) -> None:
        if self.done or any(t.get_write_buffer_size() for t in self.transports):
            return
        self.done = True
        _take_over(*self.args)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self.done = True
            _abandon(self.ctx, *self.transports, self.info)


def _abandon(
    ctx: WorkerContext, client: asyncio.Transport, backend: asyncio.Transport, info: TunnelInfo
) -> None:
    """No tunnel after all: both connections are cut (the client never got the 101)."""
    for transport in (client, backend):
        transport.set_protocol(_DETACHED)
        transport.abort()
    if ctx.listeners is not None:  # the client connection counted at accept
        ctx.listeners.closed_one(info.take_seat())
