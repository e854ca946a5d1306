"""`charon demo [--listen IP:PORT] [--admin IP:PORT]`: the proxy on its embedded config
(charon/config/default.toml) in front of the built-in demo backend.

Every port is checked before anything starts or a URL is printed: a port in use is named, with
a free one to use instead. The demo backend's own port (8081) moves to a free one by itself
when it is taken: nobody types its address."""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from importlib import resources

from charon.config import Config, ConfigError, ListenAddress, load_config_text
from charon.config.values import listen_address

LISTEN = ListenAddress("127.0.0.1", 8080)
ADMIN = ListenAddress("127.0.0.1", 9090)
BACKEND = ListenAddress("127.0.0.1", 8081)


class DemoError(Exception):
    """What to tell the user, who can fix it (exit 1)."""


def address(text: str) -> ListenAddress:
    """--listen / --admin: "IP:PORT", "[IPv6]:PORT", or a bare port on 127.0.0.1."""
    try:
        return listen_address(f"127.0.0.1:{text}" if text.isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def demo_config(
    listen: ListenAddress, admin: ListenAddress, backend: int = BACKEND.port
) -> tuple[Config, str, int]:
    """The embedded config on these addresses, its text, and the demo backend's port (a free
    one when `backend` is taken or 0).

    Raises DemoError, naming a free port to use instead, when listen or admin is taken."""
    if listen == admin:
        raise DemoError(f"--listen and --admin are both {listen}: they need two ports")
    busy = [(flag, a) for flag, a in (("--listen", listen), ("--admin", admin)) if in_use(a)]
    if busy:
        raise DemoError(_busy_message(busy, {listen, admin}))
    wanted = ListenAddress(BACKEND.host, backend)
    if backend == 0 or wanted in (listen, admin) or in_use(wanted):
        backend = _free_port(BACKEND.host)
    text = resources.files("charon.config").joinpath("default.toml").read_text("utf-8")
    text = _replace(text, f'listen = ["{LISTEN}"]', f'listen = ["{listen}"]')
    text = _replace(text, f'listen = "{ADMIN}"', f'listen = "{admin}"')
    # Reached through --listen 0.0.0.0:PORT by the machine's name or LAN address, the demo
    # must answer those Hosts too.
    text = _replace(text, 'domains = ["localhost", "127.0.0.1"]', 'domains = ["*"]')
    text = _replace(text, f'upstream = "http://{BACKEND}"', f'upstream = "http://{BACKEND.host}:'
                    f'{backend}"')
    try:
        return load_config_text(text, "<default>"), text, backend
    except ConfigError as exc:  # e.g. an address this machine does not have
        raise DemoError(str(exc).removeprefix("<default>:").split(": ", 1)[-1]) from None


def in_use(where: ListenAddress) -> bool:
    """Whether a listener could not bind `where` (as the supervisor binds: SO_REUSEADDR, so a
    connection in TIME_WAIT does not count, but no SO_REUSEPORT, so a listener does)."""
    with socket.socket(where.family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((where.host, where.port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise DemoError(f"{where}: this machine has no address {where.host}") from None
            if exc.errno == errno.EACCES:
                raise DemoError(f"{where}: ports below 1024 need root or "
                                "CAP_NET_BIND_SERVICE") from None
            return True
    return False


def _busy_message(busy: list[tuple[str, ListenAddress]], taken: set[ListenAddress]) -> str:
    lines = []
    suggestion = []
    for flag, where in busy:
        free = _suggest(where, taken)
        taken.add(free)
        what = "the proxy" if flag == "--listen" else "the admin listener"
        lines.append(f"{where} ({what}) is already in use by another program")
        suggestion.append(f"{flag} {free}")
    return "; ".join(lines) + f".\n  Free ports now: charon demo {' '.join(suggestion)}"


def _suggest(where: ListenAddress, taken: set[ListenAddress]) -> ListenAddress:
    """A free port near the busy one, easy to type: +100, +200, ..., then the next ones."""
    steps = [where.port + 100 * k for k in range(1, 10)] + [where.port + k for k in range(1, 50)]
    for port in steps:
        candidate = ListenAddress(where.host, port)
        if port < 65536 and candidate not in taken and not in_use(candidate):
            return candidate
    return ListenAddress(where.host, _free_port(where.host))


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _replace(text: str, old: str, new: str) -> str:
    if old not in text:  # default.toml changed without this module
        raise RuntimeError(f"charon/config/default.toml has no line {old!r}")
    return text.replace(old, new, 1)


def run(listen: ListenAddress, admin: ListenAddress, backend: int,
        serve: Callable[[Config, str], int]) -> int:
    """Start the demo backend, print where to look, and serve until a stop signal."""
    config, text, backend_port = demo_config(listen, admin, backend)
    # Until the supervisor's loop handles signals, a TERM must still run the `finally` below,
    # also one that comes while Popen is under way: it waits, blocked, until the `try`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    process = subprocess.Popen(
        [sys.executable, "-m", "charon.demo.backend", "--host", BACKEND.host,
         "--port", str(backend_port)],
        preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM}),
    )
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        _wait_for(f"http://{BACKEND.host}:{backend_port}/healthz", process)
        print(f"\n  Charon demo: open {_url(listen)}/ (proxied to the demo backend on port "
              f"{backend_port})", flush=True)
        print(f"  Admin:       {_url(admin)}/ (live log), {_url(admin)}/metrics\n", flush=True)
        return serve(config, text)
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


def _url(where: ListenAddress) -> str:
    """A URL a browser on this machine can open (a wildcard address is not one)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(where.host, where.host)
    return f"http://{ListenAddress(host, where.port)}"


def _wait_for(url: str, process: subprocess.Popen[bytes], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(f"the demo backend exited with {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        time.sleep(0.1)
    raise DemoError(f"the demo backend did not answer on {url} within {seconds:.0f}s")

