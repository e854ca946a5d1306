"""Decision 1: connections spread over the workers, also when they arrive one at a time."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from harness import HOST, running_charon

HOSTS = """
[[hosts]]
domains = ["127.0.0.1"]
upstream = "http://127.0.0.1:9"
"""


def _listening_inodes() -> set[str]:
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return {row[9] for row in rows if row[3] == "0A"}  # 0A: LISTEN


def _connections(pid: int) -> int:
    """Open sockets of a process, less listening ones (a worker not accepting closes its copy)."""
    listening = _listening_inodes()
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            count += link.startswith("socket:") and link[8:-1] not in listening
    return count


def test_connections_arriving_one_by_one_spread_over_workers(tmp_path: Path) -> None:
    with running_charon(tmp_path, HOSTS, workers=2) as charon:
        workers = charon.worker_pids()
        assert len(workers) == 2
        before = {pid: _connections(pid) for pid in workers}
        held = []
        try:
            # Idle workers between arrivals: without accept back-off Linux hands nearly all of
            # these to the same worker (measured 286 of 300).
            for _ in range(240):
                held.append(socket.create_connection((HOST, charon.port), timeout=5))
                time.sleep(0.005)
            time.sleep(1.0)
            counts = {pid: _connections(pid) - before[pid] for pid in workers}
        finally:
            for sock in held:
                sock.close()
        share = sum(counts.values()) / len(counts)
        assert sum(counts.values()) == 240, counts
        assert max(counts.values()) <= 1.5 * share, f"per worker: {counts}"
