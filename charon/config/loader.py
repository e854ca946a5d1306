"""Reads a TOML config file and turns it into the validated `Config` of `charon.config.model`.

Every problem is a `ConfigError` that names the file, the line and the key: unknown keys and
tables, wrong types and bad values are all errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from charon.config import backends, hostrules, limits, syntax, tls, values
from charon.config.lines import KeyLines
from charon.config.model import (
    AdminConfig,
    Backends,
    Config,
    IPNetwork,
    Limits,
    ListenAddress,
    Location,
    ProxyHost,
    ServerConfig,
    Timeouts,
    TlsConfig,
    WebSocketSettings,
)
from charon.config.rules import Rules
from charon.config.table import ConfigError, Source, Table, address_list, array_of, boolean

__all__ = ["ConfigError", "default_config", "load_config", "load_config_text"]

DEFAULT_LISTEN = ListenAddress("127.0.0.1", 8080)
DEFAULT_ADMIN_LISTEN = ListenAddress("127.0.0.1", 9090)
MAX_WORKERS = 64

_TOP_KEYS = ("server", "admin", "timeouts", "tls", "hosts", "access")
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
    "tls_listen",
    *limits.SERVER_KEYS,
)
_LIMIT_MINIMUMS = {"max_request_target": 256, "max_header_bytes": 1024, "max_header_count": 8}
_TIMEOUT_KEYS = tuple(f.name for f in dataclasses.fields(Timeouts))
_WEBSOCKET_KEYS = ("websocket_max_frame_size", "websocket_idle_timeout", "websocket_ping_interval")
_LOCATION_KEYS = (
    "path", *backends.KEYS, "timeouts", *_WEBSOCKET_KEYS, *tls.LOCATION_KEYS, *hostrules.KEYS
)
_HOST_KEYS = (
    "domains", *backends.KEYS, "timeouts", "locations", *_WEBSOCKET_KEYS, *tls.HOST_KEYS,
    *hostrules.KEYS,
)
_MIN_FRAME_SIZE = 126


def load_config(path: str, *, check_files: bool = True) -> Config:
    """Reads and validates the config file at `path` (see load_config_text for check_files)."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(path, 0, f"cannot read the config file: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(path, line, "the config file is not valid UTF-8") from None
    return load_config_text(text, path, check_files=check_files)


def load_config_text(text: str, path: str, *, check_files: bool = True) -> Config:
    """Validates config `text`; `path` is stored in `Config.path`, named in messages, and
    relative file names are relative to its directory.

    check_files=False skips reading certificate and CA files (their paths are still made
    absolute): for a process re-reading a config that was checked already, which must not fail
    to start because a file changed or a certificate expired since.
    """
    try:
        data = syntax.toml.loads(text)
    except syntax.toml.TOMLDecodeError as err:
        raise _syntax_error(err, text, path) from None
    root = Table(Source(path, KeyLines(text), check_files), (), data)
    return _config(root)


def default_config() -> Config:
    """The embedded config used by `charon demo` (charon/config/default.toml)."""
    text = resources.files("charon.config").joinpath("default.toml").read_text("utf-8")
    return load_config_text(text, "<default>")


def _syntax_error(err: syntax.toml.TOMLDecodeError, text: str, path: str) -> ConfigError:
    line, message = syntax.describe(err, text)
    return ConfigError(path, line, f"invalid TOML: {message}")


# -- the sections ------------------------------------------------------------------------------


def _config(root: Table) -> Config:
    root.check_keys(_TOP_KEYS)
    server = _server(root.table("server"))
    admin = _admin(root.table("admin"), server)
    tls.check_admin_overlap(root.table("server"), server, admin.listen)
    tls_config = tls.tls_config(root.table("tls"), server)
    timeouts = _timeouts(root.table("timeouts"), Timeouts())
    rules = Rules(max_body_size=limits.default_body_size(root.table("server")))
    context = hostrules.context(root, rules)
    hosts = _hosts(root, timeouts, server, tls_config, context)
    return Config(root.source.path, server, admin, timeouts, hosts, tls_config)


def _server(table: Table) -> ServerConfig:
    table.check_keys(_SERVER_KEYS)
    default_workers = min(os.cpu_count() or 1, MAX_WORKERS)
    listen = _listen(table)
    tls_listen = tls.tls_listen(table, listen)
    return ServerConfig(
        listen=listen,
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
        underscores_in_headers=table.get("underscores_in_headers", boolean, False),
        limits=_limits(table.table("limits")),
        tls_listen=tls_listen,
        **limits.server_settings(table, listen, tls_listen),
    )


