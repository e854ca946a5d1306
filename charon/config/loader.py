"""Reads a TOML config file and turns it into the validated `Config` of `charon.config.model`.

Every problem is a `ConfigError` that names the file, the line and the key: unknown keys and
tables, wrong types and bad values are all errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable, Collection
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import tomli

from charon.config import values
from charon.config.lines import KeyLines, KeyPath
from charon.config.model import (
    AdminConfig,
    Config,
    IPNetwork,
    Limits,
    ListenAddress,
    Location,
    ProxyHost,
    ServerConfig,
    Timeouts,
    WebSocketSettings,
)

T = TypeVar("T")

DEFAULT_LISTEN = ListenAddress("127.0.0.1", 8080)
DEFAULT_ADMIN_LISTEN = ListenAddress("127.0.0.1", 9090)
MAX_WORKERS = 64

_TOP_KEYS = ("server", "admin", "timeouts", "hosts")
_SERVER_KEYS = (
    "listen",
    "workers",
    "trusted_proxies",
    "shutdown_timeout",
    "drain_timeout",
    "pidfile",
    "access_log",
    "heartbeat_timeout",
    "max_retiring_generations",
    "underscores_in_headers",
    "limits",
)
_LIMIT_MINIMUMS = {"max_request_target": 256, "max_header_bytes": 1024, "max_header_count": 8}
_TIMEOUT_KEYS = tuple(f.name for f in dataclasses.fields(Timeouts))
_WEBSOCKET_KEYS = ("websocket_max_frame_size", "websocket_idle_timeout", "websocket_ping_interval")
_LOCATION_KEYS = ("path", "upstream", "timeouts", *_WEBSOCKET_KEYS)
_HOST_KEYS = ("domains", "upstream", "timeouts", "locations", *_WEBSOCKET_KEYS)
_MIN_FRAME_SIZE = 126


class ConfigError(Exception):
    """A config problem, with where it is: `str(err)` is "PATH:LINE: message"."""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path = path
        self.line = line  # 0 if unknown
        self.message = message
        super().__init__(path, line, message)  # args match __init__: picklable

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


def load_config(path: str) -> Config:
    """Reads and validates the config file at `path`."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(path, 0, f"cannot read the config file: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(path, line, "the config file is not valid UTF-8") from None
    return load_config_text(text, path)


def load_config_text(text: str, path: str) -> Config:
    """Validates config `text`; `path` is only used in messages and stored in `Config.path`."""
    try:
        data = tomli.loads(text)
    except tomli.TOMLDecodeError as err:
        raise _syntax_error(err, text, path) from None
    root = _Table(_Source(path, KeyLines(text)), (), data)
    return _config(root)


def default_config() -> Config:
    """The embedded config used by `charon demo` (charon/config/default.toml)."""
    text = resources.files("charon.config").joinpath("default.toml").read_text("utf-8")
    return load_config_text(text, "<default>")


def _syntax_error(err: tomli.TOMLDecodeError, text: str, path: str) -> ConfigError:
    line: int | None = getattr(err, "lineno", None)
    message: str | None = getattr(err, "msg", None)
    if line is None or message is None:  # older tomli: only the formatted message
        match = re.search(r"\(at line (\d+)", str(err))
        line = int(match[1]) if match else text.count("\n") + 1
        message = re.sub(r"\s*\(at (line \d+, column \d+|end of document)\)$", "", str(err))
    return ConfigError(path, line, f"invalid TOML: {message}")


# -- tables ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    path: str
    lines: KeyLines


