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
from charon.supervisor import runtime
from charon.supervisor.pidfile import read_pid

WAIT = 60.0


def reload(
    config: Config, pid: int | None, pidfile: str | None, restart_workers: bool = False
) -> int:
    """Exit status: 0 when every worker applied the new config, 1 when it was refused, a
    worker did not apply it (named; the supervisor replaced it) or nothing answered."""
    if config.admin.listen is None:
        return _fail("reload waits on the admin listener's /healthz: [admin] listen is off")
    record = runtime.find(config.path)
    pidfile = pidfile or config.server.pidfile
    if pid is None and pidfile:
        try:
            pid = read_pid(pidfile)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot read the PID file {pidfile}: {exc}")
    if pid is None:
        if record is None:
            return _fail(f"no supervisor running on {config.path} was found (no runtime file "
                         f"in {', '.join(str(d) for d in runtime.directories())}): pass --pid "
                         "or --pidfile, or set [server] pidfile")
        pid = record.pid
    new = str(config.admin.listen)
    # The supervisor answers where its config said when it started or last reloaded.
    current = record.admin if record is not None and record.pid == pid else None
    ask = current or new
    before = _reload_count(_url(ask))
    if before is None:
        return _fail(_silent(pid, ask, new, current))
    if current is not None and current != new:
        print(f"the config moves [admin] listen from {current} to {new}")
    try:
        os.kill(pid, signal.SIGUSR2 if restart_workers else signal.SIGHUP)
    except ProcessLookupError:
        return _fail(f"no process {pid}")
    urls = list(dict.fromkeys([_url(new), _url(ask)]))  # the new address first
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for url in urls:
            status = _status(url)
            if status is not None and int(status["count"]) > before:  # type: ignore[call-overload]
                return _result(status, moved=new if ask != new and url == _url(new) else None)
        time.sleep(0.1)
    return _fail(f"no reload result within {WAIT:.0f}s (asked {' and '.join(urls)})")


def _result(status: dict[str, object], moved: str | None) -> int:
    reason = status["last_error"]
    if status["last_result"] == "success":
        where = f"; the admin listener is now on {moved}" if moved else ""
        print(f"reloaded: config version {status.get('config_version', '?')}{where}")
        return 0
    if status["last_result"] == "incomplete":  # a worker did not apply it: replaced
        return _fail(f"reload incomplete: config version {status.get('config_version')} "
                     f"{reason}")
    return _fail(f"reload refused, still serving the previous config: {reason}")


def _silent(pid: int, asked: str, new: str, current: str | None) -> str:
    """Why nothing answered: a supervisor that runs but listens elsewhere is told apart."""
    url = _url(asked)
    if not runtime.alive(pid):
        return f"no supervisor runs as pid {pid} (nothing answers on {url} either)"
    if current is None:
        return (f"the supervisor (pid {pid}) runs but does not answer on {url}: if [admin] "
                "listen changed in the file since it started, it still answers on the old "
                f"address; reload it with `kill -HUP {pid}` and check /healthz there")
    if current != new:
        return (f"the supervisor (pid {pid}) does not answer on its admin address {current} "
                f"(the file now says {new})")
    return f"the supervisor (pid {pid}) does not answer on {url}"


def _url(admin: str) -> str:
    return f"http://{admin}/healthz"


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
