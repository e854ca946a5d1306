"""The runtime file: how `charon reload --config PATH` finds the supervisor running on PATH
without a configured pidfile, and the admin address it answers on now (the file may have moved
`[admin] listen` since it started).

Every supervisor started on a config file writes `charon-NAME-HASH.json` (NAME: the config
file's name, HASH: of its real path) holding its PID, its admin address and that path, in the
first usable of: $RUNTIME_DIRECTORY (systemd's RuntimeDirectory=), /run/charon, /run, then
$XDG_RUNTIME_DIR and /tmp/charon-UID (created 0700), and removes it when it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from pathlib import Path

from charon.config.model import ListenAddress

log = logging.getLogger("charon.supervisor")


@dataclasses.dataclass(frozen=True)
class Record:
    pid: int
    admin: str | None  # "IP:PORT" the admin listener is on, None when it is off
    config: str
    path: Path  # the runtime file itself


def directories() -> list[Path]:
    """Where runtime files go, most preferred first."""
    found: list[Path] = []
    systemd = os.environ.get("RUNTIME_DIRECTORY", "")
    if systemd:
        found.append(Path(systemd.split(":")[0]))
    found += [Path("/run/charon"), Path("/run")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        found.append(Path(os.environ["XDG_RUNTIME_DIR"]))
    found.append(Path(tempfile.gettempdir()) / f"charon-{os.getuid()}")
    return found


def file_name(config_path: str) -> str:
    real = os.path.realpath(config_path)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(real).stem)[:40]
    digest = hashlib.blake2b(real.encode(), digest_size=4).hexdigest()
    return f"charon-{stem}-{digest}.json"


class RuntimeFile:
    """The supervisor's side: written once it serves, rewritten when the admin listener
    moves, removed at exit if it still names this process."""

    def __init__(self, config_path: str) -> None:
        # The embedded demo config ("<default>") has no file to reload.
        self.name = None if config_path.startswith("<") else file_name(config_path)
        self.config = os.path.realpath(config_path) if self.name else ""
        self.path: Path | None = None

    def write(self, admin: ListenAddress | None) -> None:
        if self.name is None:
            return
        body = json.dumps({"pid": os.getpid(), "admin": str(admin) if admin else None,
                           "config": self.config})
        for directory in ([self.path.parent] if self.path else directories()):
            if not _usable(directory, create=directory.name == f"charon-{os.getuid()}"):
                continue
            path = directory / self.name
            temporary = path.with_name(f".{self.name}.{os.getpid()}")
            try:
                temporary.write_text(body + "\n")
                os.replace(temporary, path)
            except OSError:
                with contextlib.suppress(OSError):
                    temporary.unlink()
                continue
            self.path = path
            return
        log.warning("no runtime directory is writable: `charon reload` needs --pid or a pidfile")

    def moved(self, admin: ListenAddress | None) -> None:
        """The admin listener moved: rewrite the file if it was written."""
        if self.path is not None:
            self.write(admin)

    def remove(self) -> None:
        if self.path is None:
            return
        record = _read(self.path)
        if record is not None and record.pid == os.getpid():
            with contextlib.suppress(OSError):
                self.path.unlink()


def find(config_path: str) -> Record | None:
    """The record of a live supervisor running on `config_path`, if one was written."""
    name = file_name(config_path)
    for directory in directories():
        if not _usable(directory, create=False, writable=False):
            continue
        record = _read(directory / name)
        if record is not None and _is_charon(record.pid):
            return record
    return None


def _usable(directory: Path, create: bool, writable: bool = True) -> bool:
    """A directory nobody but its owner can write to (in a group- or world-writable one,
    anyone could leave a file naming any PID), and to write in: ours or root's."""
    if create:
        with contextlib.suppress(OSError):
            directory.mkdir(mode=0o700)
    try:
        info = directory.stat()
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    if not writable:
        return True
    return info.st_uid in (0, os.getuid()) and os.access(directory, os.W_OK)


def _read(path: Path) -> Record | None:
    try:
        data = json.loads(path.read_text())
        return Record(int(data["pid"]), data.get("admin"), str(data.get("config", "")), path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_charon(pid: int) -> bool:
    """Alive and a charon process: a file left by a killed supervisor may name a reused PID."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"charon" in f.read()
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
