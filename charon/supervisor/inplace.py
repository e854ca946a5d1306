"""Reload in place: a new config handed to the running workers instead of a new generation.

Possible when nothing a worker took at start changes: the listening sockets, the access log
file and whether workers send events. Each worker gets the validated config over its control
channel (charon/worker/control.py), swaps it in (charon/worker/swap.py) and answers with the
version it applied or why it could not. A changed worker count grows or shrinks the pool in
place as TTIN/TTOU do: new workers start on the new config, the extra ones retire (they finish
their requests and drain their tunnels on the config they have).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from charon.admin.server import AdminServer
from charon.config import Config
from charon.config.sharing import pickled
from charon.supervisor.workers import Slot, WorkerProcess
from charon.worker.control import encode

if TYPE_CHECKING:
    from charon.supervisor.arbiter import Arbiter

log = logging.getLogger("charon.supervisor")

APPLY_TIMEOUT = 5.0  # a worker that has not answered by then is replaced


def in_place_possible(old: Config, new: Config) -> bool:
    return (
        set(new.server.listen) == set(old.server.listen)
        and set(new.server.tls_listen) == set(old.server.tls_listen)
        and new.server.access_log == old.server.access_log
        and new.admin.events == old.admin.events
    )


async def apply_everywhere(
    procs: list[WorkerProcess], version: int, config: Config, timeout: float = APPLY_TIMEOUT,
) -> list[tuple[WorkerProcess, str]]:
    """Send config `version` to every worker and wait for their answers: the workers that did
    not apply it, each with the reason."""
    message = encode(version, pickled(config))
    deadline = time.monotonic() + timeout
    failed: list[tuple[WorkerProcess, str]] = []
    waiting: list[WorkerProcess] = []
    for proc in procs:
        try:
            proc.post(message)  # after any health message still going out, never inside it
        except OSError as exc:
            failed.append((proc, f"cannot send it the config: {exc}"))
        else:
            waiting.append(proc)
    while waiting and time.monotonic() < deadline:
        for proc in list(waiting):
            if proc.config_version >= version:
                waiting.remove(proc)
            elif proc.apply_error is not None and proc.apply_error[0] == version:
                waiting.remove(proc)
                failed.append((proc, proc.apply_error[1]))
            elif proc.exit_code() is not None:
                waiting.remove(proc)
                failed.append((proc, "exited"))
        if waiting:
            await asyncio.sleep(0.002)
    failed += [(proc, f"no answer within {timeout:.0f}s") for proc in waiting]
    return failed


async def reload_in_place(arbiter: Arbiter, config: Config, text: str) -> None:
    """Every running worker that stays swaps the config in; one that does not is replaced by a
    fresh worker on the new config (its own connections drain as after a generation reload)."""
    version = arbiter.config_version + 1
    started = time.monotonic()
    # A count set by TTIN/TTOU is kept unless the config's own count changed.
    same = config.server.workers == arbiter.config.server.workers
    size = len(arbiter.slots) if same else config.server.workers
    for slot in arbiter.slots[size:]:  # shrinking: the newest go, as with TTOU
        if slot.process is not None:
            arbiter._retire(slot.process)
    del arbiter.slots[size:]
    procs = [s.process for s in arbiter.slots if s.process is not None]
    failed = await apply_everywhere(procs, version, config)
    await take_config(arbiter, config, text, version)
    for proc, reason in failed:
        log.error(
            "worker %d (pid %d) did not apply config version %d: %s; replacing it",
            proc.worker_id, proc.pid, version, reason,
        )
        slot = arbiter.slots[proc.worker_id]
        arbiter._retire(proc)
        slot.process = arbiter._spawn(
            slot.worker_id, config, arbiter.generation, len(arbiter.slots)
        )
    added = []
    while len(arbiter.slots) < size:  # growing: new workers on the new config
        slot = Slot(len(arbiter.slots))
        arbiter.slots.append(slot)
        slot.process = arbiter._spawn(slot.worker_id, config, arbiter.generation, size)
        added.append(slot.process)
    log.info(
        "reloaded in place: config version %d applied by %d of %d workers in %.1f ms; "
        "%d workers", version, len(procs) - len(failed), len(procs),
        (time.monotonic() - started) * 1000, len(arbiter.slots),
    )
    if failed:
        names = ", ".join(f"worker {p.worker_id} (pid {p.pid}): {r}" for p, r in failed)
        arbiter._reload_done("incomplete", f"not applied by {names}; replaced")
        return
    not_started = await arbiter._started(added)
    if not_started:
        arbiter._reload_done("incomplete", not_started)
    else:
        arbiter._reload_done("success", "")


async def push_tls_state(arbiter: Arbiter) -> None:
    """The current config again to every worker, which reloads the ACME certificate and
    challenge files with it; returns once each answered (or APPLY_TIMEOUT passed). It counts
    as a config version (seen in /healthz and charon_config_version): that is how a worker's
    answer is told from an earlier one."""
    async with arbiter.apply_lock:
        version = arbiter.config_version + 1
        procs = [s.process for s in arbiter.slots if s.process is not None]
        failed = await apply_everywhere(procs, version, arbiter.config)
        arbiter.config_version = version
        arbiter._show_versions()
    for proc, reason in failed:
        log.warning(
            "worker %d (pid %d) did not take the new certificate files: %s",
            proc.worker_id, proc.pid, reason,
        )


async def take_config(arbiter: Arbiter, config: Config, text: str, version: int = 0) -> None:
    """What the supervisor itself keeps of an accepted config."""
    old_admin = arbiter.config.admin
    arbiter.config, arbiter.config_text = config, text
    arbiter.config_version = version or arbiter.config_version + 1
    arbiter.metrics.set_hosts(h.name for h in config.hosts)
    arbiter.upstreams.set_config(config)
    arbiter.health.configure(config)
    arbiter.logs.token = config.admin.token or None
    arbiter.logs.allowed_origins = frozenset(o.lower() for o in config.admin.allowed_origins)
    await arbiter.certificates.config_changed(config)
    if config.admin.listen != old_admin.listen:
        if arbiter.admin is not None:
            await arbiter.admin.stop()
        arbiter.admin, arbiter.next_admin = arbiter.next_admin, None
        arbiter.runtime.moved(config.admin.listen)


async def bind_admin(arbiter: Arbiter, config: Config) -> None:
    """A moved admin listener is bound before anything of the new config is applied: a busy
    address then fails the reload while the old listener still serves (ListenError)."""
    listen = config.admin.listen
    if listen is None or listen == arbiter.config.admin.listen:
        return
    admin = AdminServer(listen, arbiter, arbiter.sections)
    await admin.start()
    arbiter.next_admin = admin
