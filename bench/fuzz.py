"""Long runs of the engine's libFuzzer targets (tests/fuzz/), each for --seconds (an hour by
default), one after the other or --jobs at a time, with a corpus kept under bench/out/fuzz/ so
that each run starts where the last one stopped. Crashes, leaks and timeouts are written next
to the corpus; the script prints a table and exits 1 if any target found something.

    .venv/bin/python bench/fuzz.py                      # every target, 1 hour each
    .venv/bin/python bench/fuzz.py --seconds 600 --targets fuzz_tunnel,fuzz_dial
    .venv/bin/python bench/fuzz.py --jobs 2             # two targets at once (2 cores)

tests/test_engine_fuzz.py runs the same targets for 10-15 s each in the test suite.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FUZZ = REPO / "tests" / "fuzz"
TARGETS = ["fuzz_head", "fuzz_tunnel", "fuzz_dial", "fuzz_door"]
FINDINGS = ("crash-", "leak-", "timeout-", "oom-")


def build(out: Path) -> None:
    subprocess.run([str(FUZZ / "build.sh"), str(out)], check=True,
                   env={**os.environ, "PYTHON": sys.executable})


def start(target: str, out: Path, seconds: int) -> tuple[subprocess.Popen[bytes], Path]:
    corpus = out / "corpus" / target
    findings = out / "findings" / target
    findings.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(FUZZ / "seeds.py"), target, str(corpus)], check=True)
    log = out / f"{target}.log"
    proc = subprocess.Popen(
        [str(out / "build" / target), f"-max_total_time={seconds}", "-timeout=30",
         "-rss_limit_mb=3072", "-max_len=16384", "-print_final_stats=1",
         f"-artifact_prefix={findings}/", str(corpus)],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"),
        env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    return proc, log


def summary(target: str, out: Path, rc: int, log: Path) -> dict[str, str]:
    text = log.read_text(errors="replace")
    stat = dict(re.findall(r"stat::(\w+):\s*(\d+)", text))
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    found = sorted(p.name for p in (out / "findings" / target).iterdir()
                   if p.name.startswith(FINDINGS))
    return {
        "target": target,
        "runs": stat.get("number_of_executed_units", "?"),
        "exec/s": stat.get("average_exec_per_sec", "?"),
        "cov": cov[-1][0] if cov else "?",
        "features": cov[-1][1] if cov else "?",
        "corpus": str(len(list((out / "corpus" / target).iterdir()))),
        "rc": str(rc),
        "findings": ", ".join(found) or "-",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=3600, help="per target (default 3600)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--jobs", type=int, default=1, help="targets run at once")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "fuzz")
    args = ap.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    build(args.out / "build")

    rows: list[dict[str, str]] = []
    waiting = list(targets)
    running: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        while waiting or running:
            while waiting and len(running) < args.jobs:
                target = waiting.pop(0)
                print(f"{target}: {args.seconds} s", flush=True)
                running.append((target, *start(target, args.out, args.seconds)))
            time.sleep(1)
            for item in list(running):
                target, proc, log = item
                if proc.poll() is not None:
                    running.remove(item)
                    rows.append(summary(target, args.out, proc.returncode, log))
    finally:
        for _, proc, _ in running:  # stopped early (Ctrl-C): only what this script started
            proc.terminate()
            proc.wait(timeout=30)

    cols = ["target", "runs", "exec/s", "cov", "features", "corpus", "rc", "findings"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols))
    bad = [r for r in rows if r["findings"] != "-" or r["rc"] != "0"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
