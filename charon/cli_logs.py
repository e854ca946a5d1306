"""`charon logs`: follow the live log of a running Charon from its admin listener (/logs).

    charon logs [--admin 127.0.0.1:9090] [--host H] [--status 5xx] [--client IP] [--path /api]
                [--kind request,ws_close] [--backlog N] [--token T] [--json]

Readable lines by default (colored when stdout is a terminal and NO_COLOR is not set); --json
prints each record as the JSON line the server sent. Ctrl-C stops it; it exits 1 when it cannot
connect or the stream ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any, TextIO

import aiohttp

from charon.admin.logs import KINDS, LogFilter

DEFAULT_ADMIN = "127.0.0.1:9090"
CONNECT_TIMEOUT = 10.0
TOKEN_ENV = "CHARON_ADMIN_TOKEN"


def add_parser(commands: Any) -> None:
    """The `logs` subcommand, on the subparsers of `charon`."""
    p = commands.add_parser(
        "logs", help="follow the live log of a running Charon",
        description="Follow the live log of a running Charon (its admin listener's /logs).",
    )
    p.add_argument("--admin", metavar="IP:PORT",
                   help=f"the admin listener (default: {DEFAULT_ADMIN}, or the one in --config)")
    p.add_argument("--config", metavar="PATH",
                   help="take the admin address and token from this config file")
    p.add_argument("--host", help="only this proxy host (its first domain)")
    p.add_argument("--status", help="only this status class (2xx, 4xx, 5xx...) or code (404)")
    p.add_argument("--client", metavar="IP", help="only this client IP")
    p.add_argument("--path", help="only paths starting with this")
    p.add_argument("--kind", help=f"only these kinds, comma-separated: {','.join(KINDS)}")
    p.add_argument("--backlog", type=int, metavar="N",
                   help="recent records to show first (default 100, at most 500)")
    p.add_argument("--token", help=f"the admin token (default: ${TOKEN_ENV}, or --config's)")
    p.add_argument("--json", action="store_true", help="print the raw JSON records")


def main(args: argparse.Namespace) -> int:
    try:
        url, token = _target(args)
        params = _params(args)
        LogFilter.from_query(params)  # the server would say 400: say why here
    except ValueError as exc:
        print(f"charon logs: {exc}", file=sys.stderr)
        return 2
    color = not args.json and sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    out = _Printer(sys.stdout, raw=args.json, color=color)
    try:
        return asyncio.run(_follow(url, params, token, out))
    except KeyboardInterrupt:  # a Ctrl-C before the handler was in place
        return 0
    except BrokenPipeError:  # `charon logs | head`
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _target(args: argparse.Namespace) -> tuple[str, str | None]:
    """The /logs URL and the token, from the options (and --config)."""
    admin, token = args.admin, args.token
    if args.config:
        from charon.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if admin is None:
            if config.admin.listen is None:
                raise ValueError(f"{args.config}: the admin listener is disabled ([admin] listen)")
            admin = str(config.admin.listen)
        if token is None:
            token = config.admin.token
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    return _logs_url(admin or DEFAULT_ADMIN), token


def _logs_url(admin: str) -> str:
    admin = admin.strip().rstrip("/")
    if "://" not in admin:
        return f"ws://{admin}/logs"
    scheme, _, rest = admin.partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme.lower(), scheme.lower())
    if scheme not in ("ws", "wss"):
        raise ValueError(f"--admin: expected IP:PORT or an http:// URL, got {admin!r}")
    return f"{scheme}://{rest}" + ("" if "/" in rest else "/logs")


def _params(args: argparse.Namespace) -> dict[str, str]:
    params = {
        name: value
        for name in ("host", "status", "client", "path", "kind")
        if (value := getattr(args, name))
    }
    if args.backlog is not None:
        if args.backlog < 0:
            raise ValueError(f"--backlog: must not be negative, got {args.backlog}")
        params["backlog"] = str(args.backlog)
    return params


async def _follow(url: str, params: dict[str, str], token: str | None, out: _Printer) -> int:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    where = url.split("/logs", 1)[0]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            connecting = asyncio.ensure_future(
                session.ws_connect(url, params=params, headers=headers, heartbeat=30.0,
                                   max_msg_size=1 << 20)
            )
            first: list[asyncio.Future[Any]] = [connecting, stop]
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            if not connecting.done():
                connecting.cancel()
                return 0
            ws = connecting.result()
        except aiohttp.WSServerHandshakeError as exc:
            return _fail(f"{where} refused the live log: {_refusal(exc.status)}")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return _fail(f"cannot connect to {where}: {_reason(exc)}")
        async with ws:
            reading = asyncio.ensure_future(_read(ws, out))
            either: list[asyncio.Future[Any]] = [reading, stop]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
                return 0
            reading.result()  # BrokenPipeError goes up from here
            code = ws.close_code
            detail = f" (close code {code})" if code is not None else ""
            return _fail(f"the live log stream from {where} ended{detail}")


async def _read(ws: aiohttp.ClientWebSocketResponse, out: _Printer) -> None:
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            out.show(message.data)
        elif message.type == aiohttp.WSMsgType.ERROR:
            break


def _refusal(status: int) -> str:
    if status == 401:
        return "401 Unauthorized: it needs the admin token (--token, or $" + TOKEN_ENV + ")"
    if status == 403:
        return "403 Forbidden"
    if status == 404:
        return "404 Not Found: is this Charon's admin listener, and a version with the live log?"
    if status == 400:
        return "400 Bad Request: check the filters"
    return f"HTTP {status}"


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "os_error", None)
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:.0f}s"
    return str(exc) or type(exc).__name__


def _fail(message: str) -> int:
    print(f"charon logs: {message}", file=sys.stderr)
    return 1


# -- lines -------------------------------------------------------------------------------------

_RESET = "\033[0m"
_DIM = "\033[2m"
_BOLD = "\033[1m"
_STATUS_COLORS = {1: "\033[36m", 2: "\033[32m", 3: "\033[36m", 4: "\033[33m", 5: "\033[31m"}
_MAGENTA = "\033[35m"
_RED = "\033[31m"
_CONTROL = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0)])


def clean(value: Any) -> str:
    """A value as text with no control characters (no terminal escapes from request data)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(f"\\x{ord(c):02x}" if ord(c) in _CONTROL else c for c in text)


