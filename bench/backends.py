#!/usr/bin/env python3
"""Several backends per host (issue 13): Charon's CPU per request and per WebSocket handshake
with 4 targets (round_robin, least_conn) against 1 target, in the same run.

    .venv/bin/python bench/backends.py                      # 5 rounds x 6 s: about 5 minutes
    .venv/bin/python bench/backends.py --rounds 3 --duration 5 --scenarios http

Three Charons run side by side, each a supervisor + `--workers` workers pinned to
`--proxy-cpus`: `1 target` (`upstream = ...`), `4 round_robin` and `4 least_conn`
(`upstreams = [4 URLs]`). Each has two hosts: `web.test` in front of one nginx backend listening
on 4 ports (GET /small, 13 B), and `127.0.0.1` in front of 4 `wsload server` processes (the
WebSocket echo backend of bench/ws). The load (wrk; `wsload handshake`) and the backends share
`--load-cpus`. Scenarios:
  http       wrk -t1 -c50 keep-alive GET /small with Host: web.test  -> proxy CPU per request
  handshake  wsload handshake, 50 concurrent connect/upgrade/close loops (the front door's
             fast path: the engine dials the planned target)  -> proxy CPU per handshake
Rounds interleave the three Charons, so each round's ratio to `1 target` is paired; the table
shows each one's median round and the notes every round. CPU = utime + stime of the
supervisor and all its workers over the measured window (bench/README.md, "Columns").
The issue asks for at most +5% CPU per request with 4 targets.

Standard library only (plus bench/run.py and bench/ws/run.py, imported for their helpers).
Everything it starts is stopped by PID; the temp dir is removed unless --keep-tmp.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import importlib.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TARGETS = 4


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


httpbench = _load("charon_httpbench", BENCH_DIR / "run.py")
wsbench = _load("charon_wsbench", BENCH_DIR / "ws" / "run.py")
Managed = wsbench.Managed
BenchError = wsbench.BenchError


def log(msg: str) -> None:
    print(f"[backends-bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Variant:
    name: str  # "1 target", "4 round_robin", "4 least_conn"
    policy: str | None  # None: one target, `upstream =`
    port: int = 0
    proc: object = None  # Managed


@dataclass
class Run:
    scenario: str
    variant: str
    ops: int = 0
    rate: float = 0.0
    cpu_s: float | None = None
    others: float = 0.0
    errors: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def us_per_op(self) -> float | None:
        return None if self.cpu_s is None or self.ops <= 0 else self.cpu_s / self.ops * 1e6


# -- processes -------------------------------------------------------------------------------


def nginx_backend(tmp: Path, ports: list[int], cpus: str) -> object:
    prefix = tmp / "nginx-backend"
    prefix.mkdir(mode=0o755)
    listens = "".join(f"        listen 127.0.0.1:{p} backlog=4096;\n" for p in ports)
    body = (
        "    server {\n" + listens
        + '        location = /small { default_type text/plain; return 200 "hello, world\\n"; }\n'
        "    }\n"
    )
    conf = prefix / "nginx.conf"
    conf.write_text(httpbench.NGINX_MAIN.format(workers=1, prefix=prefix, body=body))
    nginx = httpbench.find_exe("nginx")
    if nginx is None:
        raise BenchError("nginx not found (apt-get install nginx-light, or run bench/run.sh once)")
    argv = ["taskset", "-c", cpus, nginx, "-p", str(prefix), "-c", str(conf),
            "-e", str(prefix / "error.log")]
    return Managed("nginx-backend", argv, prefix / "stdout.log")


def charon_toml(v: Variant, admin_port: int, workers: int, http_ports: list[int],
                ws_ports: list[int]) -> str:
    def backends(ports: list[int]) -> str:
        if v.policy is None:
            return f'upstream = "http://127.0.0.1:{ports[0]}"\n'
        urls = ", ".join(f'"http://127.0.0.1:{p}"' for p in ports)
        return f'upstreams = [{urls}]\nlb_policy = "{v.policy}"\n'

    return (
        f'[server]\nlisten = ["127.0.0.1:{v.port}"]\nworkers = {workers}\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        '[[hosts]]\ndomains = ["web.test"]\n' + backends(http_ports)
        + '[[hosts]]\ndomains = ["127.0.0.1"]\n' + backends(ws_ports)
    )


def wait_http(proc: object, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():  # type: ignore[attr-defined]
            raise BenchError(f"exited:\n{proc.log_tail()}")  # type: ignore[attr-defined]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/small", headers={"Host": "web.test"})
            resp = conn.getresponse()
            if resp.status == 200 and resp.read() == httpbench.SMALL_BODY:
                return
            last = f"answered {resp.status}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.2)
    raise BenchError(f"no GET /small within {timeout:.0f}s ({last})")


# -- measuring -------------------------------------------------------------------------------


def measure_http(args: argparse.Namespace, v: Variant, tmp: Path, ours: list) -> Run:  # type: ignore[type-arg]
    run = Run("http", v.name)
    proxy = v.proc
    proxy.pin_all(args.proxy_cpus)  # type: ignore[attr-defined]
    pids = proxy.pids()  # type: ignore[attr-defined]
    wrk = httpbench.find_exe("wrk") or "wrk"

    def wrk_argv(seconds: float) -> list[str]:
        return ["taskset", "-c", args.load_cpus, wrk, "--latency", "-t", "1", "-c", "50",
                "-d", f"{max(1, round(seconds))}s", "--timeout", "5s",
                "-H", "Host: web.test", f"http://127.0.0.1:{v.port}/small"]

    if args.warmup > 0:
        subprocess.run(wrk_argv(args.warmup), capture_output=True, timeout=args.warmup + 60,
                       check=False)
    before, cpus0, t0 = wsbench.all_ticks(), wsbench.cpu_busy_ticks(), time.monotonic()
    cpu0 = proxy.cpu_seconds(pids)  # type: ignore[attr-defined]
    out = subprocess.run(wrk_argv(args.duration), capture_output=True, text=True,
                         timeout=args.duration + 60, check=False)
    cpu1 = proxy.cpu_seconds(pids)  # type: ignore[attr-defined]
    after, cpus1, t1 = wsbench.all_ticks(), wsbench.cpu_busy_ticks(), time.monotonic()
    mine = {os.getpid(), *pids}
    for m in ours:
        mine.update(m.pids())
    run.others, _, top = wsbench.others_use(before, after, cpus0, cpus1, mine, t1 - t0)
    if out.returncode != 0:
        run.errors = f"wrk exited {out.returncode}: {out.stderr.strip()[:200]}"
        return run
    load = httpbench.parse_wrk(out.stdout)
    run.ops, run.rate = load.requests, load.rps
    run.errors = ", ".join(f"{k} {n}" for k, n in load.errors.items())
    if set(proxy.pids()) != set(pids):  # type: ignore[attr-defined]
        run.notes.append("Charon's processes changed during the run: CPU dropped")
    else:
        run.cpu_s = cpu1 - cpu0
    if run.others >= args.noisy:
        run.notes.append(f"others used {run.others:.2f} cores ({top})")
    return run


def measure_handshake(args: argparse.Namespace, v: Variant, runner: object) -> Run:
    sc = wsbench.build_scenarios(runner.args)["handshake"]  # type: ignore[attr-defined]
    target = wsbench.Target(v.name, v.port, v.proc)
    res = runner.run(sc, target)  # type: ignore[attr-defined]
    run = Run("handshake", v.name, ops=res.ops, rate=res.rate or 0.0, cpu_s=res.proxy_cpu_s,
              others=res.others_cores, notes=list(res.notes))
    if res.errors or res.failure:
        run.errors = res.failure or res.error_detail
    if res.others_cores >= args.noisy:
        run.notes.append(f"others used {res.others_cores:.2f} cores ({res.others_top})")
    return run


# -- report ----------------------------------------------------------------------------------


def report(runs: list[Run], variants: list[Variant], scenarios: list[str]) -> list[str]:
    base = variants[0].name
    lines = ["| scenario | Charon | rate | proxy CPU µs/op (median round) | vs 1 target, "
             "per round | median | errors |", "|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for sc in scenarios:
        by_round: dict[str, list[Run]] = {v.name: [r for r in runs if r.scenario == sc
                                                   and r.variant == v.name] for v in variants}
        for v in variants:
            mine = by_round[v.name]
            figures = [r.us_per_op for r in mine if r.us_per_op is not None]
            if not figures:
                why = mine[0].errors if mine else ""
                lines.append(f"| {sc} | {v.name} | - | - | - | - | {why} |")
                continue
            med = statistics.median(figures)
            rate = statistics.median(r.rate for r in mine)
            ratios = [
                (a.us_per_op / b.us_per_op) if a.us_per_op and b.us_per_op else None
                for a, b in zip(mine, by_round[base], strict=False)
            ]
            good = [x for x in ratios if x is not None]
            per_round = ", ".join(f"{x:.2f}x" if x else "-" for x in ratios)
            unit = "req/s" if sc == "http" else "hs/s"
            errors = "; ".join(sorted({r.errors for r in mine if r.errors})) or "0"
            lines.append(
                f"| {sc} | {v.name} | {rate:,.0f} {unit} | {med:.1f} | "
                f"{per_round if v.name != base else '-'} | "
                f"{f'{statistics.median(good):.3f}x' if good and v.name != base else '-'} | "
                f"{errors} |"
            )
            notes.append(f"{sc}, {v.name}: µs/op per round "
                         + ", ".join(f"{x:.1f}" for x in figures))
            for r in mine:
                notes.extend(f"{sc}, {v.name}: {n}" for n in r.notes)
    return lines + [""] + [f"- {n}" for n in notes]


# -- main ------------------------------------------------------------------------------------


ALL_VARIANTS = [Variant("1 target", None), Variant("4 round_robin", "round_robin"),
                Variant("4 least_conn", "least_conn")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scenarios", default="http,handshake")
    p.add_argument("--variants", default="1,round_robin,least_conn",
                   help="1 (one target) and the policies to run with 4 targets")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--proxy-cpus", default="1")
    p.add_argument("--load-cpus", default="0")
    p.add_argument("--quiet-threshold", type=float, default=0.10)
    p.add_argument("--quiet-wait", type=float, default=30.0)
    p.add_argument("--noisy", type=float, default=0.20,
                   help="a run during which other processes used this many cores is noted")
    p.add_argument("--markdown", default=str(BENCH_DIR / "out" / "backends.md"))
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args(argv)
    unknown = set(args.scenarios.split(",")) - {"http", "handshake"}
    if unknown or args.rounds < 1 or args.duration <= 0:
        p.error(f"bad --scenarios {sorted(unknown)} / --rounds / --duration")
    return args


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    scenarios = args.scenarios.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="charon-backends-bench-"))
    tmp.chmod(0o755)  # nginx workers may run as another user
    started: list = []  # type: ignore[type-arg]
    runs: list[Run] = []
    variants = [v for v in ALL_VARIANTS if v.policy or "1" in args.variants.split(",")]
    variants = [v for v in variants if v.policy is None or v.policy in args.variants.split(",")]
    code = 0
    try:
        wsbench.build_wsload()
        ports = wsbench.free_ports(2 * TARGETS + 2 * len(variants))
        http_ports, ws_ports = ports[:TARGETS], ports[TARGETS:2 * TARGETS]
        nginx = nginx_backend(tmp, http_ports, args.load_cpus)
        started.append(nginx)
        for port in http_ports:
            wait_http(nginx, port, 10)
        for i, port in enumerate(ws_ports):
            server = Managed(f"wsload-server-{i}", ["taskset", "-c", args.load_cpus,
                             str(wsbench.WSLOAD), "server", "--port", str(port)],
                             tmp / f"wsload-server-{i}.log")
            started.append(server)
            wsbench.wait_ws_ready(server, port, 10)
        for i, v in enumerate(variants):
            v.port, admin = ports[2 * TARGETS + 2 * i:2 * TARGETS + 2 * i + 2]
            cdir = tmp / v.name.replace(" ", "-")
            cdir.mkdir()
            conf = cdir / "charon.toml"
            conf.write_text(charon_toml(v, admin, args.workers, http_ports, ws_ports))
            v.proc = Managed(v.name, ["taskset", "-c", args.proxy_cpus, sys.executable, "-m",
                                      "charon", "run", "--config", str(conf)],
                             cdir / "charon.log", cwd=REPO)
            started.append(v.proc)
            wait_http(v.proc, v.port, 20)
            wsbench.wait_ws_ready(v.proc, v.port, 10)
            log(f"{v.name}: charon pid {v.proc.pid} on 127.0.0.1:{v.port}, "  # type: ignore[attr-defined]
                f"pinned {v.proc.pin_all(args.proxy_cpus)} processes")  # type: ignore[attr-defined]
        ws_args = wsbench.parse_args(["--duration", str(args.duration), "--warmup",
                                      str(args.warmup), "--proxy-cpus", args.proxy_cpus,
                                      "--load-cpus", args.load_cpus])
        runner = wsbench.Runner(ws_args, tmp, started)
        for rnd in range(args.rounds):
            for sc in scenarios:
                for v in variants:
                    log(f"round {rnd + 1}/{args.rounds}: {sc} -> {v.name}")
                    wsbench.wait_quiet(started, args.quiet_threshold, args.quiet_wait)
                    run = (measure_http(args, v, tmp, started) if sc == "http"
                           else measure_handshake(args, v, runner))
                    log(f"  {run.rate:,.0f}/s, CPU/op "
                        + (f"{run.us_per_op:.1f} µs" if run.us_per_op else "-")
                        + f", others {run.others:.2f} cores"
                        + (f", errors: {run.errors}" if run.errors else ""))
                    runs.append(run)
                    time.sleep(1.0)
    except BenchError as e:
        log(f"error: {e}")
        code = 2
    except KeyboardInterrupt:
        log("interrupted")
        code = 130
    finally:
        for m in reversed(started):
            m.stop()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if runs:
        table = report(runs, variants, scenarios)
        print("\n".join(table))
        md = Path(args.markdown)
        md.parent.mkdir(parents=True, exist_ok=True)
        head = (f"# Several backends: 4 targets vs 1 ({datetime.datetime.now():%Y-%m-%d %H:%M}, "
                f"nproc {os.cpu_count()}, `python bench/backends.py "
                + " ".join(sys.argv[1:] if argv is None else argv) + "`)\n\n")
        md.write_text(head + "\n".join(table) + "\n")
        log(f"wrote {md}")
        if any(r.us_per_op is None for r in runs):
            code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
