"""The worker process: `python -m charon.worker`, started by the supervisor.

It reads the config text the supervisor validated from stdin, serves the listening sockets it
inherited (their fds are given on the command line) on a uvloop event loop, and writes a
heartbeat byte to a pipe every second so the supervisor can tell a stuck loop from a busy one.

Signals: TERM drains (stop accepting, finish in-flight requests within shutdown_timeout, close
tunnels with 1001), USR2 retires after a reload (the same, but tunnels are kept up to
drain_timeout and idle keep-alive connections end by themselves), INT and QUIT stop at once.
A worker whose supervisor died stops as TERM says, its in-flight requests cut after a few seconds
(see orphan.py).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import itertools
import logging
import os
import pickle
import resource
import signal
import sys
import time
from functools import partial

import uvloop

from charon import logsetup
from charon.config import Config
from charon.events.publisher import EventPublisher
from charon.worker import door
from charon.worker.accesslog import AccessLog
from charon.worker.context import WorkerContext
from charon.worker.control import ControlChannel
from charon.worker.deadlines import DeadlineSweeper
from charon.worker.limits import table as limits_table
from charon.worker.limits.checks import use_ledger
from charon.worker.limits.counts import Ledger
from charon.worker.listeners import Listeners, LoadTable
from charon.worker.orphan import (
    ORPHAN_GRACE,
    SUPERVISOR_GONE,
    orphaned,
    signal_on_supervisor_death,
)
from charon.worker.proxydoor import ProxyDoor, proxied_fds
from charon.worker.swap import apply_config
from charon.worker.telemetry import Telemetry
from charon.worker.tlsserver import take_ticket_secret, tls_listen_fds

log = logging.getLogger("charon.worker")

HEARTBEAT_INTERVAL = 1.0

# How a worker ends: TERM drains and stops, USR2 retires it after a reload, INT/QUIT at once.
STOP, RETIRE, FAST = 1, 2, 3


class Worker:
    def __init__(
        self,
        config: Config,
        listen_fds: list[int],
        heartbeat_fd: int,
        events_endpoint: str | None = None,
        worker_id: int = 0,
        log_format: str = "text",
        table: LoadTable | None = None,
        supervisor_pid: int = 0,
        control_fd: int = -1,
    ) -> None:
        self.control_fd = control_fd
        self.table = table
        self.log_format = log_format
        self.config = config
        self.events_endpoint = events_endpoint
        self.worker_id = worker_id
        self.listen_fds = listen_fds
        self.heartbeat_fd = heartbeat_fd
        self.parent_pid = supervisor_pid or os.getppid()
        self._cut_at = float("inf")  # loop time when an orphan cuts what is still in flight
        self._stop: asyncio.Future[int] | None = None
        self._fast = False
        self._stop_asked = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        events = self.config.admin.events
        publisher = EventPublisher(loop, self.events_endpoint if events else None, self.worker_id)
        access_log = None
        if self.config.server.access_log:
            access_log = AccessLog(loop, self.config.server.access_log, self.log_format == "json")
            loop.add_signal_handler(signal.SIGUSR1, access_log.reopen)
        # The supervisor's secret: TLS ticket keys and the sticky cookie's key derive from it.
        secret = take_ticket_secret()
        ctx = WorkerContext(loop, self.config, Telemetry(publisher, access_log, events), secret)
        ctx.engine.on_arrivals = partial(door.arrived, ctx)
        tls_fds = tls_listen_fds(self.listen_fds, self.config)
        if tls_fds:
            ctx.serve_tls(secret)
        listeners = Listeners(
            ctx.engine.engine, self.listen_fds, self.table, tls_fds,
            proxied_fds(self.listen_fds, self.config), ProxyDoor(ctx),
        )
        listeners.start()
        ctx.listeners = listeners
        loop.add_signal_handler(signal.SIGTERM, self._request_stop, STOP)
        loop.add_signal_handler(SUPERVISOR_GONE, self._orphaned)
        loop.add_signal_handler(signal.SIGUSR2, self._request_stop, RETIRE)
        loop.add_signal_handler(signal.SIGINT, self._request_stop, FAST)
        loop.add_signal_handler(signal.SIGQUIT, self._request_stop, FAST)
        sweeper = DeadlineSweeper(
            loop,
            lambda: itertools.chain(
                ctx.connections, ctx.tunnels, ctx.dialling, (ctx.engine, ctx.send_watch)
            ),
        )
        sweeper.start()
        control = None
        if self.control_fd >= 0:
            # Health verdicts come down the same channel; passive mark-downs go up it.
            control = ControlChannel(loop, self.control_fd, partial(self._apply, ctx), ctx.health)
            ctx.target_down = ctx.health.marked_down
            control.start()
        if orphaned(self.parent_pid):  # the supervisor died while we started
            self._orphaned()
        self._heartbeat(loop, ctx, b"R")  # R: serving; the supervisor counts the worker ready

        mode = await self._stop
        if control is not None:
            control.close()  # a retiring worker keeps the config its connections started with
        listeners.close()  # our copies of the sockets; the supervisor's keep the accept queues
        # From now on every response says `Connection: close`.
        ctx.draining = True
        if mode == RETIRE:
            await self._retire(ctx)
        ctx.closing_tunnels = True  # a tunnel whose 101 comes after this closes at once
        for tunnel in list(ctx.tunnels):
            tunnel.shutdown()  # Close 1001 at a frame boundary
        if mode != FAST and not self._fast:
            for conn in list(ctx.connections):
                conn.shutdown()
            deadline = loop.time() + self.config.server.shutdown_timeout
            # A handshake being dialled is an in-flight request too: its tunnel, once open,
            # closes with 1001 at once (closing_tunnels).
            while _owed(ctx) and self._in_time(loop, deadline):
                await asyncio.sleep(0.05)
            if ctx.connections:
                log.warning("%d connections open at the end of the drain", len(ctx.connections))
            # The tunnels' last bytes (their Close frames) still waiting for slow peers.
            while ctx.engine.flushing and self._in_time(loop, deadline):
                await asyncio.sleep(0.05)
        sweeper.stop()
        for conn in list(ctx.connections):
            if conn.transport is not None:
                conn.transport.abort()
        ctx.close_idle_upstreams()
        ctx.engine.close()
        ctx.report_metrics()
        publisher.close()
        if access_log is not None:
            access_log.close()

    async def _retire(self, ctx: WorkerContext) -> None:
        """After a reload: new workers take new connections while this one lets its own end.

        Idle keep-alive connections are not cut (a request racing the close would fail): each
        closes after its next response or when its keep-alive time runs out. Tunnels stay up
        to drain_timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.server.drain_timeout
        while (
            (_owed(ctx) or ctx.tunnels)
            and loop.time() < deadline
            and not self._fast
            and not self._stop_asked
        ):
            await asyncio.sleep(0.1)

    def _apply(self, ctx: WorkerContext, config: Config) -> str:
        """A reload in place (see swap.py): "" once applied, else why not."""
        if self._stop is not None and self._stop.done():
            return "the worker is stopping"
        started = time.process_time()
        drained = apply_config(ctx, config)
        self.config = config
        log.info(
            "config applied in place: %d hosts, %d tunnels draining; %.2f ms CPU for the swap",
            len(config.hosts), drained, (time.process_time() - started) * 1000,
        )
        return ""

    def _in_time(self, loop: asyncio.AbstractEventLoop, deadline: float) -> bool:
        """The drain goes on: before `deadline` and an orphan's cut, and no fast stop asked."""
        return loop.time() < min(deadline, self._cut_at) and not self._fast

    def _orphaned(self) -> None:
        if self._cut_at == float("inf"):
            grace = min(ORPHAN_GRACE, self.config.server.shutdown_timeout)
            log.warning("the supervisor (pid %d) is gone: stopping, in-flight requests get %.1fs",
                        self.parent_pid, grace)
            self._cut_at = asyncio.get_running_loop().time() + grace
        self._request_stop(STOP)

    def _request_stop(self, mode: int) -> None:
        if mode == FAST:
            self._fast = True  # also cuts a drain already under way
        elif mode == STOP:
            self._stop_asked = True  # also ends a retirement's drain: stop as TERM says
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(mode)

    def _heartbeat(self, loop: asyncio.AbstractEventLoop, ctx: WorkerContext, beat: bytes) -> None:
        if orphaned(self.parent_pid):
            self._orphaned()  # the supervisor is gone: nobody would replace us
        try:
            os.write(self.heartbeat_fd, beat)
        except BlockingIOError:
            pass  # the supervisor is not reading (stopped?): the beat is simply skipped
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                self._orphaned()
        ctx.close_expired_upstreams()
        ctx.report_metrics()
        if ctx.listeners is not None:
            ctx.listeners.check()
        loop.call_later(HEARTBEAT_INTERVAL, self._heartbeat, loop, ctx, b".")


