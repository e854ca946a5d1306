"""`charon reload` with the README's own minimal config (issue 15): no pidfile configured, the
supervisor is found through its runtime file; a reload that moves [admin] listen is followed to
the new address and says so; without a runtime file the message names the likely cause.
Real processes on 127.0.0.1; the runtime directory is the test's ($RUNTIME_DIRECTORY)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOST, REPO, child_pids, free_port, kill_pid, wait_until

from charon.config.model import ListenAddress
from charon.supervisor import runtime

pytestmark = pytest.mark.timeout(90)


def readme_minimal_config() -> str:
    text = (REPO / "README.md").read_text()
    at = text.index("The smallest useful")
    block = re.search(r"```toml\n(.*?)```", text[at:], re.S)
    assert block, "README.md: no TOML block after 'The smallest useful one'"
    return block[1]


def health(admin: int) -> dict | None:  # type: ignore[type-arg]
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://{HOST}:{admin}/healthz", timeout=2) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except OSError:
        return None


def refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((HOST, port)) != 0


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.rundir = tmp / "run"
        self.rundir.mkdir(mode=0o700)
        self.env = {**os.environ, "RUNTIME_DIRECTORY": str(self.rundir)}
        self.port, self.admin = free_port(), free_port()
        self.readme = readme_minimal_config()
        assert "pidfile" not in self.readme and "[admin]" not in self.readme
        self.path = tmp / "charon.toml"
        self.write(self.admin)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "charon.log"

    def write(self, admin: int) -> None:
        # The README's text as it is, on free ports (8080 and 9090 may be busy here).
        text = self.readme.replace("127.0.0.1:8080", f"{HOST}:{self.port}")
        assert text != self.readme
        self.path.write_text(f'{text}\n[admin]\nlisten = "{HOST}:{admin}"\n')

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "charon", *args], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=90)

    def runtime_file(self) -> Path:
        return self.rundir / runtime.file_name(str(self.path))


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    seen: set[int] = set()
    try:
        yield s
    finally:
        if s.proc is not None:
            seen.update(child_pids(s.proc.pid))
            if s.proc.poll() is None:
                s.proc.send_signal(signal.SIGTERM)
                try:
                    s.proc.wait(15)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait(5)
        for pid in seen:
            kill_pid(pid)


def start(s: Setup) -> subprocess.Popen[bytes]:
    with open(s.log, "wb") as out:
        s.proc = subprocess.Popen([sys.executable, "-m", "charon", "run", "--config", str(s.path)],
                                  cwd=REPO, env=s.env, stdout=out, stderr=subprocess.STDOUT)
    proc = s.proc

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"charon exited with {proc.returncode}:\n{s.log.read_text()}")
        h = health(s.admin)
        return bool(h and h["workers_ready"] >= 1)

    wait_until(ready, 30, what="charon to serve")
    return proc


def test_reload_with_the_readme_config_and_a_moved_admin_listener(setup: Setup) -> None:
    s = setup
    nothing = s.cli("reload", "--config", str(s.path))
    assert nothing.returncode == 1, nothing
    assert "no supervisor running on" in nothing.stderr and str(s.rundir) in nothing.stderr

    proc = start(s)
    record = json.loads(s.runtime_file().read_text())
    assert record == {"pid": proc.pid, "admin": f"{HOST}:{s.admin}",
                      "config": os.path.realpath(s.path)}

    first = s.cli("reload", "--config", str(s.path))
    assert first.returncode == 0, first
    assert first.stdout.startswith("reloaded: config version 2"), first.stdout

    # The file now moves the admin listener: followed, and said.
    old, new = s.admin, free_port()
    s.write(new)
    moved = s.cli("reload", "--config", str(s.path))
    assert moved.returncode == 0, moved
    assert f"the config moves [admin] listen from {HOST}:{old} to {HOST}:{new}" in moved.stdout
    assert f"the admin listener is now on {HOST}:{new}" in moved.stdout, moved.stdout
    assert (health(new) or {}).get("status") == "ok"
    assert refused(old)
    assert json.loads(s.runtime_file().read_text())["admin"] == f"{HOST}:{new}"

    # Without the runtime file, a moved admin address cannot be followed: the message says
    # that the supervisor runs and what probably happened, not only "does not answer".
    aside = s.runtime_file().with_suffix(".aside")
    s.runtime_file().rename(aside)
    s.write(free_port())
    lost = s.cli("reload", "--config", str(s.path), "--pid", str(proc.pid))
    assert lost.returncode == 1, lost
    assert f"the supervisor (pid {proc.pid}) runs but does not answer" in lost.stderr, lost
    assert "[admin] listen changed" in lost.stderr and f"kill -HUP {proc.pid}" in lost.stderr
    assert (health(new) or {}).get("status") == "ok", "the failed attempt signalled anyway"

    aside.rename(s.runtime_file())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert not s.runtime_file().exists(), "the runtime file outlived its supervisor"


def test_runtime_directories_and_stale_or_planted_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "systemd"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert runtime.directories() == [
        tmp_path / "systemd", Path("/run/charon"), Path("/run"), tmp_path / "xdg",
        tmp_path / f"charon-{os.getuid()}",
    ]
    assert runtime.file_name("/etc/charon/charon.toml") != runtime.file_name("/etc/x/charon.toml")

    directory = tmp_path / "systemd"
    directory.mkdir(mode=0o700)
    config = tmp_path / "c.toml"
    config.write_text("")
    mine = runtime.RuntimeFile(str(config))
    mine.write(ListenAddress(HOST, 1234))
    assert mine.path is not None and mine.path.parent == directory
    assert json.loads(mine.path.read_text())["pid"] == os.getpid()
    mine.remove()  # it names this process: removed
    assert not mine.path.exists()

    # A process whose command line says charon, as a supervisor's does.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "charon"])
    try:
        wait_until(lambda: b"charon" in Path(f"/proc/{sleeper.pid}/cmdline").read_bytes(), 10,
                   what="the sleeper's exec")
        record = {"pid": sleeper.pid, "admin": f"{HOST}:1234", "config": str(config)}
        mine.path.write_text(json.dumps(record))
        found = runtime.find(str(config))
        assert found is not None and (found.pid, found.admin) == (sleeper.pid, f"{HOST}:1234")
        # A directory others may write to is never trusted: anyone could plant a record there.
        directory.chmod(0o777)
        assert runtime.find(str(config)) is None
        directory.chmod(0o700)
        # A record naming a PID that is no charon process (gone, or reused) is stale.
        mine.path.write_text(json.dumps({**record, "pid": os.getpid()}))
        assert runtime.find(str(config)) is None
    finally:
        sleeper.kill()
        sleeper.wait(5)


def test_a_reload_moving_the_admin_listener_to_a_busy_port_fails_and_keeps_the_old_one(
    setup: Setup,
) -> None:
    s = setup
    proc = start(s)
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen(1)
        s.write(busy.getsockname()[1])
        result = s.cli("reload", "--config", str(s.path))
    assert result.returncode != 0, result
    h = health(s.admin)  # the old listener still serves, and says what failed
    assert h is not None and h["status"] == "ok", s.log.read_text()
    assert h["reloads"]["last_result"] == "error", h["reloads"]
    assert "(admin)" in h["reloads"]["last_error"], h["reloads"]
    assert json.loads(s.runtime_file().read_text())["admin"] == f"{HOST}:{s.admin}"
    # The workers were left on the config they had: a later good reload still applies.
    s.write(s.admin)
    again = s.cli("reload", "--config", str(s.path))
    assert again.returncode == 0, again
    assert proc.poll() is None
