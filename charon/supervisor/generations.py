"""A new generation of workers, and the cap on retiring generations (`max_retiring_generations`).

A reload that cannot apply in place (listen addresses, access_log or events changed, or USR2 for
new code) binds the added listeners, starts a whole generation on the shared sockets and only
once every new worker serves retires the old one.

Each reload that starts new workers leaves the old generation draining its WebSocket tunnels for
up to drain_timeout (5 minutes by default). With clients opening WebSockets all the time every
generation keeps some, so frequent reloads piled up processes (issue #11: 41 workers and 1.3 GB
after 20 reloads of 2 workers). Past the cap the oldest retiring generation is told to stop as
SIGTERM says: its tunnels get Close 1001 toward client and backend at a frame boundary, its
in-flight requests finish within shutdown_timeout, then it exits.

The room is made before a new generation starts and the supervisor waits (CUT_WAIT at most) for
the cut workers to exit, so that while the new generation starts beside the current one, the
processes stay within workers x (1 + cap).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from typing import TYPE_CHECKING

from charon.config import Config, ListenAddress
from charon.supervisor.inplace import take_config
from charon.supervisor.sockets import bind_listener
from charon.supervisor.workers import Slot, WorkerProcess

if TYPE_CHECKING:
    from charon.supervisor.arbiter import Arbiter

log = logging.getLogger("charon.supervisor")

CUT_WAIT = 5.0  # a cut worker still in a request after this no longer holds up the reload
CUT_MARGIN = 10.0  # beyond shutdown_timeout, a cut worker is killed (see the arbiter's _kill_stuck)


def retiring_generations(retiring: list[WorkerProcess]) -> list[int]:
    """The generations still draining (not yet cut), oldest first."""
    return sorted({p.generation for p in retiring if not p.cut and p.exit_code() is None})


def cut_oldest(
    retiring: list[WorkerProcess], keep: int, shutdown_timeout: float
) -> list[WorkerProcess]:
    """Tell every generation but the newest `keep` ones to close and exit; the workers told."""
    generations = retiring_generations(retiring)
    doomed = set(generations[: max(len(generations) - keep, 0)])
    if not doomed:
        return []
    cut_by = time.monotonic() + shutdown_timeout + CUT_MARGIN
    told = [p for p in retiring if p.generation in doomed and not p.cut and p.exit_code() is None]
    for proc in told:
        proc.cut = True
        proc.retire_by = min(proc.retire_by, cut_by) if proc.retire_by else cut_by
        proc.signal(signal.SIGTERM)  # a retiring worker's drain ends: tunnels get 1001
    log.warning(
        "more than %d retiring generations: generation %s closes its tunnels and exits "
        "(%d workers)", keep, ", ".join(str(g) for g in sorted(doomed)), len(told),
    )
    return told


async def wait_exit(procs: list[WorkerProcess], timeout: float = CUT_WAIT) -> None:
    """Until `procs` have exited or `timeout` passed (the arbiter's loop reaps them)."""
    deadline = time.monotonic() + timeout
    while any(p.exit_code() is None for p in procs) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def start_generation(arbiter: Arbiter, config: Config, text: str) -> None:
    """Start generation N+1 on `config` and retire the current one once it serves; on a
    failure (ListenError, ReloadFailure) nothing of the new one is left and the old serves on."""
    # The current generation is about to retire too: room for it below the cap.
    cap = config.server.max_retiring_generations
    older = [p for p in arbiter.retiring if p.generation < arbiter.generation]
    await wait_exit(cut_oldest(older, cap - 1, config.server.shutdown_timeout))
    added: dict[ListenAddress, socket.socket] = {}
    new: list[WorkerProcess] = []
    generation = arbiter.generation + 1
    try:
        for address in config.server.all_listen:
            if address not in arbiter.listeners:
                added[address] = bind_listener(address)
        arbiter.listeners.update(added)
        size = config.server.workers
        new = [
            arbiter._spawn(i, config, generation, size, arbiter.config_version + 1)
            for i in range(size)
        ]
        await arbiter._wait_ready(new)
    except BaseException:
        for proc in new:
            proc.kill()
            proc.process.wait()
            arbiter._forget(proc)
        for address, sock in added.items():
            sock.close()
            del arbiter.listeners[address]
        raise

    for slot in arbiter.slots:
        if slot.process is not None:
            arbiter._retire(slot.process)
    cut_oldest(arbiter.retiring, cap, config.server.shutdown_timeout)  # cap 0: the one retired
    removed = [a for a in arbiter.listeners if a not in config.server.all_listen]
    for address in removed:
        arbiter.listeners.pop(address).close()  # the retiring workers' copies close as they go
    arbiter.slots = [Slot(i, proc) for i, proc in enumerate(new)]
    arbiter.generation = generation
    arbiter.respawn.reset()
    await take_config(arbiter, config, text)
    log.info(
        "reloaded: %d workers on %s; %d old workers draining",
        len(new), ", ".join(str(a) for a in config.server.all_listen), len(arbiter.retiring),
    )
    arbiter._reload_done("success", "")
