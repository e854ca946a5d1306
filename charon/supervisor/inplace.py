"""Reload in place: a new config handed to the running workers instead of a new generation.

Possible when nothing a worker took at start changes: the worker count, the listening
sockets, the access log file and whether workers send events. Each worker gets the validated
config over its control channel (charon/worker/control.py), swaps it in (charon/worker/swap.py)
and answers with the version it applied or why it could not.
"""

from __future__ import annotations

import asyncio
import pickle
import time

from charon.config import Config
from charon.config.sharing import share_equal
from charon.supervisor.workers import WorkerProcess
from charon.worker.control import encode

APPLY_TIMEOUT = 5.0  # a worker that has not answered by then is replaced


def in_place_possible(old: Config, new: Config) -> bool:
    return (
        new.server.workers == old.server.workers
        and set(new.server.listen) == set(old.server.listen)
        and new.server.access_log == old.server.access_log
        and new.admin.events == old.admin.events
    )


async def apply_everywhere(
    procs: list[WorkerProcess], version: int, config: Config, timeout: float = APPLY_TIMEOUT,
) -> list[tuple[WorkerProcess, str]]:
    """Send config `version` to every worker and wait for their answers: the workers that did
    not apply it, each with the reason."""
    loop = asyncio.get_running_loop()
    message = encode(version, pickle.dumps(share_equal(config), pickle.HIGHEST_PROTOCOL))
    deadline = time.monotonic() + timeout
    failed: list[tuple[WorkerProcess, str]] = []
    waiting: list[WorkerProcess] = []
    for proc in procs:
        try:
            await asyncio.wait_for(loop.sock_sendall(proc.control, message), timeout)
        except (OSError, TimeoutError) as exc:
            failed.append((proc, f"cannot send it the config: {exc or 'timed out'}"))
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
