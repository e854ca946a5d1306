"""Autobahn|Testsuite through Charon: a proxy must change no verdict (protocol notes, decision 2).

Uses ../shared/autobahn (next to the repository): the reference echo backend (`backend.sh`), the
suite runner (`autobahn_through.sh`, quick profile) and `ab_summary.py`. The suite runs once
directly against the backend (the baseline) and once through Charon; every case's verdict
(behaviour and close behaviour) through Charon must equal the direct one.

The quick profile (247 cases, about 8 s a run) is the default. The full one (517 cases, with
9.* limits/performance and 12.*/13.* permessage-deflate; 7-10 minutes a run) is the same test:

    CHARON_AUTOBAHN_PROFILE=full .venv/bin/pytest tests/test_autobahn.py --timeout 3000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import HOST, REPO, free_port, running_charon

AUTOBAHN = REPO.parent / "shared" / "autobahn"
PROFILE = os.environ.get("CHARON_AUTOBAHN_PROFILE", "quick")
SUITE_TIMEOUT = 240 if PROFILE == "quick" else 1500  # seconds, for one run of the suite
AB_VENV = Path(
    os.environ.get("AB_VENV")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "charon-autobahn" / "venv"
)


def _script(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AUTOBAHN / name), *args], capture_output=True, text=True, timeout=timeout,
        cwd=AUTOBAHN, check=False,
    )


@pytest.fixture(scope="module")
def backend_port() -> Iterator[int]:
    if not AUTOBAHN.is_dir():
        pytest.skip(f"the Autobahn harness is not there: {AUTOBAHN} is missing (it is the "
                    "project's shared/autobahn folder, next to the clone; tests/setup.sh says "
                    "how to get it)")
    if not (AB_VENV / "bin" / "wstest").exists():
        setup = _script("setup_autobahn.sh", timeout=900)
        assert setup.returncode == 0, f"setup_autobahn.sh failed:\n{setup.stdout}\n{setup.stderr}"
    port = free_port()
    started = _script("backend.sh", "start", str(port), timeout=30)
    try:
        assert started.returncode == 0, f"backend.sh start failed:\n{started.stderr}"
        yield port
    finally:
        _script("backend.sh", "stop", str(port), timeout=30)


def _run_suite(url: str, outdir: Path, agent: str, backend_port: int) -> dict[str, Any]:
    done = _script("autobahn_through.sh", url, PROFILE, str(outdir), "--agent", agent,
                   "--backend-port", str(backend_port), "--timeout", str(SUITE_TIMEOUT),
                   timeout=SUITE_TIMEOUT + 60)
    # 0: no case failed, 1: some failed (compared below); anything else: the run broke.
    assert done.returncode in (0, 1), (
        f"autobahn_through.sh {url} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    )
    return json.loads((outdir / "summary.json").read_text())  # type: ignore[no-any-return]


def test_autobahn_same_verdicts_through_charon(
    backend_port: int, tmp_path: Path
) -> None:
    direct = _run_suite(f"ws://{HOST}:{backend_port}/", tmp_path / "direct", "direct",
                        backend_port)
    hosts = f"""
        [[hosts]]
        domains = ["{HOST}"]
        upstream = "http://{HOST}:{backend_port}"
        """
    with running_charon(tmp_path, hosts) as charon:
        through = _run_suite(f"ws://{HOST}:{charon.port}/", tmp_path / "charon", "charon",
                             backend_port)
    compare = subprocess.run(
        [sys.executable, str(AUTOBAHN / "ab_summary.py"), "--compare",
         f"direct={tmp_path / 'direct'}", f"charon={tmp_path / 'charon'}"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    table = compare.stdout + compare.stderr

    assert direct["total"]["total"] >= 200, f"the direct run ran too few cases:\n{table}"
    worse = []
    for case, want in direct["cases"].items():
        got = through["cases"].get(case)
        if got is None:
            worse.append(f"{case}: missing through Charon")
            continue
        for key in ("behavior", "behaviorClose", "handshake_completed"):
            if got[key] != want[key]:
                worse.append(f"{case}: {key} {want[key]} direct, {got[key]} through Charon")
    assert not worse, "verdicts differ through Charon:\n" + "\n".join(worse) + "\n\n" + table
