"""`charon demo | run --config PATH | check PATH | logs`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from typing import NoReturn

from charon import cli_logs, cli_reload, logsetup
from charon.config import Config, ConfigError, load_config_text
from charon.config.backends import listing_lines
from charon.supervisor.arbiter import Arbiter
from charon.supervisor.sockets import ListenError
from charon.tls.listing import certificate_lines

DEMO_BACKEND_PORT = 8081


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="charon", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the proxy on its embedded config + demo backend")
    run = commands.add_parser("run", help="run the proxy on a config file")
    run.add_argument("--config", required=True, metavar="PATH")
    for command in (demo, run):
        command.add_argument(
            "--log-format", choices=logsetup.FORMATS, default="text",
            help="Charon's own log lines on stderr (default: text)",
        )
    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("path")
    cli_logs.add_parser(commands)
    reload = commands.add_parser(
        "reload", help="reload a running supervisor's config and wait for the result"
    )
    reload.add_argument("--config", required=True, metavar="PATH")
    reload.add_argument("--pid", type=int, help="the supervisor's PID (e.g. systemd's $MAINPID)")
    reload.add_argument("--pidfile", metavar="PATH", help="default: [server] pidfile")
    reload.add_argument(
        "--restart-workers", action="store_true",
        help="start a new generation of workers (new code after an upgrade), as SIGUSR2 does",
    )
    args = parser.parse_args(argv)

    if args.command == "check":
        sys.exit(_check(args.path))
    if args.command == "logs":
        sys.exit(cli_logs.main(args))
    if args.command == "reload":
        sys.exit(cli_reload.reload(
            _read(args.config)[0], args.pid, args.pidfile, args.restart_workers
        ))
    logsetup.setup("supervisor", args.log_format)
    if args.command == "run":
        sys.exit(_run(*_read(args.config), args.log_format))
    sys.exit(_demo(args.log_format))


def _read(path: str) -> tuple[Config, str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        _die(f"{path}: cannot read: {exc.strerror}")
    try:
        return load_config_text(text, path), text
    except ConfigError as exc:
        _die(str(exc))


def _check(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            config = load_config_text(f.read(), path)
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(config.hosts)} proxy hosts)")
    for line in certificate_lines(config) + listing_lines(config):
        print(f"  {line}")
    return 0


def _run(config: Config, text: str, log_format: str = "text") -> int:
    try:
        return asyncio.run(Arbiter(config, text, log_format).run())
    except ListenError as exc:
        _die(str(exc))


def _demo(log_format: str) -> int:
    text = resources.files("charon.config").joinpath("default.toml").read_text("utf-8")
    config = load_config_text(text, "<default>")
    # Until the supervisor's loop handles signals, a TERM must still run the `finally` below,
    # also one that comes while Popen is under way: it waits, blocked, until the `try`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    backend = subprocess.Popen(
        [sys.executable, "-m", "charon.demo.backend", "--port", str(DEMO_BACKEND_PORT)],
        preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM}),
    )
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        _wait_for(f"http://127.0.0.1:{DEMO_BACKEND_PORT}/healthz", backend)
        listen = config.server.listen[0]
        print(f"\n  Charon demo: open http://{listen}/ (proxied to the demo backend)", flush=True)
        if config.admin.listen is not None:
            admin = f"http://{config.admin.listen}"
            print(f"  Admin:       {admin}/ (live log), {admin}/metrics\n", flush=True)
        return _run(config, text, log_format)
    finally:
        backend.terminate()
        try:
            backend.wait(5)
        except subprocess.TimeoutExpired:
            backend.kill()


def _wait_for(url: str, process: subprocess.Popen[bytes], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _die(f"the demo backend exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    _die(f"the demo backend did not answer on {url} within {seconds:.0f}s")


def _die(message: str) -> NoReturn:
    print(f"charon: {message}", file=sys.stderr)
    sys.exit(1)
