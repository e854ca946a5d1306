"""`charon reload`: send SIGHUP to a running supervisor and wait for the reload's result.

With --restart-workers it sends SIGUSR2: a new generation of workers even when the config could
apply in place, so that workers run the code installed since they started (an upgrade)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

from charon.config import Config
from charon.supervisor.pidfile import read_pid

WAIT = 60.0


def reload(
    config: Config, pid: int | None, pidfile: str | None, restart_workers: bool = False
) -> int:
    """Exit status: 0 when every worker applied the new config, 1 when it was refused, a
    worker did not apply it (named; the supervisor replaced it) or nothing answered."""
    if config.admin.listen is None:
        return _fail("reload waits on the admin listener's /healthz: [admin] listen is off")
    pidfile = pidfile or config.server.pidfile
    if pid is None:
        if not pidfile:
            return _fail("no supervisor PID: pass --pid, --pidfile or set [server] pidfile")
        try:
            pid = read_pid(pidfile)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot read the PID file {pidfile}: {exc}")
    url = f"http://{config.admin.listen}/healthz"
    before = _reload_count(url)
    if before is None:
        return _fail(f"the supervisor does not answer on {url}")
    try:
        os.kill(pid, signal.SIGUSR2 if restart_workers else signal.SIGHUP)
    except ProcessLookupError:
        return _fail(f"no process {pid}")
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        status = _status(url)
        if status is not None and int(status["count"]) > before:  # type: ignore[call-overload]
            reason = status["last_error"]
            if status["last_result"] == "success":
                print(f"reloaded: config version {status.get('config_version', '?')}")
                return 0
            if status["last_result"] == "incomplete":  # a worker did not apply it: replaced
                return _fail(f"reload incomplete: config version {status.get('config_version')} "
                             f"{reason}")
            return _fail(f"reload refused, still serving the previous config: {reason}")
        time.sleep(0.1)
    return _fail(f"no reload result within {WAIT:.0f}s")


def _status(url: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:  # 503 while no worker serves still has the body
        body = exc.read()
    except OSError:
        return None
    try:
        return json.loads(body)["reloads"]  # type: ignore[no-any-return]
    except (ValueError, KeyError):
        return None


def _reload_count(url: str) -> int | None:
    status = _status(url)
    return None if status is None else int(status["count"])  # type: ignore[call-overload]


def _fail(message: str) -> int:
    print(f"charon reload: {message}", file=sys.stderr)
    return 1
