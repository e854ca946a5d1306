"""The supervisor's loop, after gunicorn's arbiter: signals only enqueue, the loop acts.

One asyncio loop owns everything the supervisor does: the listening sockets (bound once, handed
to every worker), the worker processes (spawned, watched through a heartbeat pipe, replaced with
back-off when they die, killed when their loop is stuck), the event bus and the admin listener.
Each turn of the loop takes one signal from the queue, or wakes up after TICK, acts on it, then
reaps, checks heartbeats and respawns.

A reload (HUP) is one such action: validate the new config, then hand it to the running workers
(inplace.py, which also grows or shrinks the pool), or, when the sockets change or USR2 asks for
new code, start a new generation of workers and only once it serves, retire the old one, with
retiring generations capped (generations.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time

from charon.admin.logs import LiveLogSection
from charon.admin.metrics import MetricsSection
from charon.admin.process import ProcessMetrics
from charon.admin.server import AdminSection, AdminServer
from charon.admin.upstreams import UpstreamSection
from charon.config import Config, ConfigError, ListenAddress, load_config_text
from charon.events.receiver import EventHub, EventReceiver
from charon.events.schema import CONFIG_RELOAD, WORKER_EXIT
from charon.supervisor.certificates import CertificateManager
from charon.supervisor.generations import start_generation
from charon.supervisor.health import HealthMonitor
from charon.supervisor.inplace import bind_admin, in_place_possible, reload_in_place
from charon.supervisor.pidfile import PidFile
from charon.supervisor.respawn import Respawn
from charon.supervisor.runtime import RuntimeFile
from charon.supervisor.sockets import ListenError, bind_listener
from charon.supervisor.systemd import Notifier, inherited_listeners, take_inherited
from charon.supervisor.workers import ReloadFailure, Slot, WorkerProcess
from charon.worker.limits import table as limits_table
from charon.worker.limits.counts import give_back
from charon.worker.listeners import clear_slot, create_table, slot_of

log = logging.getLogger("charon.supervisor")

TICK = 0.5
FAST_STOP_WAIT = 5.0
RELOAD_READY_TIMEOUT = 20.0  # a new generation must serve within this, or the reload fails
RETIRE_MARGIN = 10.0  # beyond drain + shutdown timeouts, a retiring worker is killed

_STOP_SIGNALS = {signal.SIGTERM: True, signal.SIGINT: False, signal.SIGQUIT: False}
_HANDLED = (
    *_STOP_SIGNALS, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGTTIN, signal.SIGTTOU,
)


class StartupFailure(Exception):
    pass


class Arbiter:
    def __init__(self, config: Config, config_text: str, log_format: str = "text") -> None:
        self.log_format = log_format
        self.config = config
        self.config_text = config_text
        self.listeners: dict[ListenAddress, socket.socket] = {}
        self.slots = [Slot(i) for i in range(config.server.workers)]
        self.retiring: list[WorkerProcess] = []  # old generations letting their connections end
        self.respawn = Respawn()
        self.restarts = 0
        self.signals: asyncio.Queue[int] = asyncio.Queue()
        self.notifier = Notifier()
        self.hub = EventHub()
        self.receiver: EventReceiver | None = None
        self.metrics = MetricsSection((h.name for h in config.hosts), self.ready_workers)
        self.metrics.extra.append(ProcessMetrics(lambda: {
            s.worker_id: s.process.pid for s in self.slots if s.process is not None}).collector)
        self.logs = LiveLogSection.from_config(config.admin)
        self.health = HealthMonitor(self.hub)  # active checks; verdicts shared with workers
        self.upstreams = UpstreamSection(self.health, config)
        self.metrics.extra.append(self.upstreams.collector)
        self.sections: list[AdminSection] = [self.metrics, self.logs, self.upstreams]
        for sink in (self.metrics, self.logs, self.upstreams):
            self.hub.add_sink(sink)
        self.certificates = CertificateManager(self)  # ACME; adds its admin section
        self.apply_lock = asyncio.Lock()  # one config push to the workers at a time
        self.admin: AdminServer | None = None
        self.next_admin: AdminServer | None = None  # a moved one, bound while a reload runs
        self.runtime = RuntimeFile(config.path)  # finds this process for `charon reload`
        self.stopping = False
        self._announced_ready = False
        self.balance_fd = create_table()  # connection counts the workers share
        # Rate buckets and counts the workers share (worker/limits/); a worker's ledger slot
        # is its own while it lives: reaped, its counts are given back.
        self.limits_fd = limits_table.create_table()
        self.limits = limits_table.SharedTable(os.dup(self.limits_fd))
        self.ledgers: set[int] = set()
        self.generation = 0  # +1 per reload: each generation counts in its own table range
        self._reload_count = 0
        self._reload_last = ("", "")  # result, error
        self.config_version = 1  # +1 per config accepted by a reload

    async def run(self) -> int:
        """Serve until a stop signal; the process exit code."""
        loop = asyncio.get_running_loop()
        self.receiver = EventReceiver(self.hub)
        self.receiver.start()
        pidfile = PidFile(self.config.server.pidfile)
        try:
            # The admin listener first: a second `charon run` beside a running one fails here,
            # before it binds a data port (SO_REUSEPORT would let it) or touches the PID file.
            await self._start_admin()
            inherited = inherited_listeners()
            for address in self.config.server.all_listen:
                sock = take_inherited(inherited, address)
                self.listeners[address] = sock if sock is not None else bind_listener(address)
            for (host, port), sock in inherited.items():
                log.warning("socket %s:%d passed by systemd matches no listen address", host, port)
                sock.close()
            pidfile.write()
            self.health.configure(self.config)
            self.runtime.write(self.config.admin.listen)
            for handled in _HANDLED:
                loop.add_signal_handler(handled, self.signals.put_nowait, handled)
            log.info(
                "listening on %s with %d workers",
                ", ".join(str(a) for a in self.listeners), len(self.slots),
            )
            self._spawn_missing()
            while True:
                signum = await self._next_signal()
                if signum is not None and signum in _STOP_SIGNALS:
                    await self._stop(graceful=_STOP_SIGNALS[signal.Signals(signum)])
                    return 0
                if signum in (signal.SIGHUP, signal.SIGUSR2):
                    # USR2: a new generation even when the config could apply in place
                    # (new code after an upgrade).
                    await self._reload(restart=signum == signal.SIGUSR2)
                elif signum == signal.SIGUSR1:
                    self._reopen_logs()
                elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                    self._resize(+1 if signum == signal.SIGTTIN else -1)
                self._reap()
                self._kill_stuck()
                self._spawn_missing()
                self._announce()
                self.certificates.tick()
        except StartupFailure as exc:
            log.error("%s", exc)
            await self._stop(graceful=False)
            return 1
        finally:
            await self.health.stop()
            if self.admin is not None:
                await self.admin.stop()
            await self.receiver.stop()
            pidfile.remove()
            self.runtime.remove()
            os.close(self.balance_fd)
            os.close(self.limits_fd)
            for sock in self.listeners.values():
                sock.close()

    # -- the loop's steps --------------------------------------------------------------------

    async def _next_signal(self, timeout: float = TICK) -> int | None:
        try:
            return await asyncio.wait_for(self.signals.get(), timeout)
        except TimeoutError:
            return None

    def _reap(self) -> None:
        now = time.monotonic()
        for retired in [p for p in self.retiring if p.exit_code() is not None]:
            self.retiring.remove(retired)
            self._forget(retired)
            log.info(
                "retired worker pid %d exited with %s", retired.pid, _describe(retired.exit_code())
            )
        for slot in self.slots:
            proc = slot.process
            if proc is None or proc.exit_code() is None:
                continue
            proc.read_heartbeat()  # an "R" it wrote just before dying may not have been read
            self._forget(proc)
            slot.process = None
            lived = now - proc.started_at
            delay, slot.crashes = self.respawn.delay(proc.ready, lived, slot.crashes)
            self.restarts += 1
            slot.respawn_at = now + delay
            self.hub.supervisor_event(
                [WORKER_EXIT, time.time(), slot.worker_id, proc.pid,
                 _describe(proc.exit_code()), delay]
            )
            log.warning(
                "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
                slot.worker_id, proc.pid, _describe(proc.exit_code()), lived, delay,
            )
        if self.respawn.giving_up(self.ready_workers()):
            raise StartupFailure(
                f"workers keep dying at start-up ({self.respawn.startup_failures} in a row); "
                "giving up"
            )

    def _kill_stuck(self) -> None:
        limit = self.config.server.heartbeat_timeout
        now = time.monotonic()
        current = [s.process for s in self.slots if s.process is not None]
        for proc in current + self.retiring:
            silent = now - proc.last_beat
            if silent > limit and not proc.killed:
                log.error(
                    "worker %d (pid %d) sent no heartbeat for %.1fs: its loop is stuck; killing it",
                    proc.worker_id, proc.pid, silent,
                )
                proc.kill()
            elif proc.retire_by and now > proc.retire_by and not proc.killed:
                log.warning("retired worker pid %d overstayed its drain; killing it", proc.pid)
                proc.kill()

    def _spawn_missing(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.process is None and now >= slot.respawn_at:
                slot.process = self._spawn(
                    slot.worker_id, self.config, self.generation, len(self.slots)
                )
                self._show_versions()

    def _spawn(
        self, worker_id: int, config: Config, generation: int, size: int,
        version: int = 0,
    ) -> WorkerProcess:
        assert self.receiver is not None
        fds = [self.listeners[address].fileno() for address in config.server.all_listen]
        ledger = next((i for i in range(limits_table.LEDGER_SLOTS) if i not in self.ledgers), -1)
        if ledger >= 0:
            self.ledgers.add(ledger)
        proc = WorkerProcess(
            worker_id, config, fds, self.receiver.endpoint, self.log_format,
            self.balance_fd, generation, max(size, worker_id + 1), version or self.config_version,
            self.limits_fd, ledger,
        )
        loop = asyncio.get_running_loop()
        loop.add_reader(proc.heartbeat_fd, self._on_heartbeat, proc)
        loop.add_reader(proc.control.fileno(), self._on_control, proc)
        self.health.add_worker(proc)  # the verdicts now, read before it serves
        log.info("worker %d started (pid %d)", worker_id, proc.pid)
        return proc

    def _on_heartbeat(self, proc: WorkerProcess) -> None:
        if not proc.read_heartbeat():
            asyncio.get_running_loop().remove_reader(proc.heartbeat_fd)

    def _on_control(self, proc: WorkerProcess) -> None:
        if not proc.read_replies():
            asyncio.get_running_loop().remove_reader(proc.control.fileno())

    def _forget(self, proc: WorkerProcess) -> None:
        if proc.exit_code() is not None and not self._slot_shared(proc):
            clear_slot(self.balance_fd, proc.generation, proc.worker_id)
        if proc.ledger >= 0 and proc.exit_code() is not None:
            given = give_back(self.limits, proc.ledger)
            if given:
                log.info("gave back %d counts worker pid %d held", given, proc.pid)
            self.ledgers.discard(proc.ledger)
        self.health.remove_worker(proc)
        loop = asyncio.get_running_loop()
        loop.remove_reader(proc.heartbeat_fd)
        if proc.control.fileno() >= 0:
            loop.remove_reader(proc.control.fileno())
        proc.close()

    def _slot_shared(self, proc: WorkerProcess) -> bool:
        """Another live worker writes the same accept-table slot (generations wrap around)."""
        live = [slot.process for slot in self.slots] + self.retiring
        return any(
            other is not None and other is not proc and other.exit_code() is None
            and slot_of(other.generation, other.worker_id) == slot_of(proc.generation,
                                                                      proc.worker_id)
            for other in live
        )

    def _announce(self) -> None:
        """Tell systemd once every worker of the first generation serves."""
        if not self._announced_ready and self.ready_workers() == len(self.slots):
            self._announced_ready = True
            self.notifier.ready(f"serving with {len(self.slots)} workers")

    def _resize(self, change: int) -> None:
        """TTIN adds a worker, TTOU retires the newest one (never below one)."""
        if change > 0:
            self.slots.append(Slot(len(self.slots)))
        elif len(self.slots) > 1:
            slot = self.slots.pop()
            if slot.process is not None:
                self._retire(slot.process)
        log.info("now %d workers", len(self.slots))

    def _reopen_logs(self) -> None:
        """USR1, after logrotate moved the access log: each worker reopens its file."""
        for proc in [s.process for s in self.slots if s.process is not None] + self.retiring:
            proc.signal(signal.SIGUSR1)

    def _retire(self, proc: WorkerProcess) -> None:
        server = self.config.server
        proc.retire_by = (
            time.monotonic() + server.drain_timeout + server.shutdown_timeout + RETIRE_MARGIN
        )
        proc.signal(signal.SIGUSR2)
        self.health.remove_worker(proc)  # it keeps the config (and health) it has
        self.retiring.append(proc)

    # -- reload ------------------------------------------------------------------------------

    async def _reload(self, restart: bool = False) -> None:
        """Decision 14: the old config keeps serving until the workers serve the new one."""
        self.notifier.reloading()
        path = self.config.path
        log.info("reloading %s", path)
        try:
            config, text = _read(path, self.config_text)
            async with self.apply_lock:
                await bind_admin(self, config)
                if not restart and in_place_possible(self.config, config):
                    await reload_in_place(self, config, text)
                else:
                    await start_generation(self, config, text)
        except (ConfigError, ListenError, ReloadFailure) as exc:
            if self.next_admin is not None:
                await self.next_admin.stop()
                self.next_admin = None
            log.error("reload failed, still serving the previous config: %s", exc)
            self._reload_done("error", str(exc))

    def _show_versions(self) -> dict[int, int]:
        versions = {
            s.worker_id: s.process.config_version for s in self.slots if s.process is not None
        }
        self.metrics.set_config_versions(versions)
        return versions

    async def _wait_ready(self, procs: list[WorkerProcess]) -> None:
        deadline = time.monotonic() + RELOAD_READY_TIMEOUT
        while not all(p.ready for p in procs):
            dead = [p for p in procs if p.exit_code() is not None]
            if dead:
                raise ReloadFailure(f"a new worker exited with {_describe(dead[0].exit_code())}")
            if time.monotonic() > deadline:
                raise ReloadFailure(f"new workers did not serve within {RELOAD_READY_TIMEOUT:.0f}s")
            await asyncio.sleep(0.02)

    async def _started(self, procs: list[WorkerProcess]) -> str:
        """Wait for workers added by a reload; "" once they serve, else why not (the respawn
        machinery goes on replacing them)."""
        try:
            await self._wait_ready(procs)
        except ReloadFailure as exc:
            return str(exc)
        return ""

    def _reload_done(self, result: str, error: str) -> None:
        versions = self._show_versions()
        self._reload_count += 1
        self._reload_last = (result, error)
        self.hub.supervisor_event([
            CONFIG_RELOAD, time.time(), result, self.config.path, error, self.config_version,
            {str(worker): version for worker, version in sorted(versions.items())},
        ])
        status = f"serving with {len(self.slots)} workers (last reload: {result}"
        self.notifier.ready(f"{status}: {error})" if error else f"{status})")

    async def _start_admin(self) -> None:
        if self.config.admin.listen is not None:
            self.admin = AdminServer(self.config.admin.listen, self, self.sections)
            await self.admin.start()
        self.runtime.moved(self.config.admin.listen)

    # -- stop --------------------------------------------------------------------------------

    async def _stop(self, graceful: bool) -> None:
        self.stopping = True
        self.notifier.stopping()
        await self.certificates.stop()
        procs = [slot.process for slot in self.slots if slot.process is not None]
        procs += self.retiring
        log.info("stopping %d workers (%s)", len(procs), "graceful" if graceful else "fast")
        for proc in procs:
            proc.signal(signal.SIGTERM if graceful else signal.SIGQUIT)
        # New connections are refused from now on rather than queued and reset at exit.
        for sock in self.listeners.values():
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
        self.retiring = []

    # -- what the admin endpoint reports -------------------------------------------------------

    def ready_workers(self) -> int:
        """Workers serving now; none once a stop began, so health checks fail over early."""
        if self.stopping:
            return 0
        return sum(1 for s in self.slots if s.process is not None and s.process.ready)

    def worker_pids(self) -> list[int]:
        return [s.process.pid for s in self.slots if s.process is not None]

    def reload_status(self) -> dict[str, object]:
        result, error = self._reload_last
        workers = {
            str(s.worker_id): {"pid": s.process.pid, "config_version": s.process.config_version}
            for s in self.slots if s.process is not None
        }
        return {
            "count": self._reload_count, "last_result": result, "last_error": error,
            "config_version": self.config_version, "workers": workers,
        }


def _read(path: str, current_text: str) -> tuple[Config, str]:
    """The config at `path`, validated; the embedded default config reloads as it is."""
    if path.startswith("<"):
        return load_config_text(current_text, path), current_text
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, 0, f"cannot read: {exc.strerror}") from exc
    return load_config_text(text, path), text


def _describe(code: int | None) -> str:
    if code is None:
        return "no status"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"
