"""Charon's own log lines (text and JSON) and the access log file with USR1 reopening."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from harness import HOST, Backend, Charon, wait_until

HOSTS = """
[[hosts]]
domains = ["127.0.0.1"]
upstream = "{upstream}"
"""


def _get(port: int, path: str) -> int:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as response:
        response.read()
        return int(response.status)


def _start(tmp_path: Path, backend: Backend, log_format: str, access_log: Path) -> Charon:
    charon = Charon(
        tmp_path, HOSTS.format(upstream=backend.url), workers=2,
        server_toml=f'access_log = "{access_log}"',
    )
    log = open(charon.log_path, "ab")  # noqa: SIM115 - closed right after Popen
    charon.proc = subprocess.Popen(
        [sys.executable, "-m", "charon", "run", "--config", str(charon.config_path),
         "--log-format", log_format],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    charon.wait_ready()
    return charon


def test_json_log_lines_and_access_log_reopened_on_usr1(tmp_path: Path, backend_factory) -> None:  # type: ignore[no-untyped-def]
    backend = backend_factory("sup_backend.py")
    access = tmp_path / "access.log"
    charon = _start(tmp_path, backend, "json", access)
    try:
        assert _get(charon.port, "/ok?before") == 200
        wait_until(lambda: access.exists() and b"/ok?before" in access.read_bytes(), 5)
        os.rename(access, tmp_path / "access.log.1")
        os.kill(charon.pid, signal.SIGUSR1)
        # Until the workers reopen, lines still land in the renamed file: retry until one
        # reaches the new file.
        def reopened() -> bool:
            _get(charon.port, "/ok?after")
            return access.exists() and b"/ok?after" in access.read_bytes()

        wait_until(reopened, 10, interval=0.2, what="the access log to be reopened")
        entry = json.loads(access.read_text().splitlines()[-1])
        assert entry["host"] == "127.0.0.1" and entry["status"] == 200
        assert entry["path"] == "/ok?after" and entry["client"] == "127.0.0.1"
        assert b"/ok?before" in (tmp_path / "access.log.1").read_bytes()
    finally:
        charon.stop()
    lines = [line for line in charon.log().splitlines() if line.strip()]
    assert lines, "no log lines"
    for line in lines:
        record = json.loads(line)  # every line of the supervisor and the workers is JSON
        assert {"time", "level", "process", "pid", "message"} <= record.keys()
    processes = {json.loads(line)["process"] for line in lines}
    assert "supervisor" in processes


def test_text_log_lines_name_the_process(tmp_path: Path, backend_factory) -> None:  # type: ignore[no-untyped-def]
    backend = backend_factory("sup_backend.py")
    charon = _start(tmp_path, backend, "text", tmp_path / "access.log")
    try:
        assert _get(charon.port, "/ok") == 200
        access = tmp_path / "access.log"
        wait_until(lambda: access.exists() and b'"GET /ok" 200' in access.read_bytes(), 5)
    finally:
        charon.stop()
    first = charon.log().splitlines()[0]
    assert " supervisor[" in first and " INFO " in first and first[:4].isdigit()