def size(count: Any) -> str:
    if not isinstance(count, int | float):
        return "?"
    for unit in ("B", "KiB", "MiB"):
        if count < 1024 or unit == "MiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"  # pragma: no cover


def seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "?"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"


class _Printer:
    def __init__(self, stream: TextIO, raw: bool, color: bool) -> None:
        self.stream = stream
        self.raw = raw
        self.color = color
        try:
            "→".encode(stream.encoding or "ascii")
            self.arrow = "→"
        except (LookupError, UnicodeEncodeError):
            self.arrow = "->"

    def show(self, text: str) -> None:
        if self.raw:
            line = text
        else:
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            line = self.format(record) if isinstance(record, dict) else clean(text)
        self.stream.write(line + "\n")
        self.stream.flush()

    def paint(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text

    def format(self, r: dict[str, Any]) -> str:
        kind = r.get("kind")
        stamp = r.get("time")
        when = (
            time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp * 1000) % 1000:03d}"
            if isinstance(stamp, int | float) else "--:--:--.---"
        )
        head = f"{self.paint(_DIM, when)} "
        where = f"{self.paint(_BOLD, clean(r.get('host', '-')))} {clean(r.get('client_ip', '-'))}"
        if kind == "request":
            status = r.get("status")
            tint = _STATUS_COLORS.get(status // 100, "") if isinstance(status, int) else ""
            denied = r.get("denied")
            return (
                f"{head}{where} {clean(r.get('method', '?'))} {clean(r.get('path', ''))} "
                f"{self.arrow} {self.paint(tint, clean(status))} "
                f"{seconds(r.get('duration'))} {size(r.get('response_bytes'))}"
                + (f" denied={clean(denied)}" if denied else "")
            )
        if kind == "ws_open":
            proto = r.get("subprotocol")
            extra = f" ({clean(proto)})" if proto else ""
            opened = self.paint(_MAGENTA, "WS open")
            return f"{head}{where} {opened} {clean(r.get('path', ''))}{extra}"
        if kind == "ws_close":
            by = r.get("closed_by")
            return (
                f"{head}{where} {self.paint(_MAGENTA, 'WS close')} {clean(r.get('path', ''))} "
                f"code {clean(r.get('close_code'))}{' by ' + clean(by) if by else ''}, "
                f"{seconds(r.get('duration'))}, "
                f"in {clean(r.get('messages_in'))} msgs/{size(r.get('bytes_in'))}, "
                f"out {clean(r.get('messages_out'))} msgs/{size(r.get('bytes_out'))}"
            )
        if kind == "upstream_error":
            why = clean(r.get("error", "error"))
            if r.get("message"):  # (records of an earlier version have the kind only)
                why = (f"{clean(r.get('upstream', ''))} {clean(r.get('phase', ''))}: "
                       f"{clean(r['message'])}")
            return (
                f"{head}{where} {self.paint(_RED, 'upstream ' + why)} "
                f"{clean(r.get('path', ''))} {self.arrow} {clean(r.get('status'))}"
            )
        if kind == "worker_exit":
            return (
                f"{head}{self.paint(_RED, 'worker exit')} worker {clean(r.get('worker_id'))} "
                f"(pid {clean(r.get('pid'))}) {clean(r.get('status'))}, "
                f"restart in {seconds(r.get('restart_in'))}"
            )
        if kind == "reload":
            error = r.get("error")
            return (
                f"{head}{self.paint(_BOLD, 'config reload')} {clean(r.get('result'))} "
                f"{clean(r.get('path', ''))}"
                f"{' (config version ' + clean(r['version']) + ')' if r.get('version') else ''}"
                f"{': ' + clean(error) if error else ''}"
            )
        if kind == "upstream_health":
            healthy = r.get("healthy") is True
            state = self.paint(_STATUS_COLORS[2] if healthy else _RED,
                               "target up" if healthy else "target down")
            return (f"{head}{self.paint(_BOLD, clean(r.get('host', '-')))} {state} "
                    f"{clean(r.get('target', '?'))}: {clean(r.get('reason', ''))}")
        if kind == "dropped":
            dropped = self.paint(_RED, f"{clean(r.get('count'))} records dropped")
            since = r.get("since")
            lasted = seconds(stamp - since) if isinstance(stamp, int | float) and isinstance(
                since, int | float) else "?"
            if r.get("by") == "worker":
                return (f"{head}{dropped} by worker {clean(r.get('worker'))} "
                        f"(pid {clean(r.get('pid'))}) over {lasted}: the supervisor did not "
                        "take them in time")
            return f"{head}{dropped} over {lasted} (this client did not keep up)"
        return head + clean(json.dumps(r))
