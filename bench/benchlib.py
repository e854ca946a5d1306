"""What both bench drivers (bench/run.py for HTTP, bench/ws/run.py for WebSocket) need:
finding tools, free loopback ports, and pinning processes to CPUs. Standard library only."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

EXTRA_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BenchError(Exception):
    """A setup failure that ends the run (after cleanup)."""


def find_exe(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + EXTRA_PATH)


def free_ports(n: int) -> list[int]:
    """Distinct free loopback ports, found by binding port 0 (all held until all are found)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def parse_cpulist(text: str) -> list[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.update(range(int(lo), int(hi) + 1))
        else:
            cpus.add(int(part))
    return sorted(cpus)


def pin(pid: int, cpus: str) -> bool:
    """Pin every thread of one process (taskset -a -p -c)."""
    r = subprocess.run(
        ["taskset", "-a", "-p", "-c", cpus, str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=10,
        check=False,
    )
    return r.returncode == 0
