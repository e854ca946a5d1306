"""The supervisor's view of every target's health, and how the workers learn it (issue 13).

- Active checks: one asyncio task per (Backends.name, target URL) with a `health_check`, whatever
  the number of workers; at most MAX_CONCURRENT probes at once, each bounded by its timeout.
  `healthy_threshold` passes in a row bring a target back, `unhealthy_threshold` failures in
  a row take it out. A reload keeps the task (and its counts and verdict) of a target it keeps,
  restarts one whose check changed, stops those it removed.
- Passive mark-downs: a worker whose own passive checks marked a target down says so on its
  control channel; every worker is told, for the time it has left.
- Sharing: every change to the verdict store goes to every current worker as one health
  message (worker/control.py); a worker started later gets all verdicts at spawn, before it
  serves. Workers acknowledge each message, which gives how long a change took to reach them
  all (`/upstreams`, `propagation`).
- Live log: an `upstream_health` record for each change a user should see.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from charon.config.model import Backends, Config, HealthCheck, Upstream
from charon.events.receiver import EventHub
from charon.events.schema import UPSTREAM_HEALTH
from charon.supervisor.health.probe import Outcome, probe
from charon.supervisor.health.store import ACTIVE, PASSIVE, MemoryStore, Verdict, VerdictStore
from charon.worker.control import APPLIED, DOWN, VERDICTS, encode_health
from charon.worker.upstreams.health import TargetKey

if TYPE_CHECKING:
    from charon.supervisor.workers import WorkerProcess

log = logging.getLogger("charon.supervisor")

MAX_CONCURRENT = 64  # probes in flight at once; more wait for a slot
FIRST_CHECK_SPREAD = 1.0  # first checks start within this (or the interval, if shorter)
PASSIVE_REPEAT = 1.0  # a report ending within this of the mark-down already told is not relayed
PENDING_KEPT = 64  # broadcasts whose acknowledgements are still counted


@dataclass(frozen=True)
class ConfiguredTarget:
    """One target of one Backends, as the config has it."""

    key: TargetKey
    host: str  # its proxy host's name: the `host` label of its metrics
    upstream: Upstream
    check: HealthCheck | None
    probe_host: str  # the Host header of its checks


def configured_targets(config: Config) -> dict[TargetKey, ConfiguredTarget]:
    found: dict[TargetKey, ConfiguredTarget] = {}
    for host in config.hosts:
        groups: list[Backends] = [host.backends, *(loc.backends for loc in host.locations)]
        # A wildcard's checks ask for the parent name: "*.example.com" is no Host a backend knows.
        default_host = host.name[2:] if host.name.startswith("*.") else host.name
        for backends in groups:
            check = backends.health_check
            probe_host = (check.host if check is not None and check.host else default_host)
            for target in backends.targets:
                key = (backends.name, target.upstream.url)
                found.setdefault(key, ConfiguredTarget(
                    key, host.name, target.upstream, check, probe_host))
    return found


class _Checker:
    """The active check of one target: its task and its counts."""

    def __init__(self, target: ConfiguredTarget) -> None:
        self.target = target
        self.probes = 0  # made since the supervisor started (one per interval, for all workers)
        self.passes = 0  # in a row
        self.failures = 0  # in a row
        self.checked_at = 0.0  # wall clock of the last probe's end
        self.last: Outcome | None = None
        self.task: asyncio.Task[None] | None = None


class _Broadcast:
    """A verdict message on its way: the workers that have not acknowledged it yet."""

    __slots__ = ("sent_at", "waiting")

    def __init__(self, sent_at: float, waiting: set[int]) -> None:
        self.sent_at = sent_at
        self.waiting = waiting


class HealthMonitor:
    def __init__(self, hub: EventHub, store: VerdictStore | None = None) -> None:
        self.hub = hub
        self.store: VerdictStore = store if store is not None else MemoryStore()
        self.store.watch(self._changed)
        self.targets: dict[TargetKey, ConfiguredTarget] = {}
        self.checkers: dict[TargetKey, _Checker] = {}
        self.peers: dict[int, WorkerProcess] = {}  # pid -> a worker told of every change
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._seq = 0  # the last verdict message sent to the workers
        self.applied: dict[int, int] = {}  # pid -> the last message it acknowledged
        self._pending: OrderedDict[int, _Broadcast] = OrderedDict()
        self.propagation: dict[str, Any] = {"changes": 0, "last_seconds": None,
                                            "max_seconds": None}
        self._timers: dict[TargetKey, asyncio.TimerHandle] = {}
        self._stopped = False

    # -- configuration -------------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Start, keep, restart or stop checks for the targets `config` has."""
        if self._stopped:
            return
        new = configured_targets(config)
        for key in [k for k in self.checkers if k not in new or new[k].check is None]:
            self._stop_checker(key)
            verdict = self.store.get(key)
            if key in new and verdict is not None and not verdict.up:
                self._put(key, verdict, up=True, reason="health check removed")
        for key in [k for k in self.store_keys() if k not in new]:
            verdict = self.store.get(key)
            if verdict is not None and not verdict.healthy(time.time()):
                # workers keep an entry per key: a target added again must not come back down
                self.store.put(key, Verdict(True, time.time(), "removed from the config"))
                self._record(key, True, "removed from the config")
            self.store.remove(key)
        for key, target in new.items():
            checker = self.checkers.get(key)
            if target.check is None:
                continue
            if checker is not None and checker.target == target:
                continue
            if checker is not None:  # the check changed: the same counts, a new rhythm
                assert checker.task is not None
                checker.task.cancel()
            else:
                checker = self.checkers[key] = _Checker(target)
            checker.target = target
            checker.task = asyncio.get_running_loop().create_task(
                self._run(checker), name=f"health check {key[0]} {key[1]}")
        self.targets = new

    def store_keys(self) -> list[TargetKey]:
        return [key for key, _ in self.store.items()]

    def _stop_checker(self, key: TargetKey) -> None:
        checker = self.checkers.pop(key)
        if checker.task is not None:
            checker.task.cancel()

    async def stop(self) -> None:
        self._stopped = True
        tasks = [c.task for c in self.checkers.values() if c.task is not None]
        for task in tasks:
            task.cancel()
        for timer in self._timers.values():
            timer.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.checkers.clear()

    # -- active checks -------------------------------------------------------------------------

    async def _run(self, checker: _Checker) -> None:
        target = checker.target
        check = target.check
        assert check is not None
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.uniform(0, min(check.interval, FIRST_CHECK_SPREAD)))
        while True:
            started = loop.time()
            async with self._slots:
                outcome = await probe(target.upstream, check, target.probe_host)
            self._judge(checker, outcome)
            await asyncio.sleep(max(0.0, started + check.interval - loop.time()))

    def _judge(self, checker: _Checker, outcome: Outcome) -> None:
        check = checker.target.check
        assert check is not None
        checker.last = outcome
        checker.probes += 1
        checker.checked_at = time.time()
        key = checker.target.key
        verdict = self.store.get(key)
        up = verdict.up if verdict is not None else True
        if outcome.ok:
            checker.passes += 1
            checker.failures = 0
            if not up and checker.passes >= check.healthy_threshold:
                self._put(key, verdict, up=True,
                          reason=f"{checker.passes} checks passed ({outcome.reason})")
        else:
            checker.failures += 1
            checker.passes = 0
            if up and checker.failures >= check.unhealthy_threshold:
                self._put(key, verdict, up=False,
                          reason=f"{checker.failures} checks failed: {outcome.reason}")

    def _put(self, key: TargetKey, old: Verdict | None, up: bool, reason: str) -> None:
        now = time.time()
        down_until = old.down_until if old is not None else 0.0
        log.log(logging.INFO if up else logging.WARNING, "target %s of %s is %s: %s",
                key[1], key[0], "up" if up else "down", reason)
        self.store.put(key, Verdict(up, now, reason, down_until, ACTIVE))
        self._record(key, up and now >= down_until, reason)

    # -- passive mark-downs from workers ---------------------------------------------------------

    def on_health(self, proc: WorkerProcess, message: list[Any]) -> None:
        """A health message from a worker's control channel."""
        try:
            if message[0] == APPLIED:
                self._acknowledged(proc.pid, int(message[1]))
            elif message[0] == DOWN:
                _, name, url, down_for = message
                self.passive_down((str(name), str(url)), float(down_for), proc.worker_id)
        except (ValueError, TypeError, IndexError):
            log.warning("worker %d (pid %d): bad health message %r", proc.worker_id, proc.pid,
                        message[:1])

    def passive_down(self, key: TargetKey, down_for: float, worker_id: int) -> None:
        if down_for <= 0 or self._stopped:
            return
        now = time.time()
        until = now + down_for
        old = self.store.get(key)
        if old is not None and old.down_until >= until - PASSIVE_REPEAT:
            return  # every worker was told of a mark-down that ends about then
        was_healthy = old is None or old.healthy(now)
        reason = f"passive checks of worker {worker_id} marked it down for {down_for:.1f}s"
        up = old.up if old is not None else True
        since = old.since if old is not None else now
        self.store.put(key, Verdict(up, since, reason, until, PASSIVE))
        if was_healthy:
            log.warning("target %s of %s is down: %s", key[1], key[0], reason)
            self._record(key, False, reason)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(
            down_for, self._passive_over, key, until)

    def _passive_over(self, key: TargetKey, until: float) -> None:
        self._timers.pop(key, None)
        verdict = self.store.get(key)
        if verdict is None or verdict.down_until != until:
            return
        if verdict.up:
            self._record(key, True, "passive mark-down over (fail_timeout)")

    # -- telling the workers ---------------------------------------------------------------------

    def add_worker(self, proc: WorkerProcess) -> None:
        """A worker just spawned: it gets every verdict now (read before it serves), and every
        change from now on."""
        self.peers[proc.pid] = proc
        proc.on_health = self.on_health
        now = time.time()
        entries = [_entry(key, verdict, now) for key, verdict in self.store.items()]
        # Numbered as the last change it includes: once acknowledged, the worker is in step.
        self._send(proc, encode_health([VERDICTS, self._seq, entries]))

    def remove_worker(self, proc: WorkerProcess) -> None:
        """A worker retired or gone: no more verdicts for it."""
        self.peers.pop(proc.pid, None)
        self.applied.pop(proc.pid, None)
        for broadcast in self._pending.values():
            broadcast.waiting.discard(proc.pid)

    def _changed(self, key: TargetKey, verdict: Verdict) -> None:
        if not self.peers:
            return
        self._seq += 1
        message = encode_health([VERDICTS, self._seq, [_entry(key, verdict, time.time())]])
        self._pending[self._seq] = _Broadcast(time.monotonic(), set(self.peers))
        while len(self._pending) > PENDING_KEPT:
            self._pending.popitem(last=False)
        for proc in list(self.peers.values()):
            self._send(proc, message)

    def _send(self, proc: WorkerProcess, message: bytes) -> None:
        try:
            proc.post(message)
        except OSError:
            self.remove_worker(proc)  # its channel is gone; the loop reaps it

    def _acknowledged(self, pid: int, seq: int) -> None:
        if pid in self.peers:
            self.applied[pid] = max(self.applied.get(pid, 0), seq)
        broadcast = self._pending.get(seq)
        if broadcast is None:
            return
        broadcast.waiting.discard(pid)
        if not broadcast.waiting:
            del self._pending[seq]
            took = time.monotonic() - broadcast.sent_at
            stats = self.propagation
            stats["changes"] += 1
            stats["last_seconds"] = round(took, 6)
            stats["max_seconds"] = round(max(stats["max_seconds"] or 0.0, took), 6)

    # -- what the admin listener shows -----------------------------------------------------------

    def _record(self, key: TargetKey, healthy: bool, reason: str) -> None:
        self.hub.supervisor_event([UPSTREAM_HEALTH, time.time(), key[0], key[1], healthy, reason])

    def sharing(self) -> dict[str, Any]:
        """Whether every worker has the latest verdicts, and how fast changes reached them."""
        workers = [
            {"worker": proc.worker_id, "pid": pid, "applied": self.applied.get(pid)}
            for pid, proc in sorted(self.peers.items(), key=lambda item: item[1].worker_id)
        ]
        return {"seq": self._seq, "workers": workers, **self.propagation}

    def healthy(self, key: TargetKey, now: float | None = None) -> bool:
        verdict = self.store.get(key)
        return verdict is None or verdict.healthy(time.time() if now is None else now)

    def describe(self, keys: Iterable[TargetKey]) -> dict[TargetKey, dict[str, Any]]:
        """State, reason and check counts per target, for /upstreams."""
        now = time.time()
        found: dict[TargetKey, dict[str, Any]] = {}
        for key in keys:
            verdict = self.store.get(key)
            checker = self.checkers.get(key)
            entry: dict[str, Any] = {"healthy": True, "state": "up", "reason": "", "since": None}
            if verdict is not None:
                entry.update(healthy=verdict.healthy(now), reason=verdict.reason,
                             since=verdict.since, source=verdict.source)
                if not verdict.up:
                    entry["state"] = "down"
                elif now < verdict.down_until:
                    entry.update(state="passive_down", down_until=verdict.down_until)
            if checker is not None:
                entry["check"] = {
                    "probes": checker.probes, "passes": checker.passes,
                    "failures": checker.failures,
                    "checked_at": checker.checked_at or None,
                    "last": checker.last.reason if checker.last is not None else None,
                }
            found[key] = entry
        return found


def _entry(key: TargetKey, verdict: Verdict, now: float) -> list[Any]:
    """A verdict as a worker applies it (durations: the worker's clock is its loop's)."""
    return [key[0], key[1], verdict.up, round(max(now - verdict.since, 0.0), 3),
            round(max(verdict.down_until - now, 0.0), 3)]
