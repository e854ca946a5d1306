"""One worker process as the supervisor sees it: its PID, heartbeat pipe and age."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time


class WorkerProcess:
    """A `python -m charon.worker` child that inherits the listening sockets."""

    def __init__(
        self,
        worker_id: int,
        config_text: str,
        config_path: str,
        fds: list[int],
        events_endpoint: str,
        log_format: str = "text",
        balance_fd: int = -1,
        generation: int = 0,
        generation_size: int = 1,
    ) -> None:
        self.worker_id = worker_id
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        self.heartbeat_fd = read_fd
        args = [
            sys.executable,
            "-m",
            "charon.worker",
            "--listen-fds",
            ",".join(str(fd) for fd in fds),
            "--heartbeat-fd",
            str(write_fd),
            "--config-path",
            config_path,
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
        ]
        try:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                pass_fds=(*fds, write_fd, *([balance_fd] if balance_fd >= 0 else [])),
                close_fds=True,
            )
        finally:
            os.close(write_fd)
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(config_text.encode("utf-8"))
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the supervisor's loop sees the exit
        self.pid = self.process.pid
        self.started_at = time.monotonic()
        self.last_beat = self.started_at
        self.ready = False
        self.killed = False
        self.retire_by = 0.0  # set when retired after a reload: killed if still alive then

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
