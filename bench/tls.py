#!/usr/bin/env python3
"""TLS benchmark: Charon vs nginx, both terminating TLS with the same certificate (ECDSA P-256,
from tests/tlsca.py) and the same worker count, in front of the same backends.

    .venv/bin/python bench/tls.py [--duration 6] [--rounds 3] [--workers 1]
                                  [--scenarios https,wss-echo,hs-full,hs-resumed]
                                  [--targets nginx,charon]

Scenarios (the figure to read is the proxy's CPU per operation, as in bench/README.md):
  https       keep-alive HTTPS GET /small (13 B) with wrk -t1 -c50: CPU per request
  wss-echo    wss echo, 100 connections x 32 B, --inflight (4) messages in flight on each
              (bench/ws/wsload-tls): CPU per message
  hs-full     TLS handshakes, 50 concurrent loops of connect, full handshake, close_notify,
              the server's close (no HTTP): CPU per handshake
  hs-resumed  the same, every connection offering the session of the first (ticket): CPU per
              resumed handshake (the table shows how many were resumed)

The backends are the other benches': nginx serving /small for HTTP (bench/run.py) and `wsload
server` for WebSocket (bench/ws). The proxy under test is pinned to --proxy-cpus (every thread
of every process, again before each run); wrk/wsload and the backends to --load-cpus. A direct
row is left out: the backends speak no TLS, so there is nothing like-for-like to compare.
Everything is stopped by PID at the end; only 127.0.0.1 is used. Standard library plus
`cryptography` (for the certificate), so run it with the venv's Python.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))
from benchlib import BenchError, find_exe, free_ports  # noqa: E402
from tlsca import TestCA  # noqa: E402


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


wsb = _load("bench_ws_run", BENCH / "ws" / "run.py")  # Managed, tree, cpu_ticks, LoadRun
httpb = _load("bench_http_run", BENCH / "run.py")  # nginx backend config, parse_wrk
WSLOAD_TLS = BENCH / "ws" / "wsload-tls"
WS_NAME = "ws.bench.test"
SCENARIOS = ("https", "wss-echo", "hs-full", "hs-resumed")

NGINX_TLS = """\
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {ciphers};
    ssl_session_tickets on;
    ssl_session_timeout 1h;
    upstream http_backend {{
        server 127.0.0.1:{http_port};
        keepalive 64;
        keepalive_requests 10000000;
        keepalive_timeout 120s;
    }}
    server {{
        listen 127.0.0.1:{port} ssl default_server backlog=4096;
        location / {{
            proxy_pass http://http_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {ws_name};
        location / {{
            proxy_pass http://127.0.0.1:{ws_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $http_host;
            proxy_read_timeout 3600s;
        }}
    }}
"""


def log(msg: str) -> None:
    print(f"[tls-bench] {msg}", file=sys.stderr, flush=True)


def build_wsload_tls() -> None:
    src = BENCH / "ws" / "wsload.c"
    if WSLOAD_TLS.exists() and WSLOAD_TLS.stat().st_mtime >= src.stat().st_mtime:
        return
    log("building wsload-tls (gcc -O2 -DWSLOAD_TLS, -lssl -lcrypto)")
    r = subprocess.run(["make", "-C", str(BENCH / "ws"), "wsload-tls"], capture_output=True,
                       text=True, timeout=120, check=False)
    if r.returncode != 0:
        raise BenchError(f"building wsload-tls failed (libssl-dev?):\n{r.stdout}{r.stderr}")


def charon_config(ports: dict[str, int], cert: str, key: str, workers: int) -> str:
    files = f'{{ cert = "{cert}", key = "{key}" }}'
    return (
        f'[server]\nlisten = ["127.0.0.1:{ports["charon_plain"]}"]\n'
        f'tls_listen = ["127.0.0.1:{ports["charon"]}"]\nworkers = {workers}\n'
        f'[admin]\nlisten = "127.0.0.1:{ports["admin"]}"\n'
        f'[[hosts]]\ndomains = ["{WS_NAME}"]\nupstream = "http://127.0.0.1:{ports["ws"]}"\n'
        f"tls = {files}\n"
        # wrk sends the URL's host (127.0.0.1) as SNI, or none: the catch-all host takes it
        f'[[hosts]]\ndomains = ["*"]\nupstream = "http://127.0.0.1:{ports["http"]}"\n'
        f"tls = {files}\n"
    )


def https_ready(port: int) -> str | None:
    """None when GET /small over TLS answers 200 "hello, world", else why not."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                ctx.wrap_socket(raw) as s:
            s.sendall(b"GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        ok = data.startswith(b"HTTP/1.1 200") and data.endswith(httpb.SMALL_BODY)
        return None if ok else f"answered {data[:60]!r}"
    except (OSError, ssl.SSLError) as exc:
        return f"{type(exc).__name__}: {exc}"


@dataclass
class Result:
    scenario: str
    target: str
    round: int
    ops: float = 0.0
    seconds: float = 0.0
    cpu_s: float = 0.0
    p50_us: float | None = None
    p99_us: float | None = None
    errors: int = 0
    resumed: str = ""
    note: str = ""
    raw: dict = field(default_factory=dict)  # type: ignore[type-arg]

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def us_per_op(self) -> float | None:
        return self.cpu_s / self.ops * 1e6 if self.ops else None


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.procs: list = []  # type: ignore[type-arg]
        self.proxies: dict = {}  # type: ignore[type-arg]
        self.ports: dict[str, int] = {}

    def pinned(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", self.args.load_cpus, *argv]

    def start(self) -> None:
        a = self.args
        names = ["http", "ws", "nginx", "charon", "charon_plain", "admin"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        ca = TestCA(self.tmp / "ca")
        leaf = ca.issue(["bench.test", WS_NAME, "127.0.0.1"])
        docroot = self.tmp / "docroot"
        docroot.mkdir()
        (docroot / "64k").write_bytes(b"x" * 65536)
        backend = httpb.start_nginx("backend", self.tmp, 1, httpb.BACKEND_HTTP.format(
            port=self.ports["http"], docroot=docroot), a.load_cpus)
        self.procs.append(backend)
        ws_backend = wsb.Managed("wsload-server", ["taskset", "-c", a.load_cpus, str(
            BENCH / "ws" / "wsload"), "server", "--port", str(self.ports["ws"])],
            self.tmp / "wsload-server.log")
        self.procs.append(ws_backend)
        if "nginx" in a.targets:
            from charon.config.model import INTERMEDIATE_CIPHERS  # noqa: PLC0415

            body = NGINX_TLS.format(cert=leaf.cert_path, key=leaf.key_path,
                                    ciphers=INTERMEDIATE_CIPHERS, port=self.ports["nginx"],
                                    http_port=self.ports["http"], ws_port=self.ports["ws"],
                                    ws_name=WS_NAME)
            self.proxies["nginx"] = httpb.start_nginx("nginx", self.tmp, a.workers, body,
                                                      a.proxy_cpus)
        if "charon" in a.targets:
            cfg = self.tmp / "charon.toml"
            cfg.write_text(charon_config(self.ports, str(leaf.cert_path), str(leaf.key_path),
                                         a.workers))
            argv = ["taskset", "-c", a.proxy_cpus, sys.executable, "-m", "charon", "run",
                    "--config", str(cfg)]
            self.proxies["charon"] = wsb.Managed("charon", argv, self.tmp / "charon.log",
                                                 cwd=REPO)
        self.procs += list(self.proxies.values())
        for name, proc in self.proxies.items():
            deadline = time.monotonic() + a.charon_timeout
            why = "no answer"
            while time.monotonic() < deadline:
                if (why := https_ready(self.ports[name])) is None:
                    break
                time.sleep(0.3)
            else:
                raise BenchError(f"{name} not ready over TLS ({why}):\n{proc.log_tail()}")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()

    def cpu(self, target: str) -> float:
        proc = self.proxies[target]
        pids = wsb.tree(proc.pid)
        return sum(wsb.cpu_ticks(p) for p in pids) / wsb.CLK_TCK

    # -- scenarios ---------------------------------------------------------------------------

    def run(self, scenario: str, target: str, round_: int) -> Result:
        self.proxies[target].pin_all(self.args.proxy_cpus)
        result = Result(scenario, target, round_)
        if scenario == "https":
            self._wrk(result, self.args.warmup)  # warm-up: not counted
            self._wrk(result, self.args.duration)
        else:
            self._wsload(result)
        return result

    def _wrk(self, result: Result, seconds: float) -> None:
        if seconds <= 0:
            return
        wrk = find_exe("wrk") or "wrk"
        port = self.ports[result.target]
        argv = self.pinned([wrk, "--latency", "-t", "1", "-c", "50", "-d",
                            f"{max(1, round(seconds))}s", "--timeout", "5s",
                            f"https://127.0.0.1:{port}/small"])
        before = self.cpu(result.target)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                           check=False)
        after = self.cpu(result.target)
        if r.returncode != 0:
            raise RuntimeError(f"wrk exited {r.returncode}: {(r.stderr or r.stdout).strip()}")
        load = httpb.parse_wrk(r.stdout)
        result.ops, result.seconds, result.cpu_s = load.requests, load.duration_s, after - before
        result.p50_us = load.p50_ms * 1e3 if load.p50_ms is not None else None
        result.p99_us = load.p99_ms * 1e3 if load.p99_ms is not None else None
        result.errors = sum(load.errors.values())

    def _wsload(self, result: Result) -> None:
        a = self.args
        url = f"wss://127.0.0.1:{self.ports[result.target]}/"
        common = ["--url", url, "--host", WS_NAME, "--duration", str(a.duration),
                  "--warmup", str(a.warmup)]
        if result.scenario == "wss-echo":
            mode = ["echo", "--conns", "100", "--size", "32", "--inflight", str(a.inflight)]
        else:
            mode = ["tls", "--conns", "50", "--resume",
                    "1" if result.scenario == "hs-resumed" else "0"]
        run = wsb.LoadRun(self.pinned([str(WSLOAD_TLS), *mode, *common]),
                          a.duration + a.warmup + 60,
                          self.tmp / f"wsload-{result.scenario}-{result.target}.err")
        cpu_start = cpu_end = None
        final: dict = {}  # type: ignore[type-arg]
        try:
            while (line := run.next_line()) is not None:
                if line.get("event") == "window_start":
                    cpu_start = self.cpu(result.target)
                elif line.get("event") == "window_end":
                    cpu_end = self.cpu(result.target)
                elif "mode" in line:
                    final = line
        finally:
            err = run.finish()
        if cpu_start is None or cpu_end is None or not final:
            raise RuntimeError(f"wsload-tls gave no result: {err.strip()[-500:]}")
        result.raw = final
        result.ops = float(final.get("messages", final.get("handshakes", 0)))
        result.seconds, result.cpu_s = float(final["duration_s"]), cpu_end - cpu_start
        result.p50_us, result.p99_us = final.get("p50_us"), final.get("p99_us")
        result.errors = int(final.get("errors_total", 0))
        if result.scenario.startswith("hs-"):
            done, resumed = final.get("tls_handshakes", 0), final.get("tls_resumed", 0)
            result.resumed = f"{resumed}/{done}"
        if final.get("first_error"):
            result.note = str(final["first_error"])


# -- report ----------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def report(results: list[Result], args: argparse.Namespace) -> str:
    unit = {"https": "req/s", "wss-echo": "msg/s", "hs-full": "hs/s", "hs-resumed": "hs/s"}
    lines = ["| scenario | target | rate | p50 us | p99 us | proxy CPU us/op | CPU/op vs nginx "
             "| rate vs nginx | resumed | errors |", "|" + "---|" * 10]
    notes: list[str] = []
    for sc in args.scenarios:
        per_target: dict[str, list[Result]] = {}
        for r in results:
            if r.scenario == sc:
                per_target.setdefault(r.target, []).append(r)
        medians: dict[str, Result] = {}
        for target, rs in per_target.items():
            ranked = sorted(rs, key=lambda r: r.us_per_op or 0.0)
            medians[target] = ranked[(len(ranked) - 1) // 2]
        ngx = medians.get("nginx")
        for target in args.targets:
            m = medians.get(target)
            if m is None:
                continue
            cpu_ratio = (f"{m.us_per_op / ngx.us_per_op:.2f}x" if ngx and ngx.us_per_op
                         and m.us_per_op else "-")
            rate_ratio = f"{m.rate / ngx.rate:.2f}x" if ngx and ngx.rate else "-"
            lines.append(f"| {sc} | {target} | {fmt(m.rate, 0)} {unit[sc]} | {fmt(m.p50_us, 0)} "
                         f"| {fmt(m.p99_us, 0)} | {fmt(m.us_per_op)} | {cpu_ratio} | {rate_ratio} "
                         f"| {m.resumed or '-'} | {m.errors}{' (' + m.note + ')' if m.note else ''}"
                         " |")
        if "nginx" in per_target and "charon" in per_target and args.rounds > 1:
            pairs = zip(sorted(per_target["nginx"], key=lambda r: r.round),
                        sorted(per_target["charon"], key=lambda r: r.round), strict=False)
            ratios = [c.us_per_op / n.us_per_op for n, c in pairs if n.us_per_op and c.us_per_op]
            if ratios:
                notes.append(f"{sc}: Charon's CPU/op vs nginx per round "
                             + ", ".join(f"{x:.2f}x" for x in ratios)
                             + f" (median {statistics.median(ratios):.2f}x)")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the measurement")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds (median shown)")
    p.add_argument("--workers", type=int, default=1, help="proxy workers (both proxies)")
    p.add_argument("--inflight", type=int, default=4, help="wss-echo: messages in flight each")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--targets", default="nginx,charon")
    p.add_argument("--proxy-cpus", default="1")
    p.add_argument("--load-cpus", default="0")
    p.add_argument("--charon-timeout", type=float, default=20.0)
    p.add_argument("--markdown", default=str(BENCH / "out" / "tls.md"))
    p.add_argument("--json", default="")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.targets = [t for t in args.targets.split(",") if t]
    if bad := set(args.scenarios) - set(SCENARIOS):
        p.error(f"unknown scenarios: {sorted(bad)}")
    if bad := set(args.targets) - {"nginx", "charon"}:
        p.error(f"unknown targets: {sorted(bad)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("nginx", "wrk", "taskset", "make"):
        if find_exe(tool) is None:
            log(f"{tool} is missing")
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="charon-tls-bench-"))
    tmp.chmod(0o755)  # nginx workers run as an unprivileged user when we are root
    bench = Bench(args, tmp)
    results: list[Result] = []
    failed = 0
    try:
        build_wsload_tls()
        wsb.build_wsload()
        bench.start()
        for round_ in range(1, args.rounds + 1):
            for sc in args.scenarios:
                for target in args.targets:
                    log(f"round {round_}: {sc} via {target}")
                    try:
                        r = bench.run(sc, target, round_)
                    except RuntimeError as exc:
                        failed += 1
                        log(f"  failed: {exc}")
                        continue
                    results.append(r)
                    log(f"  {r.rate:,.0f}/s, {fmt(r.us_per_op)} us CPU/op, errors {r.errors}"
                        + (f", resumed {r.resumed}" if r.resumed else ""))
    except BenchError as exc:
        log(f"setup failed: {exc}")
        return 2
    finally:
        bench.stop()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    table = report(results, args)
    print(table)
    md = Path(args.markdown)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(f"# TLS benchmark\n\n`bench/tls.py {' '.join(sys.argv[1:])}`\n\n{table}\n")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
