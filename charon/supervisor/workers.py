"""One worker process as the supervisor sees it: its PID, heartbeat pipe and age."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from charon.config import Config
from charon.config.sharing import pickled
from charon.worker.control import HEALTH, MessageReader, decode_health

log = logging.getLogger("charon.supervisor")

# Every worker of this supervisor seals TLS session tickets with keys derived from this secret
# (charon/worker/tlsserver.py), so a ticket one worker issued resumes on any other, across
# reloads too. It lives only in this process and its workers' environments (readable only by
# the same user, who can read their memory anyway).
TICKET_SECRET = secrets.token_bytes(32)
TICKET_SECRET_ENV = "CHARON_TLS_TICKET_SECRET"


class WorkerProcess:
    """A `python -m charon.worker` child that inherits the listening sockets."""

    def __init__(
        self,
        worker_id: int,
        config: Config,
        fds: list[int],
        events_endpoint: str,
        log_format: str = "text",
        balance_fd: int = -1,
        generation: int = 0,
        generation_size: int = 1,
        config_version: int = 1,
        limits_fd: int = -1,
        ledger: int = -1,
    ) -> None:
        self.worker_id = worker_id
        self.generation = generation
        self.ledger = ledger  # its slot of the shared limits table's ledgers (-1: none)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self.heartbeat_fd = read_fd
        # Reloads in place: configs go down, (version, error) answers come back (control.py).
        self.control, child_control = socket.socketpair()
        self.control.setblocking(False)
        self.config_version = config_version  # the last one it applied (or started with)
        self.apply_error: tuple[int, str] | None = None  # the last version it could not apply
        self._replies = MessageReader()
        self._out = bytearray()  # what the control socket did not take yet (post)
        # A health message from the worker (control.py): its passive mark-downs, its acks.
        self.on_health: Callable[[WorkerProcess, list[Any]], None] | None = None
        args = [
            sys.executable,
            "-m",
            "charon.worker",
            "--listen-fds",
            ",".join(str(fd) for fd in fds),
            "--heartbeat-fd",
            str(write_fd),
            "--config-path",
            config.path,
            "--worker-id",
            str(worker_id),
            "--events",
            events_endpoint,
            "--log-format",
            log_format,
            "--balance-fd",
            str(balance_fd),
            "--generation",
            str(generation),
            "--generation-size",
            str(generation_size),
            "--supervisor-pid",
            str(os.getpid()),
            "--control-fd",
            str(child_control.fileno()),
            "--limits-fd",
            str(limits_fd),
            "--ledger",
            str(ledger),
        ]
        try:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                pass_fds=(
                    *fds, write_fd, child_control.fileno(),
                    *([balance_fd] if balance_fd >= 0 else []),
                    *([limits_fd] if limits_fd >= 0 else []),
                ),
                close_fds=True,
                env={**os.environ, TICKET_SECRET_ENV: TICKET_SECRET.hex()},
            )
        finally:
            os.close(write_fd)
            child_control.close()
        assert self.process.stdin is not None
        try:
            # The config as the supervisor checked it (the form reloads in place send): a
            # worker parses no config or htpasswd file of its own.
            self.process.stdin.write(pickled(config))
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the supervisor's loop sees the exit
        self.pid = self.process.pid
        self.started_at = time.monotonic()
        self.last_beat = self.started_at
        self.ready = False
        self.killed = False
        self.retire_by = 0.0  # set when retired after a reload: killed if still alive then
        self.cut = False  # its retiring generation was past the cap: told to close and exit

    def read_heartbeat(self) -> bool:
        """Consume the beats waiting in the pipe; False once the pipe is closed."""
        try:
            data = os.read(self.heartbeat_fd, 4096)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.last_beat = time.monotonic()
        if b"R" in data:
            self.ready = True
        return True

    def read_replies(self) -> bool:
        """Take the workers' answers to configs sent; False once the channel is closed."""
        try:
            data = self.control.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            return False
        try:
            replies = self._replies.feed(data)
        except ValueError:
            return False
        for version, error in replies:
            if version == HEALTH:
                self._health(error)
            elif error:
                self.apply_error = (version, error.decode("utf-8", "replace"))
            else:
                self.config_version = max(self.config_version, version)
        return True

    def _health(self, payload: bytes) -> None:
        try:
            message = decode_health(payload)
        except ValueError as exc:
            log.warning("worker %d (pid %d): %s", self.worker_id, self.pid, exc)
            return
        if self.on_health is not None:
            self.on_health(self, message)

    def post(self, message: bytes) -> None:
        """Send a control message without waiting: what the socket does not take now goes out
        in order when it can (configs and health verdicts never interleave). OSError if the
        worker's end is gone."""
        if self._out:
            self._out += message
            return
        try:
            sent = self.control.send(message)
        except BlockingIOError:
            sent = 0
        if sent < len(message):
            self._out += message[sent:]
            asyncio.get_running_loop().add_writer(self.control.fileno(), self._writable)

    def _writable(self) -> None:
        try:
            sent = self.control.send(self._out)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._out)  # gone: the exit is seen by the loop's reaping
        del self._out[:sent]
        if not self._out:
            asyncio.get_running_loop().remove_writer(self.control.fileno())

    @property
    def sending(self) -> bool:
        """Part of a message still waits for the socket."""
        return bool(self._out)

    def exit_code(self) -> int | None:
        return self.process.poll()

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.killed = True
        self.signal(signal.SIGKILL)

    def close(self) -> None:
        """Release the supervisor's side once the process has been reaped."""
        with contextlib.suppress(OSError):
            os.close(self.heartbeat_fd)
        if self._out and self.control.fileno() >= 0:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_writer(self.control.fileno())
            self._out.clear()
        self.control.close()


class ReloadFailure(Exception):
    pass


@dataclass
class Slot:
    """A worker position: the process in it, or when the next one may start."""

    worker_id: int
    process: WorkerProcess | None = None
    respawn_at: float = 0.0
    crashes: int = 0  # its workers that died after serving, in a row (see respawn.py)
