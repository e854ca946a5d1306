#!/usr/bin/env python3
"""WebSocket benchmark: Charon vs nginx (as a WebSocket proxy) vs the direct backend, in one run.

    .venv/bin/python bench/ws/run.py [--duration 10] [--scenarios echo32,echo4k,handshake,idle]
                                     [--targets direct,nginx,charon] [--workers 1]

Standard library only. In order, it:
  1. builds bench/ws/wsload (gcc -O2, via the Makefile) when it is missing or older than wsload.c;
  2. starts `wsload server` (a C epoll WebSocket echo backend) pinned to the load CPUs;
  3. starts nginx (own prefix in a temp dir) and Charon (`charon run --config FILE`) in front of
     it, each pinned, with every thread of every process, to the proxy CPUs;
  4. for every scenario and target runs `wsload` pinned to the load CPUs; wsload prints a line
     when its measured window starts and ends, and the proxies' CPU time (utime + stime of all
     their processes) is sampled right when each line is read;
  5. prints a table and writes it as Markdown (--markdown);
  6. stops everything it started, by PID (SIGTERM, bounded wait, SIGKILL), removes its temp dir.

Only loopback addresses are used; every port comes from binding port 0.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import BenchError, find_exe, free_ports, parse_cpulist, pin  # noqa: E402

WS_DIR = Path(__file__).resolve().parent
REPO = WS_DIR.parent.parent
WSLOAD = WS_DIR / "wsload"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SATURATED = 0.90  # proxy CPU s / wall s at or above this: the proxy is the bottleneck
CORE_FULL = 0.90  # a core this busy (tasks + softirq + steal) is the bottleneck


def log(msg: str) -> None:
    print(f"[ws-bench] {msg}", file=sys.stderr, flush=True)




# --------------------------------------------------------------------------------------------
# fd limits
# --------------------------------------------------------------------------------------------


def raise_nofile() -> None:
    """preexec_fn: raise the child's RLIMIT_NOFILE soft limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def max_open_files(pid: int) -> str:
    """'soft/hard' from /proc/PID/limits."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    parts = line.split()
                    return f"{parts[3]}/{parts[4]}"
    except OSError:
        pass
    return "?"


# --------------------------------------------------------------------------------------------
# /proc: process trees, CPU time, RSS, pinning
# --------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of every thread of `pid` (/proc/PID/task/TID/children)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    seen: list[int] = []
    queue = [root]
    while queue and len(seen) < 1000:
        pid = queue.pop()
        if pid in seen or not os.path.exists(f"/proc/{pid}"):
            continue
        seen.append(pid)
        queue.extend(children(pid))
    return seen


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return 0
    rest = data[data.rfind(")") + 2 :].split()  # rest[0] is field 3 (state)
    try:
        return int(rest[11]) + int(rest[12])  # fields 14 (utime), 15 (stime)
    except (IndexError, ValueError):
        return 0


def all_ticks() -> dict[int, tuple[int, int, str]]:
    """Every process on the machine: pid -> (ppid, utime + stime, comm), one /proc scan."""
    out: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read().decode("ascii", "replace")
            rest = data[data.rfind(")") + 2 :].split()
            name = data[data.find("(") + 1 : data.rfind(")")]
            out[int(entry)] = (int(rest[1]), int(rest[11]) + int(rest[12]), name)
        except (OSError, IndexError, ValueError):
            continue
    return out


def others_use(
    before: dict, after: dict, cpus_before: dict, cpus_after: dict, ours: set[int], wall: float
) -> tuple[float, float, str]:
    """CPU cores used during a window by processes that are not ours: (others, kernel threads,
    the top other process names).

    "Others" is the whole machine's busy time (tasks + softirq, /proc/stat) minus our processes
    and the kernel threads, so short-lived processes (a test suite's) count too, though only the
    long-lived ones can be named.
    """
    if wall <= 0:
        return 0.0, 0.0, ""
    named: list[tuple[float, str]] = []
    ours_ticks = kthread_ticks = 0
    for pid, (ppid, ticks, name) in after.items():
        prev = before.get(pid)
        if prev is None or prev[2] != name:
            continue  # started during the window: no baseline
        delta = ticks - prev[1]
        if pid in ours:
            ours_ticks += delta
        elif pid == 2 or ppid == 2:
            kthread_ticks += delta
        elif delta > 0:
            named.append((delta / CLK_TCK / wall, f"{name}[{pid}]"))
    busy_ticks = sum(
        (a[0] - b[0]) + (a[1] - b[1])
        for cpu, a in cpus_after.items()
        if (b := cpus_before.get(cpu)) is not None
    )
    others = max(0.0, (busy_ticks - ours_ticks - kthread_ticks) / CLK_TCK / wall)
    named.sort(reverse=True)
    top = ", ".join(f"{n} {c:.2f}" for c, n in named[:3] if c >= 0.01) or "short-lived processes"
    return others, kthread_ticks / CLK_TCK / wall, top


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def cpu_busy_ticks() -> dict[int, tuple[int, int, int, int]]:
    """Per CPU from /proc/stat: (task = user + nice + system, irq + softirq, steal, total) ticks.

    Loopback TCP does much of its work in softirq context; that time shows up here as irq but
    in no process's utime/stime, so a core can be 100% busy while its process uses 0.85 s/s.
    """
    out: dict[int, tuple[int, int, int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]] + [0] * (8 - len(vals[:8]))
                out[int(name[3:])] = (v[0] + v[1] + v[2], v[5] + v[6], v[7], sum(v))
    return out


@dataclass(frozen=True)
class CoreUse:
    """Fractions of the wall time of some CPUs: tasks, irq + softirq, steal."""

    task: float
    irq: float
    steal: float

    @property
    def busy(self) -> float:
        return self.task + self.irq + self.steal

    def __str__(self) -> str:
        s = f"busy {self.busy:.0%} = tasks {self.task:.0%} + softirq {self.irq:.0%}"
        return s + (f" + steal {self.steal:.0%}" if self.steal >= 0.005 else "")


# --------------------------------------------------------------------------------------------
# Managed processes
# --------------------------------------------------------------------------------------------


class Managed:
    """A long-running process we started; stopped by PID (and its descendants) in `stop`."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path | None = None):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=raise_nofile,  # noqa: PLW1509 - no threads in this driver
        )
        self.known: dict[int, str] = {}  # every pid seen in the tree -> its comm
        self.signals_log: Path | None = None  # strace output, for a tracer (trace_signals)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pids(self) -> list[int]:
        pids = tree(self.pid) if self.alive() else []
        for p in pids:
            self.known.setdefault(p, comm(p))
        return pids

    def cpu_seconds(self, pids: list[int]) -> float:
        return sum(cpu_ticks(p) for p in pids) / CLK_TCK

    def rss_kib(self) -> int:
        return sum(rss_kib(p) for p in self.pids())

    def pin_all(self, cpus: str) -> int:
        return sum(pin(p, cpus) for p in self.pids())

    def log_tail(self, lines: int = 40) -> str:
        try:
            self._log.flush()
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process; SIGKILL it after `timeout`; then any descendant still there."""
        self.pids()
        if self.alive():
            _signal(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        # Descendants that outlived their parent: by PID, checked by name against reuse.
        left = [p for p, name in self.known.items() if p != self.pid and comm(p) == name]
        for p in left:
            _signal(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [p for p in left if comm(p) == self.known[p]]
        for p in left:
            _signal(p, signal.SIGKILL)
        self._log.close()


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


# --------------------------------------------------------------------------------------------
# A tiny stdlib WebSocket probe (readiness: handshake + one echo + Close)
# --------------------------------------------------------------------------------------------


def ws_probe(port: int, timeout: float = 2.0) -> str | None:
    """None when ws://127.0.0.1:PORT/ completes a handshake and echoes a frame, else why not."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 16384:
                chunk = s.recv(4096)
                if not chunk:
                    return f"EOF during the handshake (got {data[:80]!r})"
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                status = head.split(b"\r\n", 1)[0][:80]
                return f"answered {status!r}"
            if b"sec-websocket-accept: " + accept.lower() not in head.lower():
                return "wrong Sec-WebSocket-Accept"
            mask = os.urandom(4)
            payload = b"probe"
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
            want = bytes([0x81, len(payload)]) + payload
            while len(rest) < len(want):
                chunk = s.recv(4096)
                if not chunk:
                    return "EOF before the echo"
                rest += chunk
            if rest[: len(want)] != want:
                return f"bad echo {rest[:20]!r}"
            close_pl = b"\x03\xe8"
            s.sendall(
                bytes([0x88, 0x82]) + mask + bytes(b ^ mask[i] for i, b in enumerate(close_pl))
            )
        return None
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def wait_ws_ready(proc: Managed, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(
                f"{proc.name} exited with status {proc.proc.returncode}:\n{proc.log_tail()}"
            )
        why = ws_probe(port)
        if why is None:
            return
        last = why
        time.sleep(0.2)
    raise BenchError(f"{proc.name} not ready within {timeout:.0f}s ({last}):\n{proc.log_tail()}")


# --------------------------------------------------------------------------------------------
# nginx and Charon
# --------------------------------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 40000;
events {{
    worker_connections 20000;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $http_host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
{extra}        }}
    }}
}}
"""


def start_nginx(
    tmp: Path,
    port: int,
    backend_port: int,
    workers: int,
    cpus: str,
    generation: int = 0,
    proxy_buffer: str = "",
) -> Managed:
    prefix = tmp / "nginx"
    prefix.mkdir(mode=0o755, exist_ok=True)
    os.chmod(tmp, 0o755)  # nginx workers run as an unprivileged user when we are root
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            workers=workers,
            prefix=prefix,
            port=port,
            backend_port=backend_port,
            # the buffer of an upgraded connection, each way (default: one page, 4 KiB)
            extra=(
                f"            proxy_buffer_size {proxy_buffer};\n"
                f"            proxy_buffers 4 {proxy_buffer};\n"
                if proxy_buffer
                else ""
            ),
        )
    )
    nginx = find_exe("nginx")
    if nginx is None:
        raise BenchError("nginx not found (apt-get install nginx-light)")
    argv = [
        "taskset",
        "-c",
        cpus,
        nginx,
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
    ]
    return Managed("nginx", argv, prefix / f"stdout{generation or ''}.log")


def charon_config(port: int, admin_port: int, backend_port: int, workers: int) -> str:
    return (
        "[server]\n"
        f'listen = ["127.0.0.1:{port}"]\n'
        f"workers = {workers}\n"
        "[admin]\n"
        f'listen = "127.0.0.1:{admin_port}"\n'
        "[[hosts]]\n"
        'domains = ["127.0.0.1"]\n'
        f'upstream = "http://127.0.0.1:{backend_port}"\n'
    )


def start_charon(
    tmp: Path,
    port: int,
    admin_port: int,
    backend_port: int,
    workers: int,
    cpus: str,
    generation: int = 0,
) -> Managed:
    cfg = tmp / "charon.toml"
    cfg.write_text(charon_config(port, admin_port, backend_port, workers))
    # `python -m charon` from the repository: the code of this checkout is measured, whichever
    # checkout the venv's editable install points at (workers inherit the cwd).
    argv = ["taskset", "-c", cpus, sys.executable, "-m", "charon", "run", "--config", str(cfg)]
    return Managed("charon", argv, tmp / f"charon{generation or ''}.log", cwd=REPO)


def trace_signals(proc: Managed, tmp: Path) -> Managed | None:
    """strace the proxy's main process for the signals it receives (sender PID included), to
    tell who stopped it if it stops during the run. None without strace."""
    strace = find_exe("strace")
    if strace is None:
        return None
    out = tmp / f"signals-{proc.name}-{proc.pid}.log"
    argv = [strace, "-p", str(proc.pid), "-e", "trace=none", "-e", "signal=all", "-o", str(out)]
    tracer = Managed(f"strace-{proc.name}", argv, tmp / f"strace-{proc.name}-{proc.pid}.log")
    tracer.signals_log = out
    return tracer


def describe_sender(signals_log: Path) -> str:
    """The signals a traced process got, with the sender's command line when still known."""
    try:
        lines = [
            ln
            for ln in signals_log.read_text(errors="replace").splitlines()
            if "---" in ln or "+++" in ln
        ]
    except OSError:
        return "no strace log"
    out = []
    for ln in lines[-5:]:
        who = ""
        if "si_pid=" in ln:
            pid = ln.split("si_pid=", 1)[1].split(",", 1)[0].split("}", 1)[0].strip()
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    who = " sent by " + f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
            except OSError:
                who = f" sent by pid {pid} (gone)"
        out.append(ln.strip() + who)
    return "; ".join(out) or "no signal seen"


