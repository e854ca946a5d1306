#!/usr/bin/env python3
"""Charon benchmark: Charon vs nginx (as a proxy) vs the direct backend, in one run.

Run it through `bench/run.sh` (or `.venv/bin/python bench/run.py --help`). Standard library only.

What it does, in order:
  1. installs nginx and wrk from Debian when they are missing (apt-get, as root or via sudo);
  2. starts an nginx BACKEND (its own prefix under a temp dir) serving /small and /64k;
  3. starts an nginx PROXY and Charon (`charon run --config FILE`) in front of that backend;
  4. pins the proxies to --proxy-cpus and wrk + backend to --load-cpus with taskset;
  5. runs every Scenario against every target, sampling the proxy's CPU time around each run;
  6. prints a table and writes it as Markdown (--markdown);
  7. stops everything it started, by PID, and removes its temp dir.

To add a scenario, subclass `Scenario` (see `WrkScenario`) and append it in `build_scenarios`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BenchError, find_exe, free_ports, parse_cpulist, pin  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_BIN = REPO / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMALL_BODY = b"hello, world\n"
LARGE_SIZE = 65536


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)




# --------------------------------------------------------------------------------------------
# Tools: find, install
# --------------------------------------------------------------------------------------------


def ensure_tools(allow_install: bool) -> None:
    """Install nginx / wrk (and taskset) from Debian if missing."""
    wanted = {"nginx": ["nginx-light", "nginx"], "wrk": ["wrk"], "taskset": ["util-linux"]}
    missing = {exe: pkgs for exe, pkgs in wanted.items() if find_exe(exe) is None}
    if not missing:
        return
    if not allow_install:
        raise BenchError(f"missing tools {sorted(missing)} and --no-install was given")
    if os.geteuid() == 0:
        prefix: list[str] = []
    elif find_exe("sudo"):
        prefix = [find_exe("sudo") or "sudo"]
    else:
        raise BenchError(f"missing tools {sorted(missing)}; not root and no sudo to install them")
    apt = [*prefix, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    log(f"installing {sorted(missing)} from Debian")
    subprocess.run([*apt, "update"], check=False, timeout=600)
    for exe, candidates in missing.items():
        for pkg in candidates:  # first choice, then fallbacks (nginx-light -> nginx)
            r = subprocess.run(
                [*apt, "install", "-y", "--no-install-recommends", pkg], check=False, timeout=900
            )
            if r.returncode == 0 and find_exe(exe):
                break
        if find_exe(exe) is None:
            raise BenchError(f"could not install {exe} (tried {candidates})")


# --------------------------------------------------------------------------------------------
# /proc helpers: process trees, CPU time, pinning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    ticks: int  # utime + stime + cutime + cstime
    start: int  # starttime, to tell a PID from a reused one
    comm: str = ""
    own: int = 0  # utime + stime only

    @property
    def kernel_thread(self) -> bool:
        return self.pid == 2 or self.ppid == 2  # kthreadd and its children


def read_stat(pid: int) -> ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the LAST ')'.
    rest = data[data.rfind(")") + 2 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3].
    try:
        ppid = int(rest[1])
        utime, stime, cutime, cstime = (int(x) for x in rest[11:15])
        start = int(rest[19])
    except (IndexError, ValueError):
        return None
    comm = data[data.find("(") + 1 : data.rfind(")")]
    return ProcStat(pid, ppid, utime + stime + cutime + cstime, start, comm, utime + stime)


def all_stats() -> dict[int, ProcStat]:
    """Every process on the machine (one /proc scan)."""
    stats: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                stats[st.pid] = st
    return stats


def process_tree(root: int, stats: dict[int, ProcStat] | None = None) -> list[ProcStat]:
    """`root` and all its descendants."""
    if stats is None:
        stats = all_stats()
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    out, queue, seen = [], [root], set()
    while queue and len(seen) < 10000:
        pid = queue.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        out.append(stats[pid])
        queue.extend(children.get(pid, ()))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of `root` and all its descendants.

    cutime/cstime are included so that the CPU of a child that exited and was reaped during the
    window still counts (it moves from the child's utime to the parent's cutime); live
    descendants are counted through their own utime/stime, never twice.
    """
    return sum(st.ticks for st in process_tree(root)) / CLK_TCK


# --------------------------------------------------------------------------------------------
# Managed processes
# --------------------------------------------------------------------------------------------