def _listen(table: Table) -> tuple[ListenAddress, ...]:
    if "listen" not in table.data:
        return (DEFAULT_LISTEN,)
    addresses = address_list(table, "listen")
    if not addresses:
        raise table.error("listen", "must not be empty")
    return addresses


def _trusted_proxies(table: Table) -> tuple[IPNetwork, ...]:
    items: list[Any] = table.get("trusted_proxies", array_of("CIDRs or IP addresses"), [])
    return tuple(table.elements("trusted_proxies", items, values.network))


def _limits(table: Table) -> Limits:
    table.check_keys(_LIMIT_MINIMUMS)
    settings = {
        key: table.get(key, _integer_at_least(minimum), getattr(Limits(), key))
        for key, minimum in _LIMIT_MINIMUMS.items()
    }
    return Limits(**settings)


def _admin(table: Table, server: ServerConfig) -> AdminConfig:
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
    origins: list[Any] = table.get("allowed_origins", array_of("origin strings"), [])
    allowed = tuple(dict.fromkeys(table.elements("allowed_origins", origins, values.origin)))
    events = table.get("events", boolean, True)
    return AdminConfig(listen, _admin_token(table), allowed, events)


def _admin_token(table: Table) -> str | None:
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


def _timeouts(table: Table, inherited: Timeouts) -> Timeouts:
    table.check_keys(_TIMEOUT_KEYS)
    overrides = {
        key: table.parse(key, _TIMEOUT_VALUES.get(key, values.positive_duration))
        for key in _TIMEOUT_KEYS
        if key in table.data
    }
    return dataclasses.replace(inherited, **overrides)


def _websocket(table: Table, inherited: WebSocketSettings) -> WebSocketSettings:
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


def _hosts(
    root: Table,
    timeouts: Timeouts,
    server: ServerConfig,
    tls_config: TlsConfig,
    context: hostrules.Context,
) -> tuple[ProxyHost, ...]:
    tables = root.tables("hosts")
    if not tables:
        raise root.error_at(("hosts",), "no [[hosts]]: nothing to proxy")
    seen: dict[str, int] = {}  # domain -> line of the host that has it
    return tuple(_host(table, timeouts, seen, server, tls_config, context) for table in tables)


def _host(
    table: Table,
    timeouts: Timeouts,
    seen: dict[str, int],
    server: ServerConfig,
    tls_config: TlsConfig,
    context: hostrules.Context,
) -> ProxyHost:
    table.check_keys(_HOST_KEYS)
    domains = _domains(table, seen)
    backend_tls = tls.backend_tls(table, tls.BackendTls())
    host_backends = backends.backends(table, domains[0], backend_tls)
    host_timeouts = _timeouts(table.table("timeouts"), timeouts)
    websocket = _websocket(table, WebSocketSettings())
    rules = hostrules.host_rules(table, host_backends.name, context)
    locations = _locations(
        table, host_backends, host_timeouts, websocket, backend_tls, (context, rules)
    )
    every = backends.upstreams(host_backends, *(loc.backends for loc in locations))
    tls.check_backend_tls_used(table, every)
    # Last: reading and checking certificate files costs the most.
    host_tls = tls.host_tls(table, server, tls_config, domains)
    return ProxyHost(
        domains, host_backends, locations, host_timeouts, websocket,
        line=table.line,
        tls=host_tls.tls, force_https=host_tls.force_https,
        hsts=rules.hsts(table, host_tls.hsts), rules=rules.rules,
    )


def _domains(table: Table, seen: dict[str, int]) -> tuple[str, ...]:
    items = table.require("domains", array_of("domain names"))
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
    host: Table,
    host_backends: Backends,
    timeouts: Timeouts,
    websocket: WebSocketSettings,
    backend_tls: tls.BackendTls,
    host_rules: tuple[hostrules.Context, hostrules.HostRules],
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
        location_tls = tls.backend_tls(table, backend_tls)
        location_backends = backends.backends(
            table, host_backends.name + path, location_tls, host_backends
        )
        tls.check_backend_tls_used(table, backends.upstreams(location_backends))
        location = Location(
            path=path,
            backends=location_backends,
            timeouts=_timeouts(table.table("timeouts"), timeouts),
            websocket=_websocket(table, websocket),
            rules=hostrules.location_rules(
                table, location_backends.name, *host_rules
            ).rules,
        )
        locations.append(location)
    locations.sort(key=lambda location: len(location.path), reverse=True)
    return tuple(locations)


# -- value checks used above -------------------------------------------------------------------


def _integer_at_least(minimum: int) -> Callable[[Any], int]:
    return lambda value: values.integer(value, minimum)
