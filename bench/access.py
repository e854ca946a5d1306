#!/usr/bin/env python3
"""Who may come in (issue 14): Charon's CPU per request and per WebSocket handshake for a host
with an allow list, basic auth and a rate limit against a bare host, in the same run.

    .venv/bin/python bench/access.py                       # 5 rounds x 6 s: about 5 minutes
    .venv/bin/python bench/access.py --rounds 3 --duration 5 --scenarios http
    .venv/bin/python bench/access.py --rounds 1 --duration 2  # does it run?

Charons run side by side, each a supervisor + `--workers` workers pinned to `--proxy-cpus`:
  bare     two hosts with an upstream only
  guarded  the same hosts with `allow = ["127.0.0.0/8"]`, `basic_auth` (one bcrypt user) and
           `rate_limit = { requests = 1000000, per = "1s" }` (never hit, taken every request)
  acl      the allow list alone (where the guarded cost goes)
Every request of every Charon carries the same `Authorization: Basic` field, so after the
first one the guarded Charon finds the verified credential in its cache. Each Charon has a host
`web.test` in front of nginx (GET /small, 13 B) and a host `127.0.0.1` in front of a
`wsload server`; the load (wrk; `wsload handshake --header`) and the backends share
`--load-cpus`. Scenarios:
  http       wrk -t1 -c50 keep-alive GET /small, Host: web.test  -> proxy CPU per request
  handshake  wsload handshake, 50 concurrent connect/upgrade/close loops -> CPU per handshake
Rounds interleave the Charons, so each round's ratio to `bare` is paired; the table shows each
one's median round, the per-round ratios and their median. The issue's bound: +10% at most.

A Charon whose config `charon check` refuses (the issue 14 keys not merged yet) is skipped with
the reason; a guarded Charon that answers 200 to a request without credentials is measured but
flagged (its rules are not enforced). Standard library only (plus bench/backends.py,
bench/run.py and bench/ws/run.py for their helpers). Everything it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import importlib.util
import os
import resource
import shutil
import signal
import socket
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

# bcrypt (cost 10) of PASSWORD, made once with crypt(3) (libxcrypt): the script stays stdlib only
USER, PASSWORD = "bench", "bench-secret"
BCRYPT_HASH = "$2b$10$7IO.mEMZelx9SvpZPeX/POY0px2W61VaJal0pMV2iRFNGHi5ywdfi"
AUTHORIZATION = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


backends = _load("charon_backends_bench", BENCH_DIR / "backends.py")
httpbench, wsbench = backends.httpbench, backends.wsbench
Managed, BenchError = wsbench.Managed, wsbench.BenchError


def log(msg: str) -> None:
    print(f"[access-bench] {msg}", file=sys.stderr, flush=True)


@dataclass
class Variant:
    name: str
    rules: str  # TOML lines added to each [[hosts]] table
    port: int = 0
    proc: object = None  # Managed
    skipped: str = ""  # why it was not measured
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:  # backends.Run's fields (measure_handshake makes those)
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


ALLOW = 'allow = ["127.0.0.0/8"]\n'
GUARDED = (
    ALLOW
    + f'basic_auth = {{ realm = "bench", users = {{ {USER} = "{BCRYPT_HASH}" }} }}\n'
    + 'rate_limit = { requests = 1000000, per = "1s" }\n'
)
ALL_VARIANTS = {"bare": "", "guarded": GUARDED, "acl": ALLOW}


def charon_toml(v: Variant, admin_port: int, workers: int, http_port: int, ws_port: int) -> str:
    return (
        f'[server]\nlisten = ["127.0.0.1:{v.port}"]\nworkers = {workers}\n'
        f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
        f'[[hosts]]\ndomains = ["web.test"]\nupstream = "http://127.0.0.1:{http_port}"\n'
        + v.rules
        + f'[[hosts]]\ndomains = ["127.0.0.1"]\nupstream = "http://127.0.0.1:{ws_port}"\n'
        + v.rules
    )


def get_small(port: int, auth: bool) -> tuple[int, bytes]:
    headers = {"Host": "web.test", **({"Authorization": AUTHORIZATION} if auth else {})}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/small", headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(v: Variant, timeout: float) -> None:
    """GET /small with the credentials answers 200 with nginx's body."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not v.proc.alive():  # type: ignore[attr-defined]
            raise BenchError(f"{v.name} exited:\n{v.proc.log_tail()}")  # type: ignore[attr-defined]
        try:
            status, body = get_small(v.port, auth=True)
            if status == 200 and body == httpbench.SMALL_BODY:
                return
            last = f"answered {status}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.2)
    raise BenchError(f"{v.name}: no GET /small within {timeout:.0f}s ({last})")