class Managed:
    """A long-running process we started; stopped by PID (and its descendants) in `stop`."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
        self.known: dict[int, int] = {}  # descendant pid -> starttime, seen at some point
        self.refresh()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def refresh(self, stats: dict[int, ProcStat] | None = None) -> list[ProcStat]:
        tree = process_tree(self.pid, stats)
        for st in tree:
            if st.pid != self.pid:
                self.known[st.pid] = st.start
        return tree

    def cpu_seconds(self, stats: dict[int, ProcStat] | None = None) -> float:
        return sum(st.ticks for st in self.refresh(stats)) / CLK_TCK

    def pin_all(self, cpus: str) -> int:
        """Re-pin the process and every descendant; returns how many were pinned."""
        return sum(pin(st.pid, cpus) for st in self.refresh())

    def log_tail(self, lines: int = 25) -> str:
        try:
            self._log.flush()
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.refresh()
            _terminate(self.pid, timeout, waiter=self.proc)
        # Descendants that outlived their parent (or were orphaned earlier): by PID, checked
        # against their start time so a reused PID is never signalled.
        leftovers = [pid for pid, start in self.known.items() if _same(pid, start)]
        for pid in leftovers:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while leftovers and time.monotonic() < deadline:
            leftovers = [p for p in leftovers if _same(p, self.known[p])]
            time.sleep(0.1)
        for pid in leftovers:
            if _same(pid, self.known[pid]):
                _signal(pid, signal.SIGKILL)
        self._log.close()


def _same(pid: int, start: int) -> bool:
    st = read_stat(pid)
    return st is not None and st.start == start


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _terminate(pid: int, timeout: float, waiter: subprocess.Popen) -> None:
    _signal(pid, signal.SIGTERM)
    try:
        waiter.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal(pid, signal.SIGKILL)
        try:
            waiter.wait(5)
        except subprocess.TimeoutExpired:
            log(f"pid {pid} did not die after SIGKILL")


def http_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": "127.0.0.1"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(proc: Managed, port: int, timeout: float) -> str | None:
    """Poll GET /small until 200 with the expected body; None when ready, else why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            return f"exited with status {proc.proc.returncode}"
        try:
            status, body = http_get(port, "/small")
            if status == 200 and body == SMALL_BODY:
                return None
            last = f"answered {status} {body[:60]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    return f"no 200 on GET /small within {timeout:.0f}s (last: {last})"


# --------------------------------------------------------------------------------------------
# nginx (backend and proxy) and Charon
# --------------------------------------------------------------------------------------------

NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 65536;
events {{
    worker_connections 8192;
}}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
{body}
}}
"""

BACKEND_HTTP = """\
    sendfile on;
    tcp_nopush on;
    open_file_cache max=16 inactive=600s;
    open_file_cache_valid 600s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {docroot};
        location = /small {{
            default_type text/plain;
            return 200 "hello, world\\n";
        }}
        location / {{
        }}
    }}
"""

PROXY_HTTP = """\
    upstream bench_backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://bench_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            # Room for a 64 KiB body in memory: never spill to a temp file.
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
            proxy_max_temp_file_size 0;
        }}
    }}
"""


def start_nginx(name: str, root: Path, workers: int, body: str, cpus: str) -> Managed:
    prefix = root / name
    prefix.mkdir(mode=0o755)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(workers=workers, prefix=prefix, body=body))
    nginx = find_exe("nginx") or "nginx"
    # -e: the startup error log, before the config is read (else the distro's default path).
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
    return Managed(name, argv, prefix / "stdout.log")


def charon_config(
    port: int, admin_port: int, backend_port: int, workers: int, events: bool = True
) -> str:
    return (
        "[server]\n"
        f'listen = ["127.0.0.1:{port}"]\n'
        f"workers = {workers}\n"
        "[admin]\n"
        f'listen = "127.0.0.1:{admin_port}"\n'
        + ("" if events else "events = false\n")
        +        "[[hosts]]\n"
        'domains = ["127.0.0.1", "localhost"]\n'
        f'upstream = "http://127.0.0.1:{backend_port}"\n'
    )


# --------------------------------------------------------------------------------------------
# Targets, results
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str  # "direct", "nginx", "charon"
    port: int
    proc: Managed | None  # the proxy whose CPU is measured; None for the direct backend
    repin: bool = False  # re-pin all descendants before each run (Charon's workers)
    # SIGSTOP the proxy's first process (Charon's supervisor) for the measured run: the workers
    # then publish into full queues and drop events.
    stop_root: bool = False

    @property
    def is_proxy(self) -> bool:
        return self.proc is not None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class LoadResult:
    """What a load generator reports for one measured run."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""


@dataclass(frozen=True)
class CpuUse:
    """How busy one CPU was during a run, in cores (0..1), from /proc/stat."""

    task: float  # user + nice + system: processes (ours and others)
    irq: float  # hard + soft interrupts (loopback TCP work often lands here)
    steal: float  # the hypervisor ran something else

    @property
    def busy(self) -> float:
        return self.task + self.irq + self.steal


def cpu_ticks() -> dict[int, tuple[int, int, int]]:
    """Per CPU: (user+nice+system, irq+softirq, steal) ticks from /proc/stat."""
    out: dict[int, tuple[int, int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]] + [0] * (8 - len(vals[:8]))
                out[int(name[3:])] = (v[0] + v[1] + v[2], v[5] + v[6], v[7])
    return out


def cpu_use(before: dict, after: dict, wall_s: float) -> dict[int, CpuUse]:
    use = {}
    for cpu, a in after.items():
        b = before.get(cpu, a)
        d = [(x - y) / CLK_TCK / wall_s if wall_s > 0 else 0.0 for x, y in zip(a, b, strict=True)]
        use[cpu] = CpuUse(*d)
    return use