# --------------------------------------------------------------------------------------------
# Running wsload
# --------------------------------------------------------------------------------------------


def build_wsload() -> None:
    src = WS_DIR / "wsload.c"
    if WSLOAD.exists() and WSLOAD.stat().st_mtime >= src.stat().st_mtime:
        return
    log("building wsload (gcc -O2)")
    if find_exe("make"):
        cmd = ["make", "-C", str(WS_DIR), "wsload"]
    else:
        cmd = ["gcc", "-O2", "-Wall", "-o", str(WSLOAD), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if r.returncode != 0 or not WSLOAD.exists():
        raise BenchError(f"building wsload failed:\n{r.stdout}{r.stderr}")
    r = subprocess.run(
        [str(WSLOAD), "selftest"], capture_output=True, text=True, timeout=10, check=False
    )
    if r.returncode != 0:
        raise BenchError(f"wsload selftest failed: {r.stdout}{r.stderr}")


class LoadRun:
    """One wsload client run; its JSON lines are read as they come (with a deadline)."""

    running: set[LoadRun] = set()  # not finished yet: main() kills these when it is interrupted

    def __init__(self, argv: list[str], timeout: float, stderr_path: Path):
        self.argv = argv
        self._err = open(stderr_path, "wb")  # noqa: SIM115 - closed in finish()
        self.stderr_path = stderr_path
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._err,
            start_new_session=True,
            preexec_fn=raise_nofile,  # noqa: PLW1509
        )
        LoadRun.running.add(self)
        self.deadline = time.monotonic() + timeout
        self._buf = b""
        self.lines: list[dict] = []

    def next_line(self) -> dict | None:
        """The next JSON line, or None at EOF / deadline."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            obj = json.loads(line)
        except ValueError:
            obj = {"unparsed": line.decode(errors="replace")}
        self.lines.append(obj)
        return obj

    def finish(self) -> str:
        """Wait for the exit (bounded), killing it past the deadline; returns its stderr tail."""
        LoadRun.running.discard(self)
        try:
            self.proc.wait(max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._err.close()
        try:
            return self.stderr_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


# --------------------------------------------------------------------------------------------
# Targets, scenarios, results
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    proc: Managed | None  # the proxy; None for the direct backend
    start: Callable[[int], Managed] | None = None  # (re)start the proxy; the arg: generation
    restarts: int = 0  # after the proxy was found dead
    starts: int = 0  # every start: the next one's generation (names its log)
    used: bool = False  # the proxy served a run since it started


@dataclass
class Result:
    scenario: str
    target: str
    rate: float | None = None  # msgs/s, handshakes/s, or connections open (idle)
    p50_us: float | None = None
    p99_us: float | None = None
    ops: int = 0
    errors: int = 0
    error_detail: str = ""
    proxy_cpu_s: float | None = None
    wall_s: float = 0.0
    load_busy: CoreUse | None = None  # how busy the load CPUs were over the window
    proxy_busy: CoreUse | None = None  # how busy the proxy CPUs were over the window
    others_cores: float = 0.0  # CPU used by processes that are not ours (other people's load)
    kthread_cores: float = 0.0  # ksoftirqd, kworkers: mostly serving our own traffic
    others_top: str = ""
    failure: str | None = None
    notes: list[str] = field(default_factory=list)
    # idle only
    rss_before_kib: int | None = None
    rss_open_kib: int | None = None
    opened: int = 0
    failed: int = 0
    raw: list[dict] = field(default_factory=list)

    @property
    def cpu_us_per_op(self) -> float | None:
        if self.proxy_cpu_s is None or self.ops <= 0:
            return None
        return self.proxy_cpu_s / self.ops * 1e6

    @property
    def proxy_cores(self) -> float | None:
        if self.proxy_cpu_s is None or self.wall_s <= 0:
            return None
        return self.proxy_cpu_s / self.wall_s

    @property
    def kib_per_conn(self) -> float | None:
        if self.rss_before_kib is None or self.rss_open_kib is None or self.opened <= 0:
            return None
        return (self.rss_open_kib - self.rss_before_kib) / self.opened


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # echo, handshake, idle
    title: str
    unit: str  # of the rate column
    op: str  # what "per op" means
    conns: int
    size: int = 0


def build_scenarios(args: argparse.Namespace) -> dict[str, Scenario]:
    return {
        "echo32": Scenario(
            "echo32",
            "echo",
            f"echo {args.echo_conns} conns x 32 B",
            "msg/s",
            "message",
            args.echo_conns,
            32,
        ),
        "echo4k": Scenario(
            "echo4k",
            "echo",
            f"echo {args.echo_conns} conns x 4 KiB",
            "msg/s",
            "message",
            args.echo_conns,
            4096,
        ),
        "handshake": Scenario(
            "handshake",
            "handshake",
            f"handshakes, {args.hs_conns} concurrent",
            "hs/s",
            "handshake",
            args.hs_conns,
        ),
        "idle": Scenario(
            "idle", "idle", f"idle {args.idle_conns} conns", "open", "connection", args.idle_conns
        ),
    }


def wait_quiet(ours: list[Managed], threshold: float, max_wait: float) -> float:
    """Wait (at most max_wait s) until processes that are not ours use < threshold cores over
    one second; returns the last figure. Other people's builds and tests on a shared 2-core
    machine would otherwise skew the run."""
    deadline = time.monotonic() + max_wait
    waited = False
    while True:
        mine: set[int] = set()
        for m in ours:
            mine.update(m.pids())
        mine.add(os.getpid())
        before, cpus0, t0 = all_ticks(), cpu_busy_ticks(), time.monotonic()
        time.sleep(1.0)
        used, _, top = others_use(
            before, all_ticks(), cpus0, cpu_busy_ticks(), mine, time.monotonic() - t0
        )
        if used < threshold or time.monotonic() >= deadline:
            if waited:
                log(
                    f"  machine {'quiet' if used < threshold else 'still busy'}: "
                    f"others use {used:.2f} cores {top}"
                )
            return used
        if not waited:
            log(
                f"  waiting up to {max_wait:.0f}s for a quiet machine: others use "
                f"{used:.2f} cores ({top})"
            )
            waited = True


class Runner:
    def __init__(self, args: argparse.Namespace, tmp: Path, ours: list[Managed]):
        self.args = args
        self.tmp = tmp
        self.ours = ours  # every long-running process we started (for the "others" figure)

    def pinned(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", self.args.load_cpus, *argv]

    def cpu_window(self, before: dict, after: dict, cpus: list[int]) -> CoreUse | None:
        d = [0, 0, 0, 0]
        for c in cpus:
            if c in before and c in after:
                for i in range(4):
                    d[i] += after[c][i] - before[c][i]
        if d[3] <= 0:
            return None
        return CoreUse(d[0] / d[3], d[1] / d[3], d[2] / d[3])

    def run(self, sc: Scenario, target: Target) -> Result:
        res = Result(sc.name, target.name)
        proxy = target.proc
        if proxy is not None:
            if not proxy.alive():
                res.failure = f"{target.name} is not running (exit {proxy.proc.returncode})"
                return res
            pinned = proxy.pin_all(self.args.proxy_cpus)
            pids_before = proxy.pids()
            if pinned != len(pids_before):
                res.notes.append(f"pinned {pinned} of {len(pids_before)} processes")
        else:
            pids_before = []
        url = f"ws://127.0.0.1:{target.port}/"
        common = ["--url", url, "--host", "127.0.0.1", "--conns", str(sc.conns)]
        a = self.args
        if sc.kind == "echo":
            argv = [
                str(WSLOAD),
                "echo",
                *common,
                "--size",
                str(sc.size),
                "--duration",
                str(a.duration),
                "--warmup",
                str(a.warmup),
            ]
            timeout = a.duration + a.warmup + 60
        elif sc.kind == "handshake":
            argv = [
                str(WSLOAD),
                "handshake",
                *common,
                "--duration",
                str(a.duration),
                "--warmup",
                str(min(a.warmup, 1.0)),
            ]
            timeout = a.duration + a.warmup + 60
        else:
            argv = [
                str(WSLOAD),
                "idle",
                *common,
                "--hold",
                str(a.idle_hold),
                "--rate",
                str(a.idle_rate),
            ]
            timeout = sc.conns / a.idle_rate + a.idle_hold + 90
        if proxy is not None:
            res.rss_before_kib = proxy.rss_kib()
        t_before = cpu_before = cpus_before = None
        procs_before: dict = {}
        final: dict | None = None
        rss_samples: list[tuple[int, int]] = []  # (rss KiB, open) while all are open
        if sc.kind == "idle":  # "per op" for idle: CPU per connection set up
            procs_before = all_ticks()
            t_before, cpus_before = time.monotonic(), cpu_busy_ticks()
            cpu_before = proxy.cpu_seconds(pids_before) if proxy else None
        run = LoadRun(self.pinned(argv), timeout, self.tmp / f"wsload-{sc.name}-{target.name}.err")
        while True:
            line = run.next_line()
            if line is None:
                break
            if line.get("event") == "window_start":
                t_before, cpus_before = time.monotonic(), cpu_busy_ticks()
                cpu_before = proxy.cpu_seconds(pids_before) if proxy else None
                procs_before = all_ticks()
            elif line.get("event") == "window_end" or line.get("phase") == "open":
                t_after, cpus_after = time.monotonic(), cpu_busy_ticks()
                cpu_after = proxy.cpu_seconds(pids_before) if proxy else None
                procs_after = all_ticks()
                ours = {run.proc.pid, os.getpid(), *pids_before}
                for m in self.ours:
                    ours.update(m.pids())
                res.others_cores, res.kthread_cores, res.others_top = others_use(
                    procs_before,
                    procs_after,
                    cpus_before or {},
                    cpus_after,
                    ours,
                    t_after - (t_before or t_after),
                )
                if t_before is not None and cpus_before is not None:
                    res.wall_s = t_after - t_before
                    res.load_busy = self.cpu_window(
                        cpus_before, cpus_after, parse_cpulist(a.load_cpus)
                    )
                    res.proxy_busy = self.cpu_window(
                        cpus_before, cpus_after, parse_cpulist(a.proxy_cpus)
                    )
                    if cpu_before is not None and cpu_after is not None:
                        res.proxy_cpu_s = cpu_after - cpu_before
                if line.get("phase") == "open":
                    if proxy:
                        rss_samples.append((proxy.rss_kib(), int(line.get("open", 0))))
                    res.opened = int(line.get("open", 0))
            elif line.get("phase") == "hold":
                if proxy and int(line.get("open", 0)) == res.opened:
                    rss_samples.append((proxy.rss_kib(), int(line.get("open", 0))))
            elif "event" not in line and line.get("phase") in (None, "done"):
                final = line
        stderr_tail = run.finish()
        res.raw = run.lines
        if proxy is not None:
            pids_after = proxy.pids()
            if set(pids_after) != set(pids_before):
                res.notes.append(
                    f"{target.name} processes changed during the run: {sorted(pids_before)} -> "
                    f"{sorted(pids_after)} (CPU figures dropped: a dead process's time is lost)"
                )
                res.proxy_cpu_s = None
            if not proxy.alive():
                res.failure = (
                    f"{target.name} exited during the run (status {proxy.proc.returncode})"
                )
        if final is None:
            res.failure = (
                f"wsload gave no result (exit {run.proc.returncode}); stderr: {stderr_tail.strip()}"
            )
            return res
        res.errors = int(final.get("errors_total", 0))
        if res.errors:
            errs = final.get("errors", {})
            res.error_detail = ", ".join(f"{k} {v}" for k, v in errs.items())
            if final.get("first_error"):
                res.error_detail += f" (first: {final['first_error']})"
        if sc.kind == "echo":
            res.ops = int(final.get("messages", 0))
            res.rate = float(final.get("messages_per_s", 0))
            opened = int(final.get("opened", 0))
            if opened < sc.conns:
                res.notes.append(f"only {opened} of {sc.conns} connections opened")
            if int(final.get("dropped", 0)):
                res.notes.append(f"{final['dropped']} connections dropped mid-run")
        elif sc.kind == "handshake":
            res.ops = int(final.get("handshakes", 0))
            res.rate = float(final.get("handshakes_per_s", 0))
        else:
            res.opened = int(final.get("opened", 0))
            res.failed = int(final.get("failed", 0))
            res.ops = res.opened
            res.rate = float(res.opened)
            if rss_samples:
                # the last sample while every connection was still open: the steady state
                res.rss_open_kib = rss_samples[-1][0]
                res.notes.append(
                    "RSS while open (KiB): " + ", ".join(str(r) for r, _ in rss_samples)
                )
            dropped = int(final.get("dropped", 0))
            if dropped:
                res.notes.append(f"{dropped} connections dropped during the hold")
        p50, p99 = final.get("p50_us"), final.get("p99_us")
        res.p50_us = float(p50) if isinstance(p50, (int, float)) and p50 >= 0 else None
        res.p99_us = float(p99) if isinstance(p99, (int, float)) and p99 >= 0 else None
        if res.ops == 0 and not res.failure:
            res.failure = f"no successful operations ({res.error_detail or 'no errors reported'})"
        return res


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def bound_by(r: Result, args: argparse.Namespace) -> str:
    """Which side limited the rate: the proxy's core, or the load generator + backend's."""
    if r.failure:
        return "failed"
    load = f"load CPU {args.load_cpus} {r.load_busy}" if r.load_busy is not None else ""
    pcpu = f"proxy CPU {args.proxy_cpus} {r.proxy_busy}" if r.proxy_busy is not None else ""
    noise = ""
    if r.others_cores >= 0.05:
        noise = f"; OTHER processes used {r.others_cores:.2f} cores ({r.others_top})"
    cores = r.proxy_cores
    if cores is None:
        return f"wsload + backend share one core ({load}){noise}"
    pbusy = r.proxy_busy.busy if r.proxy_busy is not None else 0.0
    lbusy = r.load_busy.busy if r.load_busy is not None else 0.0
    detail = f"proxy process {cores:.2f} CPU s/s; {pcpu}; {load}{noise}"
    if cores >= SATURATED:
        return f"PROXY (its process is saturated): {detail}"
    if pbusy >= CORE_FULL and pbusy >= lbusy:
        return f"PROXY core (full, with the softirq work it causes): {detail}"
    if lbusy >= CORE_FULL:
        return f"LOAD core (wsload + backend): {detail}"
    return f"neither core full (latency-bound): {detail}"


def by_scenario_and_target(results: list[Result]) -> dict[tuple[str, str], list[Result]]:
    """Every round's result of each scenario and target, in first-seen order."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.scenario, r.target), []).append(r)
    return groups


