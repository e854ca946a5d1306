"""How a worker notices that its supervisor died, and how long it then keeps going.

A supervisor killed with SIGKILL (or by the OOM killer) leaves its workers behind, still holding
the listening sockets. Nobody would replace them, count them or stop them, and a successor
supervisor started on the same ports (SO_REUSEPORT) would share the new connections with them.
So an orphan stops at once: it closes its listening sockets (the kernel then sends new
connections only to sockets that still listen), closes its tunnels with 1001, and gives its
in-flight requests ORPHAN_GRACE (at most shutdown_timeout) before it exits.

It is told three ways, the first that comes wins: the kernel sends SUPERVISOR_GONE the moment
the supervisor's main thread dies (PR_SET_PDEATHSIG, asked for at start-up), its heartbeat write
fails with EPIPE, or its parent pid changes (checked every heartbeat, where prctl is missing).
A signal of its own, not SIGTERM: the kernel sends it when the thread that started the worker
exits, and while the supervisor's other threads (ZeroMQ's) are still being torn down the worker's
parent pid has not changed yet, so a SIGTERM could not be told from an ordinary stop.
"""

from __future__ import annotations

import ctypes
import os
import signal

ORPHAN_GRACE = 3.0  # seconds an orphan's in-flight requests get, at most shutdown_timeout
SUPERVISOR_GONE = signal.SIGRTMIN + 1  # unused otherwise; its default action ends the process
PR_SET_PDEATHSIG = 1


def signal_on_supervisor_death(signum: int = SUPERVISOR_GONE) -> bool:
    """Ask the kernel for `signum` when the parent dies; False where prctl is not there."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def orphaned(supervisor_pid: int) -> bool:
    """True once the process that started this one is gone (we were re-parented)."""
    return os.getppid() != supervisor_pid