def ws_status(port: int, auth: bool, timeout: float = 5.0) -> str:
    """The status line of a WebSocket upgrade to 127.0.0.1:PORT (with or without credentials)."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            + (f"Authorization: {AUTHORIZATION}\r\n" if auth else "") + "\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode())
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0].decode(errors="replace")


def check_rules(v: Variant) -> None:
    """Say whether the rules are in force: without credentials a guarded host must answer 401."""
    hs = ws_status(v.port, auth=True)
    if " 101 " not in hs + " ":
        raise BenchError(f"{v.name}: a WebSocket upgrade with credentials got {hs!r}")
    if "basic_auth" not in v.rules:
        return
    status, _ = get_small(v.port, auth=False)
    hs = ws_status(v.port, auth=False)
    if status == 401 and " 401 " in hs + " ":
        v.notes.append("rules in force: 401 without credentials (GET and upgrade)")
    else:
        v.notes.append(f"RULES NOT IN FORCE: without credentials GET got {status}, "
                       f"the upgrade {hs!r}; this Charon measured a bare host")
        log(f"WARNING {v.name}: {v.notes[-1]}")


def config_refused(conf: Path) -> str:
    """`charon check`'s complaint about conf, or "" when it accepts it."""
    r = subprocess.run([sys.executable, "-m", "charon", "check", str(conf)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, check=False)
    if r.returncode == 0:
        return ""
    why = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-1]
    return why.replace(str(conf), conf.name)


# -- measuring -------------------------------------------------------------------------------


def measure_http(args: argparse.Namespace, v: Variant, ours: list) -> Run:  # type: ignore[type-arg]
    run = Run("http", v.name)
    proxy = v.proc
    proxy.pin_all(args.proxy_cpus)  # type: ignore[attr-defined]
    pids = proxy.pids()  # type: ignore[attr-defined]
    wrk = httpbench.find_exe("wrk") or "wrk"

    def wrk_argv(seconds: float) -> list[str]:
        return ["taskset", "-c", args.load_cpus, wrk, "--latency", "-t", "1", "-c", "50",
                "-d", f"{max(1, round(seconds))}s", "--timeout", "5s", "-H", "Host: web.test",
                "-H", f"Authorization: {AUTHORIZATION}", f"http://127.0.0.1:{v.port}/small"]

    if args.warmup > 0:
        subprocess.run(wrk_argv(args.warmup), capture_output=True, timeout=args.warmup + 60,
                       check=False)
    before, cpus0, t0 = wsbench.all_ticks(), wsbench.cpu_busy_ticks(), time.monotonic()
    cpu0 = proxy.cpu_seconds(pids)  # type: ignore[attr-defined]
    wrk0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(wrk_argv(args.duration), capture_output=True, text=True,
                         timeout=args.duration + 60, check=False)
    wrk1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = proxy.cpu_seconds(pids)  # type: ignore[attr-defined]
    after, cpus1, t1 = wsbench.all_ticks(), wsbench.cpu_busy_ticks(), time.monotonic()
    mine = {os.getpid(), *pids}
    for m in ours:
        mine.update(m.pids())
    run.others, _, top = wsbench.others_use(before, after, cpus0, cpus1, mine, t1 - t0)
    # wrk started inside the window, so others_use counts it as someone else's short-lived
    # process: take its own CPU (and taskset's) back out
    wrk_s = (wrk1.ru_utime - wrk0.ru_utime) + (wrk1.ru_stime - wrk0.ru_stime)
    run.others = max(0.0, run.others - wrk_s / (t1 - t0))
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


class HeaderRunner(wsbench.Runner):  # type: ignore[misc,name-defined]
    """bench/ws/run.py's runner, whose wsload runs also send the credentials."""

    def pinned(self, argv: list[str]) -> list[str]:
        return super().pinned([*argv, "--header", f"Authorization: {AUTHORIZATION}"])


# -- report ----------------------------------------------------------------------------------


