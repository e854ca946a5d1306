"""The supervisor's loop, after gunicorn's arbiter: signals only enqueue, the loop acts.

One asyncio loop owns everything the supervisor does: the listening sockets (bound once, handed
to every worker), the worker processes (spawned, watched through a heartbeat pipe, replaced with
back-off when they die, killed when their loop is stuck) and the admin listener. Each turn of
the loop takes one signal from the queue, or wakes up after TICK, then reaps, checks heartbeats
and respawns.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from dataclasses import dataclass

from charon.admin.server import AdminSection, AdminServer
from charon.config import Config
from charon.events.receiver import EventHub, EventReceiver
from charon.events.schema import WORKER_EXIT
from charon.supervisor.sockets import bind_listener
from charon.supervisor.workers import WorkerProcess

log = logging.getLogger("charon.supervisor")

TICK = 0.5
EARLY_DEATH = 5.0  # a worker that dies sooner than this after start counts as a start-up failure
MAX_EARLY_DEATHS = 5  # consecutive ones with no worker serving: give up
MAX_BACKOFF = 30.0
FAST_STOP_WAIT = 5.0

_STOP_SIGNALS = {signal.SIGTERM: True, signal.SIGINT: False, signal.SIGQUIT: False}


class StartupFailure(Exception):
    pass


@dataclass
class Slot:
    """A worker position: the process in it, or when the next one may start."""

    worker_id: int
    process: WorkerProcess | None = None
    respawn_at: float = 0.0


class Arbiter:
    def __init__(self, config: Config, config_text: str) -> None:
        self.config = config
        self.config_text = config_text
        self.listeners: list[socket.socket] = []
        self.slots = [Slot(i) for i in range(config.server.workers)]
        self.early_deaths = 0
        self.restarts = 0
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.admin: AdminServer | None = None
        self.hub = EventHub()
        self.receiver: EventReceiver | None = None
        self.sections: list[AdminSection] = []
        self.stopping = False
        from charon.admin.metrics import MetricsSection

        self.metrics = MetricsSection((h.name for h in config.hosts), self.ready_workers)
        self.sections.append(self.metrics)
        self.hub.add_sink(self.metrics)

    async def run(self) -> int:
        """Serve until a stop signal; the process exit code."""
        loop = asyncio.get_running_loop()
        self.listeners = [bind_listener(addr) for addr in self.config.server.listen]
        self.receiver = EventReceiver(self.hub)
        self.receiver.start()
        if self.config.admin.listen is not None:
            self.admin = AdminServer(self.config.admin.listen, self, self.sections)
            await self.admin.start()
        for handled in (*_STOP_SIGNALS, signal.SIGCHLD, signal.SIGHUP):
            loop.add_signal_handler(handled, self.signals.put_nowait, handled)
        log.info(
            "listening on %s with %d workers",
            ", ".join(str(a) for a in self.config.server.listen),
            len(self.slots),
        )
        try:
            self._spawn_missing()
            while True:
                signum = await self._next_signal()
                if signum is not None and signum in _STOP_SIGNALS:
                    await self._stop(graceful=_STOP_SIGNALS[signal.Signals(signum)])
                    return 0
                if signum == signal.SIGHUP:
                    log.warning("SIGHUP: configuration reload is not implemented yet; ignored")
                self._reap()
                self._kill_stuck()
                self._spawn_missing()
        except StartupFailure as exc:
            log.error("%s", exc)
            await self._stop(graceful=False)
            return 1
        finally:
            if self.admin is not None:
                await self.admin.stop()
            if self.receiver is not None:
                await self.receiver.stop()
            for sock in self.listeners:
                sock.close()

    # -- the loop's steps --------------------------------------------------------------------

    async def _next_signal(self, timeout: float = TICK) -> int | None:
        try:
            return await asyncio.wait_for(self.signals.get(), timeout)
        except TimeoutError:
            return None

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.process
            if proc is None or proc.exit_code() is None:
                continue
            self._forget(proc)
            slot.process = None
            lived = now - proc.started_at
            if lived < EARLY_DEATH or not proc.ready:
                self.early_deaths += 1
            else:
                self.early_deaths = 0
            self.restarts += 1
            delay = _backoff(self.early_deaths)
            slot.respawn_at = now + delay
            self.hub.supervisor_event(
                [WORKER_EXIT, time.time(), slot.worker_id, proc.pid,
                 _describe_exit(proc.exit_code()), delay]
            )
            log.warning(
                "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                slot.worker_id, proc.pid, _describe_exit(proc.exit_code()), lived, delay,
            )
        if self.early_deaths >= MAX_EARLY_DEATHS and self.ready_workers() == 0:
            raise StartupFailure(
                f"workers keep dying at start-up ({self.early_deaths} in a row); giving up"
            )

    def _kill_stuck(self) -> None:
        limit = self.config.server.heartbeat_timeout
        now = time.monotonic()
        for slot in self.slots:
            proc = slot.process
            if proc is not None and not proc.stopping and now - proc.last_beat > limit:
                log.error(
                    "worker %d (pid %d) sent no heartbeat for %.1fs: its loop is stuck; killing it",
                    slot.worker_id, proc.pid, now - proc.last_beat,
                )
                proc.stopping = True
                proc.kill()

    def _spawn_missing(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None and now >= slot.respawn_at:
                slot.process = self._spawn(slot.worker_id)

    def _spawn(self, worker_id: int) -> WorkerProcess:
        assert self.receiver is not None
        proc = WorkerProcess(
            worker_id,
            self.config_text,
            self.config.path,
            [s.fileno() for s in self.listeners],
            self.receiver.endpoint,
        )
        asyncio.get_running_loop().add_reader(proc.heartbeat_fd, self._on_heartbeat, proc)
        log.info("worker %d started (pid %d)", worker_id, proc.pid)
        return proc

    def _on_heartbeat(self, proc: WorkerProcess) -> None:
        if not proc.read_heartbeat():
            asyncio.get_running_loop().remove_reader(proc.heartbeat_fd)

    def _forget(self, proc: WorkerProcess) -> None:
        asyncio.get_running_loop().remove_reader(proc.heartbeat_fd)
        proc.close()

    async def _stop(self, graceful: bool) -> None:
        self.stopping = True
        procs = [slot.process for slot in self.slots if slot.process is not None]
        log.info("stopping %d workers (%s)", len(procs), "graceful" if graceful else "fast")
        for proc in procs:
            proc.stopping = True
            proc.signal(signal.SIGTERM if graceful else signal.SIGQUIT)
        # New connections are refused from now on rather than queued and reset at exit.
        for sock in self.listeners:
            sock.close()
        # Workers bound their own drain by shutdown_timeout; this is the backstop.
        wait = self.config.server.shutdown_timeout + 5.0 if graceful else FAST_STOP_WAIT
        deadline = time.monotonic() + wait
        while any(p.exit_code() is None for p in procs) and time.monotonic() < deadline:
            signum = await self._next_signal(0.05)
            if graceful and signum in (signal.SIGINT, signal.SIGQUIT):
                log.info("fast stop requested during the drain")
                graceful = False
                wait = FAST_STOP_WAIT
                deadline = min(deadline, time.monotonic() + wait)
                for proc in procs:
                    proc.signal(signal.SIGQUIT)
        for proc in procs:
            if proc.exit_code() is None:
                log.warning("worker pid %d did not stop in %.0fs; killing it", proc.pid, wait)
                proc.kill()
                proc.process.wait()
            self._forget(proc)
        for slot in self.slots:
            slot.process = None

    # -- what the admin endpoint reports -------------------------------------------------------

    def ready_workers(self) -> int:
        """Workers serving now; none once a stop began, so health checks fail over early."""
        if self.stopping:
            return 0
        return sum(1 for s in self.slots if s.process is not None and s.process.ready)

    def worker_pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process is not None]


def _backoff(early_deaths: int) -> float:
    """0 after a worker that served a while, then 0.5 s doubling up to MAX_BACKOFF."""
    return 0.0 if early_deaths == 0 else min(0.5 * 2 ** (early_deaths - 1), MAX_BACKOFF)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no status"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