@dataclass
class Measurement:
    scenario: str
    target: str
    load: LoadResult | None
    failure: str | None = None
    proxy_cpu_s: float | None = None  # proxy's CPU during the measured run
    root_cpu_s: float | None = None  # of which the proxy's first process (Charon's supervisor)
    load_cpu_s: float | None = None  # load generator + backend CPU during the run
    wall_s: float = 0.0  # between the two CPU samples
    cpus: dict[int, CpuUse] = field(default_factory=dict)  # per CPU, in cores over wall_s
    kernel_threads_s: float = 0.0  # ksoftirqd, kworkers...: mostly serving our traffic
    others: list[tuple[str, float]] = field(default_factory=list)  # top other processes, cores

    @property
    def other_cores(self) -> float:
        """CPU used on the machine beyond ours (proxy, wrk, backend): other people's load.

        Process times from /proc/PID/stat include the softirq work done in their context,
        which /proc/stat books as irq, so "busy" here is task + irq. Kernel threads
        (ksoftirqd, kworkers) count as ours: on a quiet machine they serve our traffic.
        """
        if self.wall_s <= 0:
            return 0.0
        ours = (
            (self.proxy_cpu_s or 0.0) + (self.load_cpu_s or 0.0) + self.kernel_threads_s
        ) / self.wall_s
        return max(0.0, sum(c.task + c.irq for c in self.cpus.values()) - ours)

    @property
    def is_proxy_target(self) -> bool:
        return self.proxy_cpu_s is not None

    @property
    def cpu_us_per_req(self) -> float | None:
        if self.proxy_cpu_s is None or not self.load or self.load.requests <= 0:
            return None
        return self.proxy_cpu_s / self.load.requests * 1e6

    @property
    def root_us_per_req(self) -> float | None:
        if self.root_cpu_s is None or not self.load or self.load.requests <= 0:
            return None
        return self.root_cpu_s / self.load.requests * 1e6


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------


class Bench:
    """What scenarios may use: options, the pinning, the temp dir."""

    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args = args
        self.tmp = tmp
        self.load_cpus: str = args.load_cpus
        self.proxy_cpus: str = args.proxy_cpus

    def pinned(self, argv: list[str]) -> list[str]:
        """A load-generator command line, pinned to the load CPUs."""
        return ["taskset", "-c", self.load_cpus, *argv]


class Scenario(ABC):
    """One kind of load. The driver handles targets, pinning and CPU sampling; a scenario only
    generates load and reports what the load generator saw.

    Future scenarios (WebSocket echo rate, handshake rate, many idle connections) will run a
    small C load generator (e.g. bench/loadgen/) from `measure`, pinned with `bench.pinned`,
    and turn its output into a LoadResult; append them in `build_scenarios`.
    """

    name: str
    description: str

    def applies_to(self, target: Target) -> bool:
        return True

    @abstractmethod
    def warmup(self, bench: Bench, target: Target) -> None:
        """Unmeasured load before the measured run (connections, caches, JIT-free warm paths)."""

    @abstractmethod
    def measure(self, bench: Bench, target: Target) -> LoadResult:
        """The measured run: the proxy's CPU is sampled right before and right after this."""