def report(runs: list[Run], variants: list[Variant], scenarios: list[str]) -> list[str]:
    base = variants[0].name
    lines = ["| scenario | Charon | rate | proxy CPU µs/op (median round) | vs bare, per round "
             "| median | errors |", "|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for sc in scenarios:
        by_round = {v.name: [r for r in runs if r.scenario == sc and r.variant == v.name]
                    for v in variants}
        for v in variants:
            if v.skipped:
                lines.append(f"| {sc} | {v.name} | - | - | - | - | SKIPPED: {v.skipped} |")
                continue
            mine = by_round[v.name]
            figures = [r.us_per_op for r in mine if r.us_per_op is not None]
            if not figures:
                why = "; ".join(sorted({r.errors for r in mine if r.errors})) or "no figures"
                lines.append(f"| {sc} | {v.name} | - | - | - | - | {why} |")
                continue
            ratios = [(a.us_per_op / b.us_per_op) if a.us_per_op and b.us_per_op else None
                      for a, b in zip(mine, by_round[base], strict=False)]
            good = [x for x in ratios if x is not None]
            paired = v.name != base and bool(good)
            unit = "req/s" if sc == "http" else "hs/s"
            errors = "; ".join(sorted({r.errors for r in mine if r.errors})) or "0"
            lines.append(
                f"| {sc} | {v.name} | {statistics.median(r.rate for r in mine):,.0f} {unit} | "
                f"{statistics.median(figures):.1f} | "
                + (", ".join(f"{x:.2f}x" if x else "-" for x in ratios) if paired else "-")
                + f" | {f'**{statistics.median(good):.3f}x**' if paired else '-'} | {errors} |"
            )
            notes.append(f"{sc}, {v.name}: µs/op per round "
                         + ", ".join(f"{x:.1f}" for x in figures))
            for r in mine:
                notes.extend(f"{sc}, {v.name}: {n}" for n in r.notes)
    for v in variants:
        notes.extend(f"{v.name}: {n}" for n in v.notes)
    return lines + [""] + [f"- {n}" for n in notes]


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--scenarios", default="http,handshake")
    p.add_argument("--variants", default="bare,guarded,acl", help="bare is always run, first")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--proxy-cpus", default="1")
    p.add_argument("--load-cpus", default="0")
    p.add_argument("--quiet-threshold", type=float, default=0.10)
    p.add_argument("--quiet-wait", type=float, default=30.0)
    p.add_argument("--noisy", type=float, default=0.20,
                   help="a run during which other processes used this many cores is noted")
    p.add_argument("--markdown", default=str(BENCH_DIR / "out" / "access.md"))
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args(argv)
    bad = set(args.scenarios.split(",")) - {"http", "handshake"}
    bad |= set(args.variants.split(",")) - set(ALL_VARIANTS)
    if bad or args.rounds < 1 or args.duration <= 0:
        p.error(f"bad --scenarios / --variants {sorted(bad)} / --rounds / --duration")
    return args


def _stop(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def start(args: argparse.Namespace, v: Variant, tmp: Path, admin: int, http_port: int,
          ws_port: int) -> None:
    cdir = tmp / v.name
    cdir.mkdir()
    conf = cdir / "charon.toml"
    conf.write_text(charon_toml(v, admin, args.workers, http_port, ws_port))
    v.skipped = config_refused(conf)
    if v.skipped:
        log(f"{v.name}: SKIPPED, charon check refuses its config: {v.skipped}")
        return
    v.proc = Managed(v.name, ["taskset", "-c", args.proxy_cpus, sys.executable, "-m", "charon",
                              "run", "--config", str(conf)], cdir / "charon.log", cwd=REPO)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGHUP, _stop)
    scenarios = args.scenarios.split(",")
    names = ["bare"] + [n for n in dict.fromkeys(args.variants.split(",")) if n != "bare"]
    variants = [Variant(n, ALL_VARIANTS[n]) for n in names]
    tmp = Path(tempfile.mkdtemp(prefix="charon-access-bench-"))
    tmp.chmod(0o755)  # nginx workers may run as another user
    started: list = []  # type: ignore[type-arg]
    runs: list[Run] = []
    code = 0
    try:
        wsbench.build_wsload()
        ports = wsbench.free_ports(2 + 2 * len(variants))
        http_port, ws_port = ports[0], ports[1]
        nginx = backends.nginx_backend(tmp, [http_port], args.load_cpus)
        started.append(nginx)
        backends.wait_http(nginx, http_port, 10)
        server = Managed("wsload-server", ["taskset", "-c", args.load_cpus,
                                           str(wsbench.WSLOAD), "server", "--port", str(ws_port)],
                         tmp / "wsload-server.log")
        started.append(server)
        wsbench.wait_ws_ready(server, ws_port, 10)
        for i, v in enumerate(variants):
            v.port, admin = ports[2 + 2 * i:4 + 2 * i]
            start(args, v, tmp, admin, http_port, ws_port)
            if v.proc is None:
                continue
            started.append(v.proc)
            wait_ready(v, 20)
            check_rules(v)
            log(f"{v.name}: charon pid {v.proc.pid} on 127.0.0.1:{v.port}, "  # type: ignore[attr-defined]
                f"pinned {v.proc.pin_all(args.proxy_cpus)} processes")  # type: ignore[attr-defined]
        if variants[0].skipped:
            raise BenchError(f"the bare config is refused: {variants[0].skipped}")
        ws_args = wsbench.parse_args(["--duration", str(args.duration), "--warmup",
                                      str(args.warmup), "--proxy-cpus", args.proxy_cpus,
                                      "--load-cpus", args.load_cpus])
        runner = HeaderRunner(ws_args, tmp, started)
        live = [v for v in variants if not v.skipped]
        for rnd in range(args.rounds):
            for sc in scenarios:
                for v in live:
                    log(f"round {rnd + 1}/{args.rounds}: {sc} -> {v.name}")
                    wsbench.wait_quiet(started, args.quiet_threshold, args.quiet_wait)
                    run = (measure_http(args, v, started) if sc == "http"
                           else backends.measure_handshake(args, v, runner))
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
        head = (f"# Access rules: guarded host vs bare ({datetime.datetime.now():%Y-%m-%d %H:%M}, "
                f"nproc {os.cpu_count()}, `python bench/access.py "
                + " ".join(sys.argv[1:] if argv is None else argv) + "`)\n\n")
        md.write_text(head + "\n".join(table) + "\n")
        log(f"wrote {md}")
        if any(r.us_per_op is None for r in runs):
            code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
