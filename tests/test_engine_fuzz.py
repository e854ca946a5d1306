"""The engine's libFuzzer targets (tests/fuzz/), built with AddressSanitizer and
UndefinedBehaviorSanitizer over the engine's own .c files with a model of the sockets, each run
for a bounded time from its seeds: any crash, sanitizer report, leak, or broken invariant of the
harness (bytes forwarded not a prefix of bytes sent, an fd left open or closed twice) fails.
bench/fuzz.py runs the same targets for an hour with a kept corpus."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz"
TARGETS = {"fuzz_head": 3, "fuzz_tunnel": 6, "fuzz_dial": 4, "fuzz_door": 4, "fuzz_tls": 4,
           "fuzz_atomics": 2}  # s


def fuzzer_runtime() -> str | None:
    """Why the targets cannot be built here, or None if they can."""
    clang = shutil.which("clang")
    if clang is None:
        return "clang is not installed (tests/setup.sh installs clang and libclang-rt-14-dev)"
    lib = subprocess.run([clang, "-print-file-name=libclang_rt.fuzzer-x86_64.a"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    if not os.path.isabs(lib) or not os.path.exists(lib):
        return "clang has no libFuzzer runtime (Debian: libclang-rt-14-dev)"
    return None


missing = fuzzer_runtime()
pytestmark = pytest.mark.skipif(missing is not None, reason=missing or "")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-build")
    subprocess.run([str(FUZZ / "build.sh"), str(out)], check=True, capture_output=True,
                   env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    return out


def run_target(binary: Path, corpus: Path, seconds: int,
               workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), f"-max_total_time={seconds}", "-timeout=20", "-rss_limit_mb=3072",
         "-max_len=8192", "-print_final_stats=1", f"-artifact_prefix={workdir}/", str(corpus)],
        cwd=workdir, capture_output=True, text=True, timeout=seconds + 120,
        env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0"},
    )


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_target_finds_nothing(built: Path, target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, str(FUZZ / "seeds.py"), target, str(corpus)], check=True,
                   timeout=60)
    result = run_target(built / target, corpus, TARGETS[target], tmp_path)
    found = sorted(p.name for p in tmp_path.iterdir()
                   if p.name.startswith(("crash-", "leak-", "timeout-", "oom-")))
    assert result.returncode == 0 and not found, (found, result.stderr[-6000:])
    runs = [line for line in result.stderr.splitlines() if "stat::number_of_executed_units" in line]
    assert runs and int(runs[0].split(":")[-1]) > 20, result.stderr[-3000:]  # it did run



REGRESSIONS = sorted((FUZZ / "regressions").glob("*/*"))


@pytest.mark.parametrize("case", REGRESSIONS,
                         ids=[f"{p.parent.name}/{p.name}" for p in REGRESSIONS])
def test_fuzz_regression_input_runs_clean(built: Path, case: Path, tmp_path: Path) -> None:
    """Inputs that once found a bug (tests/fuzz/regressions/<target>/), run once each:
    empty-client-tail: a dialled tunnel whose client sent nothing past its head walked a NULL
    tail (NULL + 0 in feed, undefined behaviour UBSan stops at)."""
    result = subprocess.run([str(built / case.parent.name), str(case)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ASAN_OPTIONS": "detect_leaks=1"})
    assert result.returncode == 0, result.stderr[-4000:]