def _owed(ctx: WorkerContext) -> bool:
    """Whether clients still wait on this worker: open connections, handshakes being dialled,
    and connections the front door accepted but has not handed over (waiting up to 0.5 s for
    their first bytes; a worker that ended before then reset those whose request came late),
    PROXY listeners' connections whose header is being read."""
    door = ctx.listeners.proxy_door if ctx.listeners is not None else None
    return bool(
        ctx.connections or ctx.dialling or ctx.engine.waiting or (door and door.pending)
    )


def _raise_fd_limit() -> None:
    """Each WebSocket tunnel holds two sockets: allow as many as the hard limit permits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="charon-worker")
    parser.add_argument("--listen-fds", required=True, help="comma-separated inherited fds")
    parser.add_argument("--heartbeat-fd", type=int, required=True)
    parser.add_argument("--config-path", default="<stdin>")
    parser.add_argument("--worker-id", type=int, default=0)
    parser.add_argument("--events", default=None, help="ZeroMQ endpoint of the supervisor")
    parser.add_argument("--log-format", choices=logsetup.FORMATS, default="text")
    parser.add_argument("--balance-fd", type=int, default=-1, help="shared connection counts")
    parser.add_argument("--generation", type=int, default=0)
    parser.add_argument("--generation-size", type=int, default=1)
    parser.add_argument("--supervisor-pid", type=int, default=0)
    parser.add_argument("--control-fd", type=int, default=-1, help="reloads in place")
    parser.add_argument("--limits-fd", type=int, default=-1, help="shared rate limits, counts")
    parser.add_argument("--ledger", type=int, default=-1, help="this worker's ledger slot")
    args = parser.parse_args(argv)
    # First: from here on the kernel tells us if the supervisor dies (see orphan.py).
    signal_on_supervisor_death()

    # USR1 reopens the access log; a worker without one (or not serving yet) ignores it.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    logsetup.setup(f"worker-{args.worker_id}", args.log_format)
    # The config the supervisor checked, as it pickled it (workers.py): no config or htpasswd
    # file is parsed again here. (Certificates are loaded by tlsserver.py, which serves what
    # it can read: one replaced or expired since must not stop a respawned worker.)
    config: Config = pickle.loads(sys.stdin.buffer.read())
    fds = [int(fd) for fd in args.listen_fds.split(",") if fd]
    os.set_blocking(args.heartbeat_fd, False)
    _raise_fd_limit()
    if args.limits_fd >= 0:
        limits_table.install(limits_table.SharedTable(args.limits_fd))
        if args.ledger >= 0:
            use_ledger(Ledger(limits_table.shared_table(), args.ledger))
    table = None
    if args.balance_fd >= 0:
        table = LoadTable(args.balance_fd, args.generation, args.worker_id, args.generation_size)
    worker = Worker(
        config, fds, args.heartbeat_fd, args.events, args.worker_id, args.log_format, table,
        args.supervisor_pid, args.control_fd,
    )
    # What start-up made lives as long as the worker: keep it out of every garbage collection.
    gc.freeze()
    uvloop.run(worker.run())
