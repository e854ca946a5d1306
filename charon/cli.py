"""The `charon` command: demo, run, check, reload, logs, hash-password (`charon --help`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import NoReturn

from charon import __version__, cli_demo, cli_hash, cli_logs, cli_reload, logsetup
from charon.config import Config, ConfigError, load_config_text
from charon.config.backends import listing_lines
from charon.config.hostrules import listing_lines as rules_lines
from charon.supervisor.arbiter import Arbiter
from charon.supervisor.sockets import ListenError
from charon.tls.listing import certificate_lines

EXIT_CODES = """\
exit status:
  0  success (run and demo: stopped by a signal, TERM included)
  1  failure: an invalid config (FILE:LINE: reason), a port in use, a reload
     refused or not confirmed, no running Charon found
  2  wrong usage (an unknown option, a missing argument)

`charon COMMAND --help` shows a command's options. Docs: README.md and
docs/operations.md in the source tree."""


class _OneLineHelp(argparse.RawDescriptionHelpFormatter):
    """Every command's help on its name's line (`hash-password` is longer than the default
    column allows)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)
        self._action_max_length = 20  # (argparse measures subcommands 2 columns short)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="charon", description="Charon, a reverse proxy for HTTP and WebSocket.",
        epilog=EXIT_CODES, formatter_class=_OneLineHelp,
    )
    top.add_argument("--version", action="version", version=f"charon {__version__}",
                     help="print the version and exit")
    commands = top.add_subparsers(dest="command", required=True, title="commands",
                                  metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="try it: the proxy in front of a built-in demo app",
        description="Run the proxy on its embedded config in front of a built-in demo "
                    "backend (a chat over WebSocket and the headers the backend saw).",
    )
    demo.add_argument("--listen", type=cli_demo.address, default=cli_demo.LISTEN,
                      metavar="IP:PORT", help=f"the proxy's address (default {cli_demo.LISTEN})")
    demo.add_argument("--admin", type=cli_demo.address, default=cli_demo.ADMIN,
                      metavar="IP:PORT",
                      help=f"the admin listener: live log, metrics (default {cli_demo.ADMIN})")
    demo.add_argument("--backend-port", type=int, default=cli_demo.BACKEND.port, metavar="PORT",
                      help=f"the demo backend's port on {cli_demo.BACKEND.host} (default "
                           f"{cli_demo.BACKEND.port}; a free one when it is taken, or with 0)")
    run = commands.add_parser("run", help="run the proxy on a config file",
                              description="Run the proxy (the supervisor and its workers).")
    run.add_argument("--config", required=True, metavar="PATH")
    for command in (demo, run):
        command.add_argument(
            "--log-format", choices=logsetup.FORMATS, default="text",
            help="Charon's own log lines on stderr (default: text)",
        )
    check = commands.add_parser("check", help="validate a config file",
                                description="Validate a config file: exit 0, or 1 and "
                                            "FILE:LINE: reason.")
    check.add_argument("path")
    reload = commands.add_parser(
        "reload", help="reload a running proxy's config, wait for the result",
        description="Validate the config file, signal the supervisor running on it and wait "
                    "until its admin listener reports the result (exit 0: applied).",
    )
    reload.add_argument("--config", required=True, metavar="PATH")
    reload.add_argument("--pid", type=int, help="the supervisor's PID (e.g. systemd's $MAINPID)")
    reload.add_argument("--pidfile", metavar="PATH",
                        help="default: [server] pidfile, else the runtime file of --config")
    reload.add_argument(
        "--restart-workers", action="store_true",
        help="start a new generation of workers (new code after an upgrade), as SIGUSR2 does",
    )
    cli_logs.add_parser(commands)
    cli_hash.add_parser(commands)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)

    if args.command == "check":
        sys.exit(_check(args.path))
    if args.command == "logs":
        sys.exit(cli_logs.main(args))
    if args.command == "hash-password":
        sys.exit(cli_hash.main(args))
    if args.command == "reload":
        sys.exit(cli_reload.reload(
            _read(args.config)[0], args.pid, args.pidfile, args.restart_workers
        ))
    if args.command == "run":
        config, text = _read(args.config)
        logsetup.setup("supervisor", args.log_format)
        sys.exit(_run(config, text, args.log_format))
    logsetup.setup("supervisor", args.log_format)
    try:
        sys.exit(cli_demo.run(
            args.listen, args.admin, args.backend_port,
            lambda config, text: _run(config, text, args.log_format),
        ))
    except cli_demo.DemoError as exc:
        print(f"charon demo: {exc}", file=sys.stderr)
        sys.exit(1)


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
    for line in certificate_lines(config) + listing_lines(config) + rules_lines(config):
        print(f"  {line}")
    return 0


def _run(config: Config, text: str, log_format: str = "text") -> int:
    try:
        return asyncio.run(Arbiter(config, text, log_format).run())
    except ListenError as exc:
        _die(str(exc))


def _die(message: str) -> NoReturn:
    print(f"charon: {message}", file=sys.stderr)
    sys.exit(1)
