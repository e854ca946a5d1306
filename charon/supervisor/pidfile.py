"""The supervisor's PID file, so that `charon reload` can find it."""

from __future__ import annotations

import contextlib
import os


class PidFile:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self) -> None:
        if not self.path:
            return
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(temporary, self.path)  # never a half-written file

    def remove(self) -> None:
        """Remove the file if it still names this process (a successor may have replaced it)."""
        if not self.path:
            return
        with contextlib.suppress(OSError, ValueError):
            if read_pid(self.path) == os.getpid():
                os.unlink(self.path)


def read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())
