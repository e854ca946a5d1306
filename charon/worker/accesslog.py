"""The optional access log file: one line per request, written by each worker.

A request that failed at the backend (a 502 or 504, or a response cut short) ends its line with
why: `upstream=127.0.0.1:9 phase=connect reason=refused message="connection refused"` (the same
keys in JSON). A request a rule refused ends its line with why: `denied=acl` (auth, rate,
connections, body_size; `"denied"` in JSON).

Lines are buffered and written every FLUSH_INTERVAL (one write per batch, with O_APPEND so the
workers' batches never interleave mid-line); `reopen` (on SIGUSR1) lets logrotate move the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from charon.worker.upstreams.failure import UpstreamFailure

log = logging.getLogger("charon.worker")

FLUSH_INTERVAL = 0.1
MAX_BUFFER = 256 * 1024


class AccessLog:
    def __init__(self, loop: asyncio.AbstractEventLoop, path: str, as_json: bool) -> None:
        self.loop = loop
        self.path = path
        self.as_json = as_json
        self._fd = -1
        self._buffer: list[str] = []
        self._size = 0
        self._handle: asyncio.TimerHandle | None = None
        self.reopen()

    def reopen(self) -> None:
        self.flush()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            log.error("cannot open the access log %s: %s", self.path, exc.strerror)
            return
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd

    def request(
        self, host: str, method: str, path: str, status: int, duration: float,
        response_bytes: int, client_ip: str, failure: UpstreamFailure | None = None,
        denied: str | None = None,
    ) -> None:
        now = time.time()
        if self.as_json:
            entry = {
                "time": now, "host": host, "client": client_ip, "method": method, "path": path,
                "status": status, "duration": round(duration, 6), "bytes": response_bytes,
            }
            if failure is not None:
                entry.update(upstream=failure.address, phase=failure.phase,
                             reason=failure.reason, message=failure.error)
            if denied is not None:
                entry["denied"] = denied
            line = json.dumps(entry, ensure_ascii=False)
        else:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
            line = (
                f"{stamp} {client_ip} {host} \"{method} {_printable(path)}\" {status} "
                f"{response_bytes} {duration * 1000:.1f}ms"
            )
            if failure is not None:
                line += (
                    f" upstream={failure.address} phase={failure.phase} "
                    f"reason={failure.reason} message=\"{_printable(failure.error)}\""
                )
            if denied is not None:
                line += f" denied={denied}"
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= MAX_BUFFER:
            self.flush()
        elif self._handle is None:
            self._handle = self.loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._buffer or self._fd < 0:
            self._buffer, self._size = [], 0
            return
        data = ("\n".join(self._buffer) + "\n").encode("utf-8", "backslashreplace")
        self._buffer, self._size = [], 0
        try:
            os.write(self._fd, data)
        except OSError as exc:
            log.error("access log write failed: %s", exc.strerror)

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _printable(path: str) -> str:
    """The path with control characters and quotes escaped: a log line is one line."""
    if path.isprintable() and '"' not in path:
        return path
    return "".join(c if c.isprintable() and c != '"' else f"\\x{ord(c):02x}" for c in path)
