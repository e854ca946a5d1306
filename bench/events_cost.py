"""What publishing events costs per request, in instructions (callgrind), not in seconds.

    .venv/bin/python bench/events_cost.py [--seconds 20] [--conns 10] [--path /small]

The CPU time per request of bench/run.py (`charon` against `charon-noevents`) moves by 10-30%
from one 6 s run to the next on a shared 2-core VM, more than the cost being measured. Counted
instructions do not move with the machine: this script runs the same Charon config twice under
`valgrind --tool=callgrind` (supervisor and worker: --trace-children), once with `[admin]
events = true` and once with `events = false`, zeroes the counters of both processes once the
worker serves, sends keep-alive `GET`s with wrk for `--seconds`, dumps the counters, and divides
each process's instructions by the requests wrk completed.

It counts user-space instructions only: the kernel's work (the same sockets and system calls
either way, plus one ZeroMQ send per batch of up to 512 events) is not in the figure, so the
percentage is of the user-space cost per request. Needs valgrind, nginx and wrk (Debian).
Everything listens on 127.0.0.1 and is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as http_bench  # noqa: E402 - bench/run.py, the HTTP driver
from benchlib import BenchError, find_exe, free_ports  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def callgrind_totals(out_dir: Path, pid: int) -> int:
    """Instructions of the last dump of process `pid` (callgrind.out.PID.N, highest N)."""
    dumps = sorted(
        out_dir.glob(f"callgrind.out.{pid}.*"), key=lambda p: int(p.name.rsplit(".", 1)[1])
    )
    if not dumps:
        raise BenchError(f"no callgrind dump for pid {pid} in {out_dir}")
    for line in dumps[-1].read_text(errors="replace").splitlines():
        m = re.match(r"(?:totals|summary):\s+(\d+)", line)
        if m:
            return int(m.group(1))
    raise BenchError(f"no totals line in {dumps[-1]}")


def measure(args: argparse.Namespace, tmp: Path, backend_port: int, events: bool) -> dict:
    name = "events" if events else "noevents"
    port, admin_port = free_ports(2)
    cdir = tmp / name
    cdir.mkdir()
    conf = cdir / "charon.toml"
    conf.write_text(
        http_bench.charon_config(port, admin_port, backend_port, 1, events)
        # Python under valgrind runs ~50x slower: the heartbeat must not kill the worker.
        .replace("[server]\n", "[server]\nheartbeat_timeout = 600\n", 1)
    )
    argv = [
        "taskset", "-c", args.proxy_cpus,
        "valgrind", "--tool=callgrind", "--trace-children=yes",
        f"--callgrind-out-file={cdir}/callgrind.out.%p",
        sys.executable, "-m", "charon", "run", "--config", str(conf),
    ]  # fmt: skip
    charon = http_bench.Managed(f"charon-{name}", argv, cdir / "charon.log", cwd=REPO)
    try:
        why = http_bench.wait_ready(charon, port, args.start_timeout)
        if why:
            raise BenchError(f"Charon ({name}) under valgrind: {why}\n{charon.log_tail()}")
        pids = [st.pid for st in charon.refresh()]
        warm = subprocess.run(
            ["taskset", "-c", args.load_cpus, "wrk", "-t1", "-c", str(args.conns), "-d", "3s",
             f"http://127.0.0.1:{port}{args.path}"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if warm.returncode != 0:
            raise BenchError(f"wrk warm-up failed: {warm.stderr}")
        subprocess.run(["callgrind_control", "-z", *map(str, pids)], capture_output=True,
                       timeout=120, check=True)  # fmt: skip
        load = subprocess.run(
            ["taskset", "-c", args.load_cpus, "wrk", "-t1", "-c", str(args.conns), "-d",
             f"{args.seconds}s", "--timeout", "10s", f"http://127.0.0.1:{port}{args.path}"],
            capture_output=True, text=True, timeout=args.seconds + 60, check=False,
        )  # fmt: skip
        # The worker may finish the last requests after wrk stopped counting: wait for them.
        time.sleep(2)
        subprocess.run(["callgrind_control", "-d", *map(str, pids)], capture_output=True,
                       timeout=120, check=True)  # fmt: skip
        time.sleep(1)
        result = http_bench.parse_wrk(load.stdout)
        requests = result.requests
        errors = sum(result.errors.values())
        if not requests:
            raise BenchError(f"wrk completed no request:\n{load.stdout}\n{load.stderr}")
        per_process = {pid: callgrind_totals(cdir, pid) / requests for pid in pids}
        return {"name": name, "requests": requests, "errors": errors,
                "supervisor": per_process[charon.pid],
                "workers": sum(v for p, v in per_process.items() if p != charon.pid)}  # fmt: skip
    finally:
        charon.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=int, default=20, help="measured seconds of load")
    p.add_argument("--conns", type=int, default=10, help="wrk connections (keep-alive)")
    p.add_argument("--path", default="/small", help="/small (13 B) or /64k")
    p.add_argument("--proxy-cpus", default="1")
    p.add_argument("--load-cpus", default="0")
    p.add_argument("--start-timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "nginx", "wrk", "taskset"):
        if find_exe(tool) is None:
            print(f"{tool} not found (apt-get install valgrind nginx-light wrk)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="charon-events-cost-"))
    backend = None
    try:
        (backend_port,) = free_ports(1)
        docroot = tmp / "docroot"
        docroot.mkdir()
        (docroot / "64k").write_bytes(b"x" * 65536)
        body = http_bench.BACKEND_HTTP.format(port=backend_port, docroot=docroot)
        backend = http_bench.start_nginx("backend", tmp, 1, body, args.load_cpus)
        why = http_bench.wait_ready(backend, backend_port, 10)
        if why:
            raise BenchError(f"backend nginx: {why}")
        runs = [measure(args, tmp, backend_port, events) for events in (True, False)]
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if backend is not None:
            backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    on, off = runs
    print(f"instructions per request (callgrind, user space), GET {args.path}, keep-alive:")
    for r in runs:
        print(
            f"  {r['name']:<9} worker {r['workers']:>10,.0f}  supervisor {r['supervisor']:>9,.0f}"
            f"  total {r['workers'] + r['supervisor']:>10,.0f}  ({r['requests']:,} requests, "
            f"{r['errors']} errors)"
        )
    total_on = on["workers"] + on["supervisor"]
    total_off = off["workers"] + off["supervisor"]
    print(
        f"events cost: worker {on['workers'] / off['workers'] - 1:+.1%}, "
        f"worker + supervisor {total_on / total_off - 1:+.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