class _Table:
    """One TOML table under validation: its raw data, its key path and its name for messages."""

    def __init__(self, source: _Source, path: KeyPath, data: dict[str, Any]) -> None:
        self.source = source
        self.path = path
        self.data = data

    @property
    def name(self) -> str:
        dotted = ".".join(str(part) for part in self.path if isinstance(part, str))
        return f"[[{dotted}]]" if self.path and isinstance(self.path[-1], int) else f"[{dotted}]"

    @property
    def line(self) -> int:
        """The line of the table's header (or of the key that defines it)."""
        return self.source.lines.line_of(self.path)

    def label(self, key: str) -> str:
        return f"{self.name} {key}" if self.path else key

    def error_at(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(self.source.path, self.source.lines.line_of(path), message)

    def error(self, key: str, detail: str) -> ConfigError:
        """An error about the value of `key`, reported at its line."""
        return self.error_at((*self.path, key), f"{self.label(key)}: {detail}")

    def check_keys(self, allowed: Collection[str]) -> None:
        for key, value in self.data.items():
            if key not in allowed:
                raise self.error_at((*self.path, key), self._unknown(key, value, allowed))

    def _unknown(self, key: str, value: Any, allowed: Collection[str]) -> str:
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        if self.path:
            return f"unknown key '{key}' in {self.name}{hint}"
        if isinstance(value, dict):
            return f"unknown table [{key}]{hint}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return f"unknown table [[{key}]]{hint}"
        return f"unknown key '{key}' at the top level{hint}"

    def get(self, key: str, parse: Callable[[Any], T], default: T) -> T:
        if key not in self.data:
            return default
        return self.parse(key, parse)

    def require(self, key: str, parse: Callable[[Any], T]) -> T:
        if key not in self.data:
            raise self.error_at(self.path, f"missing required key '{key}' in {self.name}")
        return self.parse(key, parse)

    def parse(self, key: str, parse: Callable[[Any], T]) -> T:
        try:
            return parse(self.data[key])
        except ValueError as err:
            raise self.error(key, str(err)) from None

    def elements(self, key: str, items: list[Any], parse: Callable[[Any], T]) -> list[T]:
        """Parses each array element; an error is reported at the element's line."""
        parsed = []
        for index, item in enumerate(items):
            try:
                parsed.append(parse(item))
            except ValueError as err:
                raise self.error_at((*self.path, key, index), f"{self.label(key)}: {err}") from None
        return parsed

    def table(self, key: str) -> _Table:
        """A sub-table (or inline table); an empty one when absent."""
        data = self.data.get(key, {})
        if not isinstance(data, dict):
            raise self.error(key, f"expected a table, got {values.describe(data)}")
        return _Table(self.source, (*self.path, key), data)

    def tables(self, key: str) -> list[_Table]:
        """An array of tables ([[key]]); empty when absent."""
        items = self.data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            sub = _Table(self.source, (*self.path, key, 0), {})
            got = "an array of other values" if isinstance(items, list) else values.describe(items)
            raise self.error(key, f"expected {sub.name} tables, got {got}")
        return [_Table(self.source, (*self.path, key, i), item) for i, item in enumerate(items)]


# -- the sections ------------------------------------------------------------------------------


def _config(root: _Table) -> Config:
    root.check_keys(_TOP_KEYS)
    server = _server(root.table("server"))
    admin = _admin(root.table("admin"), server)
    timeouts = _timeouts(root.table("timeouts"), Timeouts())
    hosts = _hosts(root, timeouts)
    return Config(root.source.path, server, admin, timeouts, hosts)


def _server(table: _Table) -> ServerConfig:
    table.check_keys(_SERVER_KEYS)
    default_workers = min(os.cpu_count() or 1, MAX_WORKERS)
    return ServerConfig(
        listen=_listen(table),
        workers=table.get("workers", lambda v: values.integer(v, 1, MAX_WORKERS), default_workers),
        trusted_proxies=_trusted_proxies(table),
        shutdown_timeout=table.get("shutdown_timeout", values.duration, 30.0),
        drain_timeout=table.get("drain_timeout", values.duration, 300.0),
        pidfile=table.get("pidfile", values.string, None),
        access_log=table.get("access_log", values.string, None),
        heartbeat_timeout=table.get("heartbeat_timeout", values.at_least_1s, 10.0),
        max_retiring_generations=table.get(
            "max_retiring_generations", lambda v: values.integer(v, 0, 16), 2
        ),
        underscores_in_headers=table.get("underscores_in_headers", _boolean, False),
        limits=_limits(table.table("limits")),
    )


def _listen(table: _Table) -> tuple[ListenAddress, ...]:
    if "listen" not in table.data:
        return (DEFAULT_LISTEN,)
    raw = table.data["listen"]
    items = [raw] if isinstance(raw, str) else table.parse("listen", _array_of('"IP:PORT" strings'))
    if not items:
        raise table.error("listen", "must not be empty")
    addresses = table.elements("listen", items, values.listen_address)
    for index, address in enumerate(addresses):
        if address in addresses[:index]:
            raise table.error_at(
                (*table.path, "listen", index),
                f"{table.label('listen')}: {address} is listed twice",
            )
    return tuple(addresses)


def _trusted_proxies(table: _Table) -> tuple[IPNetwork, ...]:
    items: list[Any] = table.get("trusted_proxies", _array_of("CIDRs or IP addresses"), [])
    return tuple(table.elements("trusted_proxies", items, values.network))


def _limits(table: _Table) -> Limits:
    table.check_keys(_LIMIT_MINIMUMS)
    settings = {
        key: table.get(key, _integer_at_least(minimum), getattr(Limits(), key))
        for key, minimum in _LIMIT_MINIMUMS.items()
    }
    return Limits(**settings)


def _admin(table: _Table, server: ServerConfig) -> AdminConfig:
    table.check_keys(("listen", "token", "token_file", "allowed_origins", "events"))
    default: ListenAddress | None = DEFAULT_ADMIN_LISTEN
    listen = table.get("listen", _admin_listen, default)
    if listen is not None and listen in server.listen:
        if "listen" in table.data:
            raise table.error("listen", f"{listen} is also a [server] listen address")
        raise table.error_at(
            ("server", "listen"),
            f"[server] listen: {listen} is also the default [admin] listen address "
            "(set [admin] listen to another address, or to false to disable it)",
        )
    origins: list[Any] = table.get("allowed_origins", _array_of("origin strings"), [])
    allowed = tuple(dict.fromkeys(table.elements("allowed_origins", origins, values.origin)))
    events = table.get("events", _boolean, True)
    return AdminConfig(listen, _admin_token(table), allowed, events)


def _admin_token(table: _Table) -> str | None:
    """[admin] token, or the contents of token_file; None when neither is set (or token is "")."""
    if "token" in table.data and "token_file" in table.data:
        raise table.error("token_file", "set either token or token_file, not both")
    if "token" in table.data:
        return table.parse("token", values.admin_token) or None
    if "token_file" not in table.data:
        return None
    name = table.parse("token_file", lambda v: values.string(v, "a file path string"))
    base = Path(table.source.path).parent if table.source.path != "<default>" else Path()
    path = base / Path(name).expanduser()
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
        shown = values.quote(str(path))
        raise table.error("token_file", f"cannot read {shown}: {reason}") from None
    token = text.strip()
    if not token:
        raise table.error("token_file", f"{values.quote(str(path))} is empty")
    try:
        return values.admin_token(token)
    except ValueError as err:
        shown = values.quote(str(path))
        raise table.error("token_file", f"the token in {shown} {err}") from None


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {values.describe(value)}")
    return value


def _admin_listen(value: Any) -> ListenAddress | None:
    if value is False or value == "":
        return None
    if value is True:
        raise ValueError('expected "IP:PORT", "" or false, got true')
    return values.listen_address(value)


_TIMEOUT_VALUES: dict[str, Callable[[Any], Any]] = {
    "body": values.duration,
    "body_min_rate": lambda v: values.size(v, 0),
}


def _timeouts(table: _Table, inherited: Timeouts) -> Timeouts:
    table.check_keys(_TIMEOUT_KEYS)
    overrides = {
        key: table.parse(key, _TIMEOUT_VALUES.get(key, values.positive_duration))
        for key in _TIMEOUT_KEYS
        if key in table.data
    }
    return dataclasses.replace(inherited, **overrides)


def _websocket(table: _Table, inherited: WebSocketSettings) -> WebSocketSettings:
    return WebSocketSettings(
        max_frame_size=table.get(
            "websocket_max_frame_size",
            lambda v: values.size(v, _MIN_FRAME_SIZE),
            inherited.max_frame_size,
        ),
        idle_timeout=table.get("websocket_idle_timeout", values.duration, inherited.idle_timeout),
        ping_interval=table.get(
            "websocket_ping_interval", values.duration, inherited.ping_interval
        ),
    )


# -- hosts and locations -----------------------------------------------------------------------


def _hosts(root: _Table, timeouts: Timeouts) -> tuple[ProxyHost, ...]:
    tables = root.tables("hosts")
    if not tables:
        raise root.error_at(("hosts",), "no [[hosts]]: nothing to proxy")
    seen: dict[str, int] = {}  # domain -> line of the host that has it
    return tuple(_host(table, timeouts, seen) for table in tables)


def _host(table: _Table, timeouts: Timeouts, seen: dict[str, int]) -> ProxyHost:
    table.check_keys(_HOST_KEYS)
    domains = _domains(table, seen)
    upstream = table.require("upstream", values.upstream)
    host_timeouts = _timeouts(table.table("timeouts"), timeouts)
    websocket = _websocket(table, WebSocketSettings())
    locations = _locations(table, host_timeouts, websocket)
    return ProxyHost(domains, upstream, locations, host_timeouts, websocket, line=table.line)


def _domains(table: _Table, seen: dict[str, int]) -> tuple[str, ...]:
    items = table.require("domains", _array_of("domain names"))
    if not items:
        raise table.error("domains", "must list at least one domain")
    domains = table.elements("domains", items, values.domain)
    for domain in domains:
        if domain in seen:
            raise table.error_at(
                (*table.path, "domains"),
                f"domain '{domain}' is already used by the host at line {seen[domain]}",
            )
        seen[domain] = table.line
    return tuple(domains)


def _locations(
    host: _Table, timeouts: Timeouts, websocket: WebSocketSettings
) -> tuple[Location, ...]:
    locations: list[Location] = []
    seen: dict[str, int] = {}  # path -> line of its location
    for table in host.tables("locations"):
        table.check_keys(_LOCATION_KEYS)
        path = table.require("path", values.location_path)
        if path in seen:
            raise table.error(
                "path", f"'{path}' is already used by the location at line {seen[path]}"
            )
        seen[path] = table.line
        location = Location(
            path=path,
            upstream=table.require("upstream", values.upstream),
            timeouts=_timeouts(table.table("timeouts"), timeouts),
            websocket=_websocket(table, websocket),
        )
        locations.append(location)
    locations.sort(key=lambda location: len(location.path), reverse=True)
    return tuple(locations)


# -- value checks used above -------------------------------------------------------------------


def _array_of(what: str) -> Callable[[Any], list[Any]]:
    return lambda value: values.string_list(value, what)


def _integer_at_least(minimum: int) -> Callable[[Any], int]:
    return lambda value: values.integer(value, minimum)