def median_rounds(results: list[Result]) -> list[Result]:
    """One result per scenario and target, in first-seen order: its median round by CPU/op."""
    chosen = []
    for runs in by_scenario_and_target(results).values():
        good = sorted(
            (r for r in runs if not r.failure and r.cpu_us_per_op is not None),
            key=lambda r: r.cpu_us_per_op or 0.0,
        )
        chosen.append(good[(len(good) - 1) // 2] if good else runs[0])
    return chosen


def rounds_summary(results: list[Result]) -> list[str]:
    """Per scenario: every round's CPU/op per target, and each round's CPU/op ratio to nginx
    in the same round (paired), with the median of those ratios."""
    rounds = by_scenario_and_target(results)
    lines = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        parts = []
        nginx = rounds.get((scenario, "nginx"), [])
        for (sc, target), runs in rounds.items():
            if sc != scenario:
                continue
            cpu = [r.cpu_us_per_op for r in runs]
            text = f"{target} " + ", ".join(fmt(c, 1) if c else "-" for c in cpu)
            if target != "nginx" and nginx:
                paired = [
                    c / n.cpu_us_per_op
                    for c, n in zip(cpu, nginx, strict=False)
                    if c and n.cpu_us_per_op and not n.failure
                ]
                if paired:
                    text += " (vs nginx " + ", ".join(f"{x:.2f}x" for x in paired)
                    text += f"; median {statistics.median(paired):.2f}x)"
            parts.append(text)
        lines.append(f"{scenario}: proxy CPU µs/op per round: " + "; ".join(parts))
    return lines


def build_tables(
    results: list[Result], scenarios: dict[str, Scenario], args: argparse.Namespace
) -> tuple[list[str], list[list[str]], list[str], list[list[str]], list[str]]:
    by = {(r.scenario, r.target): r for r in results}
    head = [
        "scenario",
        "target",
        "rate",
        "p50 µs",
        "p99 µs",
        "proxy CPU µs/op",
        "rate vs nginx",
        "CPU/op vs nginx",
        "rate vs direct",
        "errors",
    ]
    rows: list[list[str]] = []
    notes: list[str] = []
    for r in results:
        sc = scenarios[r.scenario]
        nginx = by.get((r.scenario, "nginx"))
        direct = by.get((r.scenario, "direct"))
        nginx = nginx if nginx is not None and not nginx.failure else None
        direct = direct if direct is not None and not direct.failure else None
        if r.failure:
            rows.append(
                [
                    sc.title,
                    r.target,
                    "FAILED",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    str(r.errors) if r.errors else "-",
                ]
            )
        else:
            rows.append(
                [
                    sc.title,
                    r.target,
                    f"{fmt(r.rate)} {sc.unit}",
                    fmt(r.p50_us),
                    fmt(r.p99_us),
                    fmt(r.cpu_us_per_op, 1),
                    ratio(r.rate, nginx.rate) if nginx else "-",
                    ratio(r.cpu_us_per_op, nginx.cpu_us_per_op) if nginx else "-",
                    ratio(r.rate, direct.rate) if direct else "-",
                    str(r.errors),
                ]
            )
        line = f"{sc.title} / {r.target}: {bound_by(r, args)}"
        if r.failure:
            line += f" -- {r.failure}"
        if r.error_detail:
            line += f" -- errors: {r.error_detail}"
        if r.notes:
            line += " -- " + "; ".join(r.notes)
        notes.append(line)
    mem_head = [
        "target",
        "open",
        "failed",
        "RSS before KiB",
        "RSS all open KiB",
        "KiB per conn",
        "proxy CPU µs per conn set up",
    ]
    mem_rows: list[list[str]] = []
    for r in results:
        if scenarios[r.scenario].kind != "idle":
            continue
        mem_rows.append(
            [
                r.target,
                str(r.opened),
                str(r.failed),
                fmt(r.rss_before_kib),
                fmt(r.rss_open_kib),
                fmt(r.kib_per_conn, 2),
                fmt(r.cpu_us_per_op, 1),
            ]
        )
    return head, rows, mem_head, mem_rows, notes


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]

    def line(cells: list[str]) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))

    out = [line(head), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_info(args: argparse.Namespace, limits: dict[str, str]) -> list[tuple[str, str]]:
    cpu_model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    nginx_v = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            [find_exe("nginx") or "nginx", "-v"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        nginx_v = (r.stderr or r.stdout).strip().replace("nginx version: ", "")
    py = sys.executable
    py_v = platform.python_version()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            [str(py), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        py_v = (r.stdout or r.stderr).strip()
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        commit = r.stdout.strip() or "?"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    info = [
        ("date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("nproc", str(os.cpu_count())),
        ("CPU", cpu_model),
        ("kernel", platform.release()),
        ("nginx", nginx_v),
        ("Python (Charon)", py_v),
        ("commit", commit),
        ("pinning", f"proxy on CPU {args.proxy_cpus}; wsload + backend on CPU {args.load_cpus}"),
        ("proxy workers", str(args.workers)),
        ("nginx proxy_buffer_size", args.nginx_buffer or "default (4k)"),
        (
            "duration",
            f"{args.duration:g} s measured after {args.warmup:g} s warm-up "
            f"(idle: {args.idle_hold:g} s hold, {args.idle_rate:g} conns/s)",
        ),
        ("ulimit -n (driver)", f"{soft}/{hard}"),
    ]
    info += [(f"open files {k}", v) for k, v in limits.items()]
    return info


def write_markdown(
    path: Path, info: list[tuple[str, str]], tables: tuple, command: str, extra: list[str]
) -> None:
    head, rows, mem_head, mem_rows, notes = tables
    out = ["# Charon WebSocket benchmark", "", f"`{command}`", ""]
    out += [f"- **{k}**: {v}" for k, v in info]
    out += ["", "## Results", "", md_table(head, rows), ""]
    if mem_rows:
        out += ["## Idle connections: memory", "", md_table(mem_head, mem_rows), ""]
    out += ["## Bound by", ""] + [f"- {n}" for n in notes]
    if extra:
        out += ["", "## Notes", ""] + [f"- {e}" for e in extra]
    out += ["", "Columns are explained in bench/ws/README.md.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out))


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    # idle first: its RSS baseline is then not inflated by memory that earlier runs left free
    p.add_argument("--scenarios", default="idle,echo32,echo4k,handshake")
    p.add_argument("--targets", default="direct,nginx,charon")
    p.add_argument("--workers", type=int, default=1, help="nginx and Charon worker processes")
    p.add_argument("--proxy-cpus", default="1", help="CPU list for the proxy under test")
    p.add_argument("--load-cpus", default="0", help="CPU list for wsload and the backend")
    p.add_argument("--echo-conns", type=int, default=100)
    p.add_argument("--hs-conns", type=int, default=50)
    p.add_argument("--idle-conns", type=int, default=9000)
    p.add_argument("--idle-hold", type=float, default=20.0)
    p.add_argument("--idle-rate", type=float, default=2000.0)
    p.add_argument("--markdown", default=str(WS_DIR / "out" / "latest.md"))
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.10,
        help="before each run, wait until other processes use fewer cores than this",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="longest wait for a quiet machine before each run (s)",
    )
    p.add_argument(
        "--noisy",
        type=float,
        default=0.20,
        help="a run during which other processes used this many cores is repeated",
    )
    p.add_argument("--retries", type=int, default=1, help="how often a noisy run is repeated")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every scenario and target N times, interleaved; the table shows each one's "
        "median round by CPU/op and a note gives every round's CPU/op and paired ratio to nginx",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="restart a proxy found dead before a run at most this often (noted in the report)",
    )
    p.add_argument(
        "--nginx-buffer",
        default="",
        metavar="SIZE",
        help="nginx proxy_buffer_size (e.g. 16k); default: nginx's own (4k: one page)",
    )
    p.add_argument(
        "--trace-signals",
        action="store_true",
        help="strace each proxy's main process for the signals it gets (who stopped it?)",
    )
    args = p.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1:
        p.error("--duration must be > 0, --warmup >= 0 and --rounds >= 1")
    return args


def check_fd_budget(args: argparse.Namespace, scenarios: list[str], extra: list[str]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if "idle" not in scenarios:
        return
    need_proxy = 2 * args.idle_conns + 100
    need_end = args.idle_conns + 100
    if hard != resource.RLIM_INFINITY and hard < need_proxy:
        msg = (
            f"hard RLIMIT_NOFILE {hard} < {need_proxy} fds a proxy worker needs for "
            f"{args.idle_conns} idle tunnels: expect failed connections"
        )
        log(msg)
        extra.append(msg)
    if hard != resource.RLIM_INFINITY and hard < need_end:
        log(f"hard RLIMIT_NOFILE {hard} < {need_end} for wsload / the backend")
    if soft < need_proxy:
        log(f"soft RLIMIT_NOFILE {soft}: children raise theirs to the hard limit {hard}")


def _interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # the finally block of main() stops what was started, by PID


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (timeout, pkill) used to end the driver without its cleanup, leaving nginx,
    # Charon and wsload running.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGHUP, _interrupted)
    command = "python bench/ws/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    scenario_defs = build_scenarios(args)
    wanted_sc = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    wanted_tg = [t.strip() for t in args.targets.split(",") if t.strip()]
    for s in wanted_sc:
        if s not in scenario_defs:
            print(f"unknown scenario {s!r}; known: {', '.join(scenario_defs)}", file=sys.stderr)
            return 2
    for t in wanted_tg:
        if t not in ("direct", "nginx", "charon"):
            print(f"unknown target {t!r}; known: direct, nginx, charon", file=sys.stderr)
            return 2
    if find_exe("taskset") is None:
        print("taskset not found (util-linux)", file=sys.stderr)
        return 2
    extra: list[str] = []
    check_fd_budget(args, wanted_sc, extra)

    tmp = Path(tempfile.mkdtemp(prefix="charon-wsbench-"))
    started: list[Managed] = []
    results: list[Result] = []
    limits: dict[str, str] = {}
    charon: Managed | None = None
    exit_code = 0
    try:
        build_wsload()
        backend_port, nginx_port, charon_port, admin_port = free_ports(4)
        backend = Managed(
            "backend",
            ["taskset", "-c", args.load_cpus, str(WSLOAD), "server", "--port", str(backend_port)],
            tmp / "backend.log",
        )
        started.append(backend)
        wait_ws_ready(backend, backend_port, 10)
        limits["backend"] = max_open_files(backend.pid)
        targets: list[Target] = []
        if "direct" in wanted_tg:
            targets.append(Target("direct", backend_port, None))
        tracers: dict[int, Managed] = {}

        def launch(t: Target) -> None:
            assert t.start is not None
            proc = t.start(t.starts)
            t.starts += 1
            started.append(proc)
            wait_ws_ready(proc, t.port, 30)
            t.proc = proc
            t.used = False
            if args.trace_signals:
                tracer = trace_signals(proc, tmp)
                if tracer is not None:
                    started.append(tracer)
                    tracers[proc.pid] = tracer

        if "nginx" in wanted_tg:
            t = Target("nginx", nginx_port, None)
            t.start = lambda g: start_nginx(
                tmp, nginx_port, backend_port, args.workers, args.proxy_cpus, g, args.nginx_buffer
            )
            launch(t)
            targets.append(t)
        if "charon" in wanted_tg:
            t = Target("charon", charon_port, None)
            t.start = lambda g: start_charon(
                tmp, charon_port, admin_port, backend_port, args.workers, args.proxy_cpus, g
            )
            launch(t)
            charon = t.proc
            targets.append(t)
        for t in targets:
            if t.proc is None:
                continue
            n = t.proc.pin_all(args.proxy_cpus)
            pids = t.proc.pids()
            desc = ", ".join(f"{p} {comm(p)} nofile {max_open_files(p)}" for p in pids)
            log(f"{t.name}: pinned {n}/{len(pids)} processes to CPU {args.proxy_cpus}: {desc}")
            for p in pids[1:] if t.name == "nginx" else pids:
                limits[f"{t.name} {comm(p)} ({p})"] = max_open_files(p)
        nginx_err = tmp / "nginx" / "error.log"
        runner = Runner(args, tmp, started)
        # Rounds interleave every scenario and target, so slow drift of the machine (other
        # guests, frequency) touches all targets alike; each round's ratio is paired.
        plan = [
            (rnd, scenario_defs[sc_name], t)
            for rnd in range(args.rounds)
            for sc_name in wanted_sc
            for t in targets
        ]
        for rnd, sc, t in plan:
            log(f"{sc.title} -> {t.name}" + (f" (round {rnd + 1})" if args.rounds > 1 else ""))
            if t.proc is not None and not t.proc.alive():
                old = t.proc
                why = f"{t.name} (pid {old.pid}) had exited with status {old.proc.returncode}"
                tracer = tracers.get(old.pid)
                if tracer is not None and tracer.signals_log is not None:
                    time.sleep(0.5)
                    why += " -- signals: " + describe_sender(tracer.signals_log)
                log(f"  {why}; log tail:\n{old.log_tail(30)}")
                old.stop()
                t.restarts += 1
                if t.restarts > args.max_restarts:
                    extra.append(why + "; not restarted (--max-restarts)")
                else:
                    launch(t)
                    assert t.proc is not None
                    t.proc.pin_all(args.proxy_cpus)
                    if t.name == "charon":
                        charon = t.proc
                    why += f"; restarted (pid {t.proc.pid}) before '{sc.title}'"
                    extra.append(why)
                    log(f"  {why}")
            r = None
            tries: list[float] = []
            attempts = 1 + max(0, args.retries)
            for attempt in range(attempts):
                if sc.kind == "idle" and t.used and t.proc is not None:
                    # A fresh proxy: what earlier runs left allocated would skew the
                    # baseline (memory kept from an earlier idle attempt inflates it; free
                    # memory kept from other scenarios hides the tunnels' own).
                    t.proc.stop()
                    launch(t)
                    assert t.proc is not None
                    t.proc.pin_all(args.proxy_cpus)
                    if t.name == "charon":
                        charon = t.proc
                wait_quiet(started, args.quiet_threshold, args.quiet_wait)
                cand = runner.run(sc, t)
                t.used = True
                tries.append(cand.others_cores)
                if r is None or (cand.others_cores < r.others_cores and not cand.failure):
                    r = cand
                if r.others_cores < args.noisy or r.failure or attempt + 1 == attempts:
                    break
                log(
                    f"  noisy: other processes used {r.others_cores:.2f} cores "
                    f"({r.others_top}); trying again"
                )
            assert r is not None
            if len(tries) > 1:
                r.notes.append(
                    "ran "
                    + str(len(tries))
                    + " times (other load "
                    + ", ".join(f"{x:.2f}" for x in tries)
                    + " cores); kept the quietest"
                )
            results.append(r)
            summary = (
                f"rate {fmt(r.rate)} {sc.unit}, p50 {fmt(r.p50_us)} µs, "
                f"p99 {fmt(r.p99_us)} µs, CPU/op {fmt(r.cpu_us_per_op, 1)} µs, "
                f"proxy {fmt(r.proxy_cores, 2)} s/s, errors {r.errors}"
            )
            if sc.kind == "idle" and t.proc is not None:
                summary += f", {fmt(r.kib_per_conn, 2)} KiB/conn"
            log(f"  {summary}")
            if r.failure or r.errors or r.notes:
                log(f"  failure: {r.failure}  errors: {r.error_detail}  notes: {r.notes}")
            if t.proc is not None and (r.failure or r.errors):
                tail = t.proc.log_tail(60)
                if t.name == "nginx" and nginx_err.exists():
                    tail = "\n".join(nginx_err.read_text(errors="replace").splitlines()[-60:])
                log(f"  {t.name} log tail:\n{tail}")
            if t.proc is not None and not t.proc.alive():
                log(
                    f"  {t.name} DIED (status {t.proc.proc.returncode}); log tail:\n"
                    f"{t.proc.log_tail(80)}"
                )
                extra.append(
                    f"{t.name} exited during '{sc.title}' with status {t.proc.proc.returncode}"
                )
            time.sleep(1.0)  # let closes settle before the next run
        if nginx_err.exists():
            alerts = [
                ln
                for ln in nginx_err.read_text(errors="replace").splitlines()
                if "[alert]" in ln or "[emerg]" in ln or "[crit]" in ln
            ]
            if alerts:
                extra.append(f"nginx error.log: {len(alerts)} alert/crit lines, e.g. {alerts[0]}")
        if charon is not None:
            text = charon.log_path.read_text(errors="replace") if charon.log_path.exists() else ""
            bad = [
                ln
                for ln in text.splitlines()
                if any(w in ln for w in ("Traceback", "ERROR", "CRITICAL", "error"))
            ]
            if bad:
                extra.append(f"Charon log: {len(bad)} error lines, e.g. {bad[0][:200]}")
    except BenchError as e:
        log(f"error: {e}")
        if charon is not None:
            log(f"charon log tail:\n{charon.log_tail(80)}")
        exit_code = 1
    except KeyboardInterrupt:
        log("interrupted")
        exit_code = 130
    finally:
        for load in list(LoadRun.running):
            load.deadline = 0.0  # finish() kills it at once
            load.finish()
        for m in reversed(started):
            m.stop()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if results:
        round_notes = rounds_summary(results) if args.rounds > 1 else []
        results = median_rounds(results)
        tables = build_tables(results, scenario_defs, args)
        tables[4].extend(round_notes)
        head, rows, mem_head, mem_rows, notes = tables
        print()
        print(text_table(head, rows))
        if mem_rows:
            print()
            print(text_table(mem_head, mem_rows))
        print()
        print("bound by:")
        for note in notes:
            print(f"  {note}")
        for note in extra:
            print(f"  note: {note}")
        md = Path(args.markdown)
        if not md.is_absolute():
            md = REPO / md
        write_markdown(md, machine_info(args, limits), tables, command, extra)
        print(f"\nwrote {md}")
        if any(r.failure for r in results):
            exit_code = exit_code or 1
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