@dataclass
class WrkScenario(Scenario):
    name: str
    description: str
    path: str
    connections: int
    threads: int = 1
    headers: tuple[str, ...] = ()

    def argv(self, bench: Bench, target: Target, seconds: float) -> list[str]:
        wrk = find_exe("wrk") or "wrk"
        argv = [
            wrk,
            "--latency",
            "-t",
            str(self.threads),
            "-c",
            str(self.connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "5s",
        ]
        for h in self.headers:
            argv += ["-H", h]
        return bench.pinned([*argv, target.url(self.path)])

    def _run(self, bench: Bench, target: Target, seconds: float) -> str:
        r = subprocess.run(
            self.argv(bench, target, seconds),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"wrk exited {r.returncode}: {(r.stderr or r.stdout).strip()}")
        return r.stdout

    def warmup(self, bench: Bench, target: Target) -> None:
        if bench.args.warmup > 0:
            self._run(bench, target, bench.args.warmup)

    def measure(self, bench: Bench, target: Target) -> LoadResult:
        return parse_wrk(self._run(bench, target, bench.args.duration))


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    c, t = args.connections, args.threads
    return [
        WrkScenario(
            "small-keepalive",
            f"keep-alive GET /small ({len(SMALL_BODY)} B), -c {c}",
            "/small",
            c,
            t,
        ),
        WrkScenario("64k-keepalive", f"keep-alive GET /64k ({LARGE_SIZE} B), -c {c}", "/64k", c, t),
        WrkScenario(
            "small-close",
            f"Connection: close GET /small (new TCP per request), -c {c}",
            "/small",
            c,
            t,
            headers=("Connection: close",),
        ),
        # Later: WebSocket echo rate, WebSocket handshake rate, idle connections (C loadgen).
    ]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(out: str) -> LoadResult:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    lat: dict[str, float] = {}
    for pct, value, unit in re.findall(
        r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M
    ):
        lat[pct] = _ms(value, unit)
    errors: dict[str, int] = {}
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        for key, v in zip(("connect", "read", "write", "timeout"), se.groups(), strict=True):
            if int(v):
                errors[key] = int(v)
    n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if n2 and int(n2.group(1)):
        errors["non2xx"] = int(n2.group(1))
    return LoadResult(
        requests=int(m.group(1)),
        duration_s=_ms(m.group(2), m.group(3)) / 1e3,
        rps=float(rps.group(1)),
        p50_ms=lat.get("50"),
        p99_ms=lat.get("99"),
        errors=errors,
        raw=out,
    )


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _others(
    before: dict[int, ProcStat], after: dict[int, ProcStat], ours: set[int]
) -> tuple[float, list[tuple[str, float]]]:
    """CPU seconds of processes that are not ours, alive at the end of the window:
    (kernel threads total, [(name, seconds)] of the others, biggest first).

    Only utime + stime: a parent's cutime jumps by a child's whole life when it reaps it.
    Processes that start and exit inside the window are missed here but still show in the
    /proc/stat totals (Measurement.other_cores)."""
    kernel, user = 0.0, []
    for pid, st in after.items():
        if pid in ours:
            continue
        b = before.get(pid)
        d = (st.own - (b.own if b is not None and b.start == st.start else 0)) / CLK_TCK
        if d <= 0:
            continue
        if st.kernel_thread:
            kernel += d
        else:
            user.append((f"{st.comm}[{pid}]", d))
    user.sort(key=lambda x: -x[1])
    return kernel, [(_cmdline(name), d) for name, d in user[:3]]


def _cmdline(label: str) -> str:
    """'comm[pid]' -> 'comm[pid] (first words of its command line)' when still readable."""
    pid = label[label.rfind("[") + 1 : -1]
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read(300).decode("utf-8", "replace").split("\0")
    except OSError:
        return label
    cmd = " ".join(w for w in words if w)
    return f"{label} `{cmd[:60]}`" if cmd else label


def run_one(bench: Bench, scenario: Scenario, target: Target, backend: Managed) -> Measurement:
    if target.proc is not None and not target.proc.alive():
        return Measurement(scenario.name, target.name, None, failure="proxy is not running")
    if target.repin and target.proc is not None:
        target.proc.pin_all(bench.proxy_cpus)
    try:
        scenario.warmup(bench, target)
        time.sleep(0.5)
        # One /proc snapshot on each side of the measured run: proxy, backend, everyone else.
        if target.stop_root and target.proc is not None:
            os.kill(target.proc.pid, signal.SIGSTOP)
        try:
            all0, sys0, kids0 = all_stats(), cpu_ticks(), children_cpu_seconds()
            t0 = time.monotonic()
            result = scenario.measure(bench, target)
            t1 = time.monotonic()
            all1, sys1, kids1 = all_stats(), cpu_ticks(), children_cpu_seconds()
        finally:
            if target.stop_root and target.proc is not None:
                os.kill(target.proc.pid, signal.SIGCONT)
                time.sleep(1)  # the supervisor catches up with what was queued
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return Measurement(scenario.name, target.name, None, failure=str(e).splitlines()[0])
    ours = {os.getpid()}
    for proc in (backend, target.proc):
        if proc is not None:
            for snap in (all0, all1):
                ours.update(st.pid for st in proc.refresh(snap))
    proxy_cpu = root_cpu = None
    if target.proc is not None:
        proxy_cpu = target.proc.cpu_seconds(all1) - target.proc.cpu_seconds(all0)
        root0, root1 = all0.get(target.proc.pid), all1.get(target.proc.pid)
        if root0 is not None and root1 is not None:
            root_cpu = (root1.own - root0.own) / CLK_TCK
    # The measured run's load generator is our only child reaped in the window.
    load_cpu = (kids1 - kids0) + (backend.cpu_seconds(all1) - backend.cpu_seconds(all0))
    kernel_s, others = _others(all0, all1, ours)
    wall = t1 - t0
    return Measurement(
        scenario.name,
        target.name,
        result,
        proxy_cpu_s=proxy_cpu,
        root_cpu_s=root_cpu,
        load_cpu_s=load_cpu,
        wall_s=wall,
        cpus=cpu_use(sys0, sys1, wall),
        kernel_threads_s=kernel_s,
        others=[(name, sec / wall) for name, sec in others] if wall > 0 else [],
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

COLUMNS = [
    "scenario",
    "target",
    "req/s",
    "p50",
    "p99",
    "proxy CPU µs/req",
    "req/s vs nginx",
    "CPU/req vs nginx",
    "req/s vs direct",
    "errors",
]


def _figure(m: Measurement) -> float:
    """What a measurement is ranked by: proxy CPU per request, or the rate for the direct run."""
    if m.cpu_us_per_req is not None:
        return m.cpu_us_per_req
    return -(m.load.rps if m.load else 0.0)


def median_round(rounds: list[list[Measurement]]) -> list[Measurement]:
    """Per scenario and target, the measurement of the median round (by CPU per request)."""
    picked: list[Measurement] = []
    for i, first in enumerate(rounds[0]):
        runs = [r[i] for r in rounds if i < len(r) and r[i].load is not None]
        if not runs:
            picked.append(first)
            continue
        runs.sort(key=_figure)
        picked.append(runs[(len(runs) - 1) // 2])
    return picked


def rounds_summary(rounds: list[list[Measurement]]) -> list[str]:
    """Every round's CPU per request, and the paired cost of events (charon vs
    charon-noevents in the same round, measured minutes apart, so the noise is shared)."""
    lines = []
    keys = [(m.scenario, m.target) for m in rounds[0]]
    for scenario in dict.fromkeys(sc for sc, _ in keys):
        parts = []
        for sc, target in keys:
            if sc != scenario:
                continue
            figures = [
                m.cpu_us_per_req for r in rounds for m in r
                if (m.scenario, m.target) == (sc, target) and m.cpu_us_per_req is not None
            ]
            if figures:
                parts.append(f"{target} " + ", ".join(f"{f:.1f}" for f in figures))
        costs = []
        for r in rounds:
            by_target = {m.target: m.cpu_us_per_req for m in r if m.scenario == scenario}
            on, off = by_target.get("charon"), by_target.get("charon-noevents")
            if on and off:
                costs.append(on / off - 1)
        if costs:
            ordered = sorted(costs)
            median = ordered[(len(ordered) - 1) // 2]
            parts.append(
                "events cost " + ", ".join(f"{c:+.0%}" for c in costs) + f" (median {median:+.0%})"
            )
        if parts:
            lines.append(f"{scenario}: proxy CPU µs/req per round: " + "; ".join(parts))
    return lines


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v * 1000:.0f} µs" if v < 1 else f"{v:.2f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


def table_rows(results: list[Measurement]) -> list[list[str]]:
    by = {(m.scenario, m.target): m for m in results}
    rows = []
    for m in results:
        if m.load is None:
            rows.append(
                [m.scenario, m.target, "FAILED", "—", "—", "—", "—", "—", "—", m.failure or "?"]
            )
            continue
        ng, di = by.get((m.scenario, "nginx")), by.get((m.scenario, "direct"))
        ng_rps = ng.load.rps if ng and ng.load else None
        di_rps = di.load.rps if di and di.load else None
        cpu = m.cpu_us_per_req
        ng_cpu = ng.cpu_us_per_req if ng else None
        errs = ", ".join(f"{k} {v}" for k, v in m.load.errors.items()) or "0"
        rows.append(
            [
                m.scenario,
                m.target,
                f"{m.load.rps:,.0f}",
                _fmt_ms(m.load.p50_ms),
                _fmt_ms(m.load.p99_ms),
                "—" if cpu is None else f"{cpu:.1f}",
                _ratio(m.load.rps, ng_rps) if m.is_proxy_target else "—",
                _ratio(cpu, ng_cpu) if m.is_proxy_target else "—",
                _ratio(m.load.rps, di_rps) if m.target != "direct" else "—",
                errs,
            ]
        )
    return rows


def _busy(m: Measurement, cpus: list[int]) -> tuple[float, float]:
    """(busy, irq) cores summed over `cpus` during the run."""
    use = [m.cpus[c] for c in cpus if c in m.cpus]
    return sum(u.busy for u in use), sum(u.irq for u in use)


def _state(own: float, own_cores: int, busy: float, cpus: int) -> str:
    """'own': our processes used >= 90% of what they may use; 'shared': the CPUs were >= 90%
    busy but not with our processes; 'free': neither."""
    if own >= 0.9 * own_cores:
        return "own"
    return "shared" if busy >= 0.9 * cpus else "free"


def bound_notes(results: list[Measurement], scenarios: list[Scenario], args) -> list[str]:
    """One line per scenario: what limited each target's figure.

    A side is "saturated" when its processes used >= 90% of the cores they may use (process
    time includes the softirq work of loopback TCP done in their context). The busy figures are
    the pinned CPUs' totals from /proc/stat, whoever used them, with the irq share.
    """
    proxy_set, load_set = parse_cpulist(args.proxy_cpus), parse_cpulist(args.load_cpus)
    proxy_cores = min(args.workers, len(proxy_set))  # what the proxy can use at most
    load_cores = len(load_set)
    cpu_names = {
        "proxy": ",".join(map(str, proxy_set)),
        "load": ",".join(map(str, load_set)),
    }
    notes = []
    for sc in scenarios:
        parts = []
        for m in results:
            if m.scenario != sc.name or m.load is None or m.wall_s <= 0:
                continue
            load_u = (m.load_cpu_s or 0.0) / m.wall_s
            load_busy, load_irq = _busy(m, load_set)
            load_state = _state(load_u, load_cores, load_busy, len(load_set))
            figures = [
                f"wrk+backend {load_u:.2f} core, CPU {cpu_names['load']} "
                f"{load_busy:.2f} busy (irq {load_irq:.2f})"
            ]
            if m.proxy_cpu_s is None:
                verdict = {
                    "own": "load side saturated",
                    "shared": "load CPUs full, shared with other processes",
                    "free": "load side not saturated",
                }[load_state]
            else:
                proxy_u = m.proxy_cpu_s / m.wall_s
                proxy_busy, proxy_irq = _busy(m, proxy_set)
                proxy_state = _state(proxy_u, proxy_cores, proxy_busy, len(proxy_set))
                figures.insert(
                    0,
                    f"proxy {proxy_u:.2f}/{proxy_cores} core, CPU {cpu_names['proxy']} "
                    f"{proxy_busy:.2f} busy (irq {proxy_irq:.2f})",
                )
                if m.target.startswith("charon") and m.root_us_per_req is not None:
                    # The supervisor shares the proxy CPU: its share shows what the event bus
                    # costs on the receiving side.
                    figures.insert(1, f"supervisor {m.root_us_per_req:.1f} µs/req")
                if proxy_state == "own" and load_state == "own":
                    verdict = "proxy AND load side saturated"
                elif proxy_state == "own":
                    verdict = "proxy CPU-bound"
                elif load_state == "own":
                    verdict = "load side bound, proxy has headroom"
                elif "shared" in (proxy_state, load_state):
                    verdict = "CPUs full, shared with other processes"
                else:
                    verdict = "neither side saturated (latency/concurrency bound)"
            if m.other_cores >= 0.1:
                verdict += " - CONTENDED"
                figures.append(f"other processes {m.other_cores:.2f} core")
            parts.append(f"{m.target}: {verdict} [{'; '.join(figures)}]")
        if parts:
            notes.append(f"{sc.name}: " + " | ".join(parts))
    return notes


def contention_warnings(results: list[Measurement]) -> list[str]:
    worst = max((m.other_cores for m in results if m.load), default=0.0)
    seen: dict[str, float] = {}
    for m in results:
        if m.load and m.other_cores >= 0.1:
            for n, c in m.others:
                seen[n] = max(c, seen.get(n, 0.0))
    names = [n for n, c in sorted(seen.items(), key=lambda x: -x[1]) if c >= 0.02][:5]
    steal = max((sum(c.steal for c in m.cpus.values()) for m in results if m.load), default=0.0)
    out = []
    if worst >= 0.15:
        out.append(
            f"other processes used up to {worst:.2f} core during the measured runs: "
            "the figures are disturbed; rerun on a quiet machine"
            + (f" (biggest: {'; '.join(names)})" if names else "")
        )
    if steal >= 0.05:
        out.append(f"the hypervisor stole up to {steal:.2f} core during the measured runs")
    return out


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(COLUMNS), sep, *(line(r) for r in rows)])


def render_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _cmd_output(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment() -> dict[str, str]:
    cpu = "?"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx_v = _cmd_output([find_exe("nginx") or "nginx", "-v"]).replace("nginx version: ", "")
    wrk_v = _cmd_output([find_exe("wrk") or "wrk", "-v"]).split()[:2]
    venv_py = VENV_BIN / "python"
    py = sys.executable
    pkgs = ""
    if venv_py.exists():
        py = str(venv_py)
        pkgs = _cmd_output(
            [
                py,
                "-c",
                (
                    "import importlib.metadata as m\n"
                    "out = []\n"
                    "for p in ('charon', 'uvloop', 'httptools'):\n"
                    "    try: out.append(f'{p} {m.version(p)}')\n"
                    "    except Exception: pass\n"
                    "print(', '.join(out))"
                ),
            ]
        )
    py_v = _cmd_output([py, "-c", "import platform; print(platform.python_version())"])
    commit = _cmd_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": str(os.cpu_count()),
        "CPU": cpu,
        "kernel": f"{platform.system()} {platform.release()}",
        "nginx": nginx_v,
        "wrk": " ".join(wrk_v) or "?",
        "Python": py_v + (f" ({pkgs})" if pkgs else ""),
        "commit": commit if re.fullmatch(r"[0-9a-f]{4,40}", commit) else "?",
    }


def write_json(path: Path, env, results: list[Measurement], skipped, warnings) -> None:
    def one(m: Measurement) -> dict:
        d = {
            "scenario": m.scenario,
            "target": m.target,
            "failure": m.failure,
            "proxy_cpu_s": m.proxy_cpu_s,
            "root_cpu_s": m.root_cpu_s,
            "load_cpu_s": m.load_cpu_s,
            "wall_s": m.wall_s,
            "cpu_us_per_req": m.cpu_us_per_req,
            "other_cores": m.other_cores,
            "kernel_threads_s": m.kernel_threads_s,
            "others": m.others,
            "cpus": {str(c): u.__dict__ for c, u in m.cpus.items()},
        }
        if m.load:
            d.update({k: v for k, v in m.load.__dict__.items() if k != "raw"})
        return d

    doc = {
        "environment": env,
        "results": [one(m) for m in results],
        "skipped": skipped,
        "warnings": warnings,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


def write_markdown(
    path: Path, env: dict[str, str], args, rows, notes, skipped, warnings, scenarios
) -> None:
    lines = [f"# Charon benchmark — {env['date']}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if k != "date"]
    lines += [
        f"- settings: duration {args.duration}s (after {args.warmup}s warm-up), "
        f"wrk -t {args.threads} -c {args.connections}, proxy workers {args.workers}, "
        f"proxy CPUs {args.proxy_cpus}, wrk + backend CPUs {args.load_cpus}",
        "",
        "## Scenarios",
        "",
    ]
    lines += [f"- `{s.name}`: {s.description}" for s in scenarios]
    lines += ["", "## Results", "", render_markdown(rows), "", "## Bound by", ""]
    lines += [f"- {n}" for n in notes] or ["- (no results)"]
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in skipped]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    lines += ["", "Columns: see bench/README.md.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Compare Charon, nginx (proxy) and the direct "
        "nginx backend with wrk, on pinned CPUs."
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run (10)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per run (2)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes for BOTH proxies, nginx and Charon (1)",
    )
    p.add_argument("--connections", type=int, default=50, help="wrk -c (50)")
    p.add_argument("--threads", type=int, default=1, help="wrk -t (1)")
    p.add_argument("--proxy-cpus", default="1", help="taskset CPU list for the proxies (1)")
    p.add_argument("--load-cpus", default="0", help="taskset CPU list for wrk + backend (0)")
    p.add_argument(
        "--targets",
        default="direct,nginx,charon",
        help="comma list among direct,nginx,charon,charon-noevents,charon-stopped "
        "(charon-noevents: Charon with [admin] events = false, the difference is what publishing "
        "events costs; charon-stopped: the same Charon as `charon` with its supervisor "
        "SIGSTOPped during each measured run, so its workers publish into full queues)",
    )
    p.add_argument(
        "--scenarios", default="", help="comma list of scenario names to run (default: all)"
    )
    p.add_argument("--charon", default=str(VENV_BIN / "charon"), help="the charon executable")
    p.add_argument(
        "--charon-timeout",
        type=float,
        default=15.0,
        help="seconds for Charon to answer 200 on GET /small (15)",
    )
    p.add_argument(
        "--markdown",
        default=str(BENCH_DIR / "out" / "latest.md"),
        help="where to write the Markdown report (bench/out/latest.md)",
    )
    p.add_argument(
        "--rounds", type=int, default=1,
        help="run every scenario and target this many times, interleaved; the table shows the "
        "median round and a note lists every round (1)",
    )
    p.add_argument("--json", default="", help="also write raw results as JSON here")
    p.add_argument("--no-install", action="store_true", help="never run apt-get")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    if (args.duration < 1 or args.warmup < 0 or args.workers < 1 or args.connections < 1
            or args.rounds < 1):
        p.error("bad --duration/--warmup/--workers/--connections")
    online = os.sched_getaffinity(0)
    for opt in ("proxy_cpus", "load_cpus"):
        try:
            cpus = parse_cpulist(getattr(args, opt))
        except ValueError:
            p.error(f"--{opt.replace('_', '-')}: not a CPU list")
        if not cpus or not set(cpus) <= online:
            p.error(
                f"--{opt.replace('_', '-')} {getattr(args, opt)}: not among CPUs {sorted(online)}"
            )
    if set(parse_cpulist(args.proxy_cpus)) & set(parse_cpulist(args.load_cpus)):
        log("warning: --proxy-cpus and --load-cpus overlap; the figures will mix")
    return args


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    ensure_tools(not args.no_install)

    wanted_targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    scenarios = build_scenarios(args)
    if args.scenarios:
        names = {s.strip() for s in args.scenarios.split(",")}
        unknown = names - {s.name for s in scenarios}
        if unknown:
            raise BenchError(
                f"unknown scenarios {sorted(unknown)}; have {[s.name for s in scenarios]}"
            )
        scenarios = [s for s in scenarios if s.name in names]

    tmp = Path(tempfile.mkdtemp(prefix="charon-bench-"))
    tmp.chmod(0o755)  # nginx workers may run as another user (nobody) and read the docroot
    procs: list[Managed] = []
    skipped: list[str] = []
    results: list[Measurement] = []
    try:
        backend_port, nginx_port, charon_port, admin_port = free_ports(4)
        docroot = tmp / "www"
        docroot.mkdir(mode=0o755)
        (docroot / "64k").write_bytes(os.urandom(LARGE_SIZE))
        (docroot / "64k").chmod(0o644)

        backend = start_nginx(
            "backend",
            tmp,
            1,
            BACKEND_HTTP.format(port=backend_port, docroot=docroot),
            args.load_cpus,
        )
        procs.append(backend)
        why = wait_ready(backend, backend_port, 10)
        if why:
            raise BenchError(
                f"backend nginx: {why}\n{backend.log_tail()}\n"
                f"{_read_tail(tmp / 'backend' / 'error.log')}"
            )
        status, body = http_get(backend_port, "/64k", timeout=5)
        if status != 200 or len(body) != LARGE_SIZE:
            raise BenchError(f"backend /64k: {status}, {len(body)} bytes")
        log(f"backend nginx pid {backend.pid} on 127.0.0.1:{backend_port} (CPUs {args.load_cpus})")

        targets: list[Target] = []
        if "direct" in wanted_targets:
            targets.append(Target("direct", backend_port, None))

        if "nginx" in wanted_targets:
            proxy = start_nginx(
                "proxy",
                tmp,
                args.workers,
                PROXY_HTTP.format(port=nginx_port, backend_port=backend_port),
                args.proxy_cpus,
            )
            procs.append(proxy)
            why = wait_ready(proxy, nginx_port, 10)
            if why:
                raise BenchError(
                    f"nginx proxy: {why}\n{proxy.log_tail()}\n"
                    f"{_read_tail(tmp / 'proxy' / 'error.log')}"
                )
            proxy.pin_all(args.proxy_cpus)
            log(
                f"nginx proxy pid {proxy.pid} ({args.workers} worker(s)) on "
                f"127.0.0.1:{nginx_port} (CPUs {args.proxy_cpus})"
            )
            targets.append(Target("nginx", nginx_port, proxy))

        if "charon" in wanted_targets:
            t = start_charon(args, tmp, charon_port, admin_port, backend_port, procs, skipped)
            if t:
                targets.append(t)

        if "charon-stopped" in wanted_targets:
            running = next((t for t in targets if t.name == "charon"), None)
            if running is None:
                running = start_charon(
                    args, tmp, charon_port, admin_port, backend_port, procs, skipped
                )
            if running is not None:
                targets.append(
                    Target("charon-stopped", running.port, running.proc, repin=True,
                           stop_root=True)
                )

        if "charon-noevents" in wanted_targets:
            quiet_port, quiet_admin = free_ports(2)
            t = start_charon(
                args, tmp, quiet_port, quiet_admin, backend_port, procs, skipped,
                name="charon-noevents", events=False,
            )
            if t:
                targets.append(t)

        bench = Bench(args, tmp)
        per_round = sum(1 for s in scenarios for t in targets if s.applies_to(t))
        total, n = per_round * args.rounds, 0
        rounds: list[list[Measurement]] = []
        for round_no in range(args.rounds):
            this_round: list[Measurement] = []
            for sc in scenarios:
                for target in targets:
                    if not sc.applies_to(target):
                        continue
                    n += 1
                    log(f"[{n}/{total}] {sc.name} -> {target.name}"
                        + (f" (round {round_no + 1})" if args.rounds > 1 else ""))
                    m = run_one(bench, sc, target, backend)
                    if m.load:
                        log(
                            f"    {m.load.rps:,.0f} req/s, p50 {_fmt_ms(m.load.p50_ms)}, "
                            f"p99 {_fmt_ms(m.load.p99_ms)}, errors {m.load.errors or 0}"
                            + (f", proxy CPU {m.proxy_cpu_s:.2f}s"
                               if m.proxy_cpu_s is not None else "")
                        )
                    else:
                        log(f"    FAILED: {m.failure}")
                    this_round.append(m)
                    time.sleep(1)  # let connections of the previous run wind down
            rounds.append(this_round)
        results = median_round(rounds)
        round_notes = rounds_summary(rounds) if args.rounds > 1 else []

        rows = table_rows(results)
        notes = bound_notes(results, scenarios, args) + round_notes
        warnings = contention_warnings([m for r in rounds for m in r])
        env = environment()
        print()
        print("  ".join(f"{k}: {v}" for k, v in env.items()))
        print()
        print(render_text(rows))
        print("\nBound by:")
        for note in notes:
            print(f"  {note}")
        for s in skipped:
            print(f"SKIPPED: {s}")
        for w in warnings:
            print(f"WARNING: {w}")
        md = Path(args.markdown)
        write_markdown(md, env, args, rows, notes, skipped, warnings, scenarios)
        log(f"wrote {md}")
        if args.json:
            write_json(Path(args.json), env, results, skipped, warnings)
            log(f"wrote {args.json}")
        return 0 if results and all(m.load for m in results) else 1
    finally:
        for proc in reversed(procs):
            try:
                proc.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {proc.name}: {e}")
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _read_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_charon(
    args,
    tmp: Path,
    port: int,
    admin_port: int,
    backend_port: int,
    procs: list[Managed],
    skipped: list[str],
    name: str = "charon",
    events: bool = True,
) -> Target | None:
    """Charon as a target; `events=False` ([admin] events = false) measures what publishing
    per-request events costs."""
    exe = Path(args.charon)
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        msg = f"Charon: {exe} not found (install the project into .venv); benching the others"
        log(msg)
        skipped.append(msg)
        return None
    cdir = tmp / name
    cdir.mkdir(mode=0o755)
    conf = cdir / "charon.toml"
    conf.write_text(charon_config(port, admin_port, backend_port, args.workers, events))
    charon = Managed(
        name,
        ["taskset", "-c", args.proxy_cpus, str(exe), "run", "--config", str(conf)],
        cdir / "charon.log",
        cwd=cdir,
    )
    procs.append(charon)
    why = wait_ready(charon, port, args.charon_timeout)
    if why:
        msg = f"Charon: {why}; benching the others"
        log(msg)
        tail = charon.log_tail()
        if tail:
            log("charon log (tail):\n" + tail)
        skipped.append(msg)
        charon.stop()
        procs.remove(charon)
        return None
    # Workers are children of the supervisor: give them time to come up, then pin every
    # process (and every thread) of the tree; repinned before each run in case of respawns.
    deadline = time.monotonic() + 5
    count = len(charon.refresh())
    while time.monotonic() < deadline and count < args.workers + 1:
        time.sleep(0.2)
        count = len(charon.refresh())
    time.sleep(0.5)
    pinned = charon.pin_all(args.proxy_cpus)
    log(
        f"charon pid {charon.pid} ({pinned} processes pinned) on 127.0.0.1:{port} "
        f"(CPUs {args.proxy_cpus})"
    )
    return Target(name, port, charon, repin=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(2)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
