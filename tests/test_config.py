"""Tests for the TOML config loader: valid configs, and the exact "PATH:LINE: message" of errors."""

from __future__ import annotations

import ipaddress
import pickle
import textwrap
from pathlib import Path

import pytest

from charon.config import (
    Config,
    ConfigError,
    Limits,
    ListenAddress,
    Timeouts,
    Upstream,
    WebSocketSettings,
    default_config,
    load_config,
    load_config_text,
    loader,
)
from charon.config.lines import KeyLines
from charon.config.syntax import toml

ROOT = Path(__file__).resolve().parent.parent
HOST = '[[hosts]]\ndomains = ["a.example.com"]\nupstream = "http://127.0.0.1:3000"\n'


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "charon.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def check_error(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.path, err.line, err.message) == (path, line, message)
    assert str(err) == (f"{path}:{line}: {message}" if line else f"{path}: {message}")


# -- ConfigError -------------------------------------------------------------------------------


def test_config_error_str() -> None:
    assert str(ConfigError("a.toml", 3, "bad")) == "a.toml:3: bad"
    assert str(ConfigError("a.toml", 0, "bad")) == "a.toml: bad"
    err = ConfigError("a.toml", 3, "bad")
    assert (err.path, err.line, err.message) == ("a.toml", 3, "bad")
    copy = pickle.loads(pickle.dumps(err))  # e.g. reported from another process
    assert (copy.path, copy.line, copy.message, str(copy)) == ("a.toml", 3, "bad", "a.toml:3: bad")


# -- valid configs -----------------------------------------------------------------------------


def test_default_config() -> None:
    config = default_config()
    assert config.path == "<default>"
    assert config.server.listen == (ListenAddress("127.0.0.1", 8080),)
    assert config.server.workers == 2
    assert config.admin.listen == ListenAddress("127.0.0.1", 9090)
    assert len(config.hosts) == 1
    host = config.hosts[0]
    assert host.domains == ("localhost", "127.0.0.1")
    assert host.upstream == Upstream("http://127.0.0.1:8081", "127.0.0.1", 8081)
    assert host.locations == ()
    default_text = (ROOT / "charon/config/default.toml").read_text()
    assert default_text.splitlines()[host.line - 1] == "[[hosts]]"


def test_example_config_loads() -> None:
    path = str(ROOT / "deploy/charon.example.toml")
    config = load_config(path)
    assert config.path == path
    assert config.server.listen == (ListenAddress("0.0.0.0", 8080), ListenAddress("::", 8080))
    assert config.server.trusted_proxies == ()  # safe to copy: trusts nobody
    app, static, catch_all = config.hosts
    assert app.domains == ("app.example.com", "www.example.com", "*.example.org")
    assert app.timeouts == Timeouts(connect=2.0, header=10.0, first_byte=120.0, idle=60.0)
    assert [location.path for location in app.locations] == ["/live/", "/api/"]
    assert app.locations[0].websocket == WebSocketSettings(65536, 3600.0, 30.0)
    assert app.locations[1].timeouts.first_byte == 300.0
    assert static.upstream == Upstream("http://[::1]", "::1", 80)
    assert static.timeouts.idle == 120.0
    assert catch_all.domains == ("*",)
    lines = Path(path).read_text().splitlines()
    assert all(lines[host.line - 1] == "[[hosts]]" for host in config.hosts)


def test_minimal_config_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.os, "cpu_count", lambda: 3)
    config = load(tmp_path, HOST)
    assert config.server.listen == (ListenAddress("127.0.0.1", 8080),)
    assert config.server.workers == 3
    assert config.server.trusted_proxies == ()
    assert (config.server.shutdown_timeout, config.server.heartbeat_timeout) == (30.0, 10.0)
    assert config.server.limits == Limits()
    assert config.admin.listen == ListenAddress("127.0.0.1", 9090)
    assert config.timeouts == Timeouts()
    host = config.hosts[0]
    assert host.line == 1
    assert host.upstream == Upstream("http://127.0.0.1:3000", "127.0.0.1", 3000)
    assert (host.timeouts, host.websocket) == (Timeouts(), WebSocketSettings())


@pytest.mark.parametrize(("cpus", "workers"), [(None, 1), (128, 64), (8, 8)])
def test_default_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpus: int | None, workers: int
) -> None:
    monkeypatch.setattr(loader.os, "cpu_count", lambda: cpus)
    assert load(tmp_path, HOST).server.workers == workers


def test_load_config_text_stores_path() -> None:
    config = load_config_text(HOST, "somewhere.toml")
    assert config.path == "somewhere.toml"
    with pytest.raises(ConfigError, match=r"^somewhere\.toml:1: invalid TOML"):
        load_config_text("= 1\n", "somewhere.toml")


def test_server_settings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [server]
        listen = "[0:0::1]:8443"
        workers = 64
        trusted_proxies = ["10.1.2.3/8", "::1"]
        shutdown_timeout = 0
        heartbeat_timeout = 1.5
        [server.limits]
        max_request_target = 256
        max_header_bytes = 1024
        max_header_count = 8
        [admin]
        listen = "[::1]:9091"
        """
        + HOST,
    )
    server = config.server
    assert server.listen == (ListenAddress("::1", 8443),)
    assert str(server.listen[0]) == "[::1]:8443"
    assert server.workers == 64
    assert server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert (server.shutdown_timeout, server.heartbeat_timeout) == (0.0, 1.5)
    assert server.limits == Limits(256, 1024, 8)
    assert config.admin.listen == ListenAddress("::1", 9091)


@pytest.mark.parametrize("disabled", ['""', "false"])
def test_admin_can_be_disabled(tmp_path: Path, disabled: str) -> None:
    assert load(tmp_path, f"[admin]\nlisten = {disabled}\n" + HOST).admin.listen is None


def test_admin_disabled_allows_its_default_address_for_server(tmp_path: Path) -> None:
    text = '[server]\nlisten = "127.0.0.1:9090"\n[admin]\nlisten = false\n' + HOST
    assert load(tmp_path, text).server.listen == (ListenAddress("127.0.0.1", 9090),)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ('"5s"', 5.0),
        ('"250ms"', 0.25),
        ('"2m"', 120.0),
        ('"1h"', 3600.0),
        ('"1m30s"', 90.0),
        ('"1h2m3s4ms"', 3723.004),
        ('"1.5s"', 1.5),
        ("7", 7.0),
        ("0.5", 0.5),
    ],
)
def test_durations(tmp_path: Path, text: str, seconds: float) -> None:
    config = load(tmp_path, f"[timeouts]\nconnect = {text}\n" + HOST)
    assert config.timeouts.connect == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("126", 126),
        ('"64KiB"', 65536),
        ('"16MiB"', 16 * 1024 * 1024),
        ('"1GiB"', 2**30),
        ('"200B"', 200),
    ],
)
def test_frame_sizes(tmp_path: Path, text: str, size: int) -> None:
    config = load(tmp_path, HOST + f"websocket_max_frame_size = {text}\n")
    assert config.hosts[0].websocket.max_frame_size == size


def test_timeouts_and_websocket_inherit(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [timeouts]
        connect = "3s"
        header = "4s"

        [[hosts]]
        domains = ["a.example.com"]
        upstream = "http://127.0.0.1:3000"
        timeouts = { connect = "1s" }
        websocket_ping_interval = "30s"

        [[hosts.locations]]
        path = "/ws/"
        upstream = "http://127.0.0.1:3001"
        timeouts = { idle = "5s" }
        websocket_idle_timeout = "1m"

        [[hosts.locations]]
        path = "/plain/"
        upstream = "http://127.0.0.1:3002"

        [[hosts]]
        domains = ["b.example.com"]
        upstream = "http://127.0.0.1:4000"

        [hosts.timeouts]
        first_byte = "2m"
        """,
    )
    assert config.timeouts == Timeouts(connect=3.0, header=4.0, first_byte=60.0, idle=60.0)
    first, second = config.hosts
    assert first.timeouts == Timeouts(connect=1.0, header=4.0, first_byte=60.0, idle=60.0)
    assert first.websocket == WebSocketSettings(16 * 1024 * 1024, 0.0, 30.0)
    plain, ws = first.locations
    assert ws.path == "/ws/"
    assert ws.timeouts == Timeouts(connect=1.0, header=4.0, first_byte=60.0, idle=5.0)
    assert ws.websocket == WebSocketSettings(16 * 1024 * 1024, 60.0, 30.0)
    assert plain.timeouts == first.timeouts
    assert plain.websocket == first.websocket
    assert second.timeouts == Timeouts(connect=3.0, header=4.0, first_byte=120.0, idle=60.0)
    assert second.websocket == WebSocketSettings()
    assert (first.line, second.line) == (5, 21)


def test_locations_sorted_longest_first(tmp_path: Path) -> None:
    text = HOST
    for path in ["/", "/api/", "/api/v2/", "/b", "/static/"]:
        text += f'[[hosts.locations]]\npath = "{path}"\nupstream = "http://127.0.0.1:1"\n'
    host = load(tmp_path, text).hosts[0]
    assert [location.path for location in host.locations] == [
        "/api/v2/",
        "/static/",
        "/api/",
        "/b",
        "/",
    ]


def test_domains_lowercased_wildcards_and_catch_all(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        [[hosts]]
        domains = ["App.Example.COM", "*.Example.org", "10.0.0.1", "xn--bcher-kva.example"]
        upstream = "http://127.0.0.1:3000"
        [[hosts]]
        domains = ["*"]
        upstream = "http://127.0.0.1:3001"
        """,
    )
    assert config.hosts[0].domains == (
        "app.example.com",
        "*.example.org",
        "10.0.0.1",
        "xn--bcher-kva.example",
    )
    assert config.hosts[0].name == "app.example.com"
    assert config.hosts[1].domains == ("*",)


def test_same_path_in_different_hosts_is_fine(tmp_path: Path) -> None:
    location = '[[hosts.locations]]\npath = "/api/"\nupstream = "http://127.0.0.1:1"\n'
    other = HOST.replace("a.example.com", "b.example.com")
    config = load(tmp_path, HOST + location + other + location)
    assert [host.locations[0].path for host in config.hosts] == ["/api/", "/api/"]


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("http://127.0.0.1:3000", "127.0.0.1", 3000),
        ("http://127.0.0.1", "127.0.0.1", 80),
        ("http://127.0.0.1/", "127.0.0.1", 80),
        ("http://[::1]:3000", "::1", 3000),
        ("http://[::1]", "::1", 80),
        ("http://Backend.Internal:8080", "backend.internal", 8080),
        ("HTTP://localhost:65535/", "localhost", 65535),
    ],
)
def test_upstreams(tmp_path: Path, url: str, host: str, port: int) -> None:
    text = f'[[hosts]]\ndomains = ["a.example.com"]\nupstream = "{url}"\n'
    assert load(tmp_path, text).hosts[0].upstream == Upstream(url, host, port)


# -- errors: files and syntax ------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.line == 0
    assert str(info.value) == f"{path}: cannot read the config file: No such file or directory"


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert info.value.line == 0
    assert info.value.message.startswith("cannot read the config file: ")


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "charon.toml"
    path.write_bytes(b"# fine\n# \xff bad\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}:2: the config file is not valid UTF-8"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[server]\nworkers = \n", 2, "invalid TOML: Invalid value"),
        ("[server]\nworkers = 1\nworkers = 2\n", 3, "invalid TOML: Cannot overwrite a value: "
         "'server.workers' is set twice (first set on line 2)"),
        ('# a\n\n[[hosts]]\ndomains = ["a.example.com"\n', 4, "invalid TOML: Unclosed array: "
         "the '[' of 'hosts.domains' on this line has no ']' (the parser stopped at the end of "
         "the file)"),
        ("[server]\n[server]\n", 2,
         "invalid TOML: Cannot declare ('server',) twice (first on line 1)"),
    ],
)
def test_syntax_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    check_error(tmp_path, text, line, message)


def test_syntax_error_at_the_end_of_the_document() -> None:
    # The position may be only in the formatted message: "(at end of document)".
    try:
        toml.loads("a = 1\nb = ")
    except toml.TOMLDecodeError as caught:
        err = caught
    result = loader._syntax_error(err, "a = 1\nb = ", "x.toml")
    assert (result.line, result.message) == (2, "invalid TOML: Invalid value")


# -- errors: top level -------------------------------------------------------------------------

TOP_LEVEL_ERRORS = [
    ("", 0, "no [[hosts]]: nothing to proxy"),
    ("[server]\nworkers = 1\n", 0, "no [[hosts]]: nothing to proxy"),
    ("# none\nhosts = []\n", 2, "no [[hosts]]: nothing to proxy"),
    ("[hosts]\nupstream = 1\n", 1, "hosts: expected [[hosts]] tables, got a table"),
    ("hosts = [1]\n", 1, "hosts: expected [[hosts]] tables, got an array of other values"),
    ("server = 5\n" + HOST, 1, "server: expected a table, got 5"),
    (HOST + "[foo]\nx = 1\n", 4, "unknown table [foo]"),
    (HOST + "[[host]]\nx = 1\n", 4, "unknown table [[host]] (did you mean 'hosts'?)"),
    ("foo = 1\n" + HOST, 1, "unknown key 'foo' at the top level"),
    (HOST + "[timeout]\nconnect = 1\n", 4, "unknown table [timeout] (did you mean 'timeouts'?)"),
]


@pytest.mark.parametrize(("text", "line", "message"), TOP_LEVEL_ERRORS)
def test_top_level_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    check_error(tmp_path, text, line, message)


# -- errors: [server] and [admin] --------------------------------------------------------------


def server(*lines: str) -> str:
    return "[server]\n" + "".join(line + "\n" for line in lines) + HOST


SERVER_ERRORS = [
    (server("worker = 2"), 2, "unknown key 'worker' in [server] (did you mean 'workers'?)"),
    (server("workers = 1", "[server.bogus]"), 3, "unknown key 'bogus' in [server]"),
    (server("[server.limits]", "max = 9"), 3, "unknown key 'max' in [server.limits]"),
    (server("listen = []"), 2, "[server] listen: must not be empty"),
    (server("listen = 5"), 2, '[server] listen: expected an array of "IP:PORT" strings, got 5'),
    (server("listen = [5]"), 2, '[server] listen: expected an "IP:PORT" string, got 5'),
    (
        server('listen = "localhost:80"'),
        2,
        '[server] listen: "localhost:80": use an IP address, not a host name '
        '(e.g. "127.0.0.1:8080")',
    ),
    (
        server('listen = ["127.0.0.1"]'),
        2,
        '[server] listen: expected "IP:PORT", got "127.0.0.1" (the port is missing)',
    ),
    (
        server('listen = ["127.0.0.1:0"]'),
        2,
        '[server] listen: "127.0.0.1:0": the port must be a number from 1 to 65535',
    ),
    (
        server('listen = ["127.0.0.1:65536"]'),
        2,
        '[server] listen: "127.0.0.1:65536": the port must be a number from 1 to 65535',
    ),
    (
        server('listen = ["127.0.0.1:http"]'),
        2,
        '[server] listen: "127.0.0.1:http": the port must be a number from 1 to 65535',
    ),
    (
        server('listen = ["::1:80"]'),
        2,
        '[server] listen: "::1:80": IPv6 addresses need brackets, like "[::1]:8080"',
    ),
    (server('listen = ["[::1:80"]'), 2, '[server] listen: expected "IP:PORT", got "[::1:80"'),
    (
        server('listen = ["[127.0.0.1]:80"]'),
        2,
        '[server] listen: "[127.0.0.1]:80": "127.0.0.1" is not an IPv6 address',
    ),
    (
        server("listen = [", '  "127.0.0.1:80",', '  "[::1]:80",', '  "127.0.0.1:80",', "]"),
        5,
        "[server] listen: 127.0.0.1:80 is listed twice",
    ),
    (
        server('listen = ["[::1]:80", "[0:0::1]:80"]'),
        2,
        "[server] listen: [::1]:80 is listed twice",
    ),
    (server("workers = 0"), 2, "[server] workers: must be between 1 and 64, got 0"),
    (server("workers = 65"), 2, "[server] workers: must be between 1 and 64, got 65"),
    (server('workers = "2"'), 2, '[server] workers: expected an integer, got "2"'),
    (server("workers = true"), 2, "[server] workers: expected an integer, got true"),
    (
        server('trusted_proxies = "10.0.0.0/8"'),
        2,
        '[server] trusted_proxies: expected an array of CIDRs or IP addresses, got "10.0.0.0/8"',
    ),
    (
        server("trusted_proxies = [", '  "10.0.0.0/8",', '  "10.0.0.0/33",', "]"),
        4,
        '[server] trusted_proxies: "10.0.0.0/33" is not a network: '
        'use a CIDR like "10.0.0.0/8" or an IP address',
    ),
    (
        server('heartbeat_timeout = "500ms"'),
        2,
        '[server] heartbeat_timeout: must be at least 1s, got "500ms"',
    ),
    (server("shutdown_timeout = -1"), 2, "[server] shutdown_timeout: must not be negative, got -1"),
    (
        server("shutdown_timeout = inf"),
        2,
        "[server] shutdown_timeout: expected a finite number of seconds, got inf",
    ),
    (
        server("[server.limits]", "max_request_target = 255"),
        3,
        "[server.limits] max_request_target: must be at least 256, got 255",
    ),
    (
        server("[server.limits]", "max_header_bytes = 1023"),
        3,
        "[server.limits] max_header_bytes: must be at least 1024, got 1023",
    ),
    (
        server("[server.limits]", "max_header_count = 7"),
        3,
        "[server.limits] max_header_count: must be at least 8, got 7",
    ),
    (
        server("limits = 3"),
        2,
        "[server] limits: expected a table, got 3",
    ),
    (
        server('listen = ["127.0.0.1:80"]', "[admin]", 'listen = "127.0.0.1:80"'),
        4,
        "[admin] listen: 127.0.0.1:80 is also a [server] listen address",
    ),
    (
        server('listen = ["127.0.0.1:80", "127.0.0.1:9090"]'),
        2,
        "[server] listen: 127.0.0.1:9090 is also the default [admin] listen address "
        "(set [admin] listen to another address, or to false to disable it)",
    ),
    (
        server("[admin]", "listen = true"),
        3,
        '[admin] listen: expected "IP:PORT", "" or false, got true',
    ),
    (
        server("[admin]", 'listen = "local:1"'),
        3,
        '[admin] listen: "local:1": use an IP address, not a host name (e.g. "127.0.0.1:8080")',
    ),
    (server("[admin]", "port = 1"), 3, "unknown key 'port' in [admin]"),
]


@pytest.mark.parametrize(("text", "line", "message"), SERVER_ERRORS)
def test_server_and_admin_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    check_error(tmp_path, text, line, message)


# -- errors: [timeouts] ------------------------------------------------------------------------


def timeouts(line: str) -> str:
    return "# timeouts\n[timeouts]\n" + line + "\n" + HOST


TIMEOUT_ERRORS = [
    (timeouts("connect = true"), 3, '[timeouts] connect: expected a duration like "5s", got true'),
    (timeouts('header = "0s"'), 3, '[timeouts] header: must be greater than 0, got "0s"'),
    (timeouts("idle = 0"), 3, "[timeouts] idle: must be greater than 0, got 0"),
    (
        timeouts("first_byte = [1]"),
        3,
        '[timeouts] first_byte: expected a duration like "5s", got an array',
    ),
    (timeouts("read = 1"), 3, "unknown key 'read' in [timeouts]"),
]
for bad in ["", "5", "s", "5x", "1s1m", "1s1s", "1.s", "-1s", "1 s", "1S", " 1s"]:
    TIMEOUT_ERRORS.append(
        (
            timeouts(f'connect = "{bad}"'),
            3,
            f'[timeouts] connect: invalid duration "{bad}": '
            'use e.g. "5s", "250ms", "2m", "1h", "1m30s"',
        )
    )


@pytest.mark.parametrize(("text", "line", "message"), TIMEOUT_ERRORS)
def test_timeout_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    check_error(tmp_path, text, line, message)


# -- errors: [[hosts]] -------------------------------------------------------------------------

# Two valid hosts come first, so errors in the third one must be found at the right index.
TWO_HOSTS = HOST + '\n[[hosts]]\ndomains = ["b.example.com"]\nupstream = "http://127.0.0.1:3001"\n'
THIRD = len(TWO_HOSTS.splitlines()) + 1  # the line of the third [[hosts]] header


def third_host(*lines: str) -> str:
    return TWO_HOSTS + "[[hosts]]\n" + "".join(line + "\n" for line in lines)


DOMAIN_FORMS = "a DNS name like 'app.example.com', '*.example.com', an IPv4 address or '*'"
UPSTREAM = 'upstream = "http://127.0.0.1:3002"'
DOMAINS = 'domains = ["c.example.com"]'

HOST_ERRORS = [
    (third_host(UPSTREAM), THIRD, "missing required key 'domains' in [[hosts]]"),
    (third_host(DOMAINS), THIRD, "missing required key 'upstream' in [[hosts]]"),
    (
        third_host(DOMAINS, UPSTREAM, "domain = 1"),
        THIRD + 3,
        "unknown key 'domain' in [[hosts]] (did you mean 'domains'?)",
    ),
    (
        third_host("domains = []", UPSTREAM),
        THIRD + 1,
        "[[hosts]] domains: must list at least one domain",
    ),
    (
        third_host('domains = "c.example.com"', UPSTREAM),
        THIRD + 1,
        '[[hosts]] domains: expected an array of domain names, got "c.example.com"',
    ),
    (
        third_host("domains = [1]", UPSTREAM),
        THIRD + 1,
        "[[hosts]] domains: expected a domain name string, got 1",
    ),
    (
        third_host('domains = ["c.example.com:8080"]', UPSTREAM),
        THIRD + 1,
        '[[hosts]] domains: "c.example.com:8080": domains must not include a port',
    ),
    (
        third_host('domains = ["**.example.com"]', UPSTREAM),
        THIRD + 1,
        '[[hosts]] domains: invalid domain "**.example.com": a wildcard must be the whole '
        "first label, like '*.example.com'",
    ),
    (
        third_host('domains = ["a.*.example.com"]', UPSTREAM),
        THIRD + 1,
        '[[hosts]] domains: invalid domain "a.*.example.com": a wildcard must be the whole '
        "first label, like '*.example.com'",
    ),
    (
        third_host("domains = [", '  "c.example.com",', '  "c.example.com",', "]", UPSTREAM),
        THIRD + 1,
        f"domain 'c.example.com' is already used by the host at line {THIRD}",
    ),
    (
        third_host('domains = ["C.example.com", "B.EXAMPLE.COM"]', UPSTREAM),
        THIRD + 1,
        "domain 'b.example.com' is already used by the host at line 5",
    ),
    (
        third_host('domains = ["*"]', UPSTREAM, "[[hosts]]", 'domains = ["*"]', UPSTREAM),
        THIRD + 4,
        f"domain '*' is already used by the host at line {THIRD}",
    ),
    (
        third_host(DOMAINS, UPSTREAM, "timeouts = 5"),
        THIRD + 3,
        "[[hosts]] timeouts: expected a table, got 5",
    ),
    (
        third_host(DOMAINS, UPSTREAM, 'timeouts = { connect = "1s", conect = "2s" }'),
        THIRD + 3,
        "unknown key 'conect' in [hosts.timeouts] (did you mean 'connect'?)",
    ),
    (
        third_host(DOMAINS, UPSTREAM, "timeouts = {", '  connect = "1s",', "  idle = true,", "}"),
        THIRD + 5,
        '[hosts.timeouts] idle: expected a duration like "5s", got true',
    ),
    (
        third_host(DOMAINS, UPSTREAM, "[hosts.timeouts]", 'connect = "1s"', "header = -2"),
        THIRD + 5,
        "[hosts.timeouts] header: must not be negative, got -2",
    ),
    (
        third_host(DOMAINS, UPSTREAM, "websocket_max_frame_size = 125"),
        THIRD + 3,
        "[[hosts]] websocket_max_frame_size: must be at least 126 bytes, got 125",
    ),
    (
        third_host(DOMAINS, UPSTREAM, 'websocket_max_frame_size = "16MB"'),
        THIRD + 3,
        '[[hosts]] websocket_max_frame_size: invalid size "16MB": '
        'use a number of bytes or e.g. "64KiB", "16MiB"',
    ),
    (
        third_host(DOMAINS, UPSTREAM, "websocket_max_frame_size = 1.5"),
        THIRD + 3,
        '[[hosts]] websocket_max_frame_size: expected a size like "16MiB" or a number of bytes, '
        "got 1.5",
    ),
    (
        third_host(DOMAINS, UPSTREAM, 'websocket_idle_timeout = "soon"'),
        THIRD + 3,
        '[[hosts]] websocket_idle_timeout: invalid duration "soon": '
        'use e.g. "5s", "250ms", "2m", "1h", "1m30s"',
    ),
    (
        third_host(DOMAINS, UPSTREAM, "websocket_ping_interval = -1"),
        THIRD + 3,
        "[[hosts]] websocket_ping_interval: must not be negative, got -1",
    ),
    (
        third_host(DOMAINS, UPSTREAM, "locations = 5"),
        THIRD + 3,
        "[[hosts]] locations: expected [[hosts.locations]] tables, got 5",
    ),
]

INVALID_DOMAINS = [
    "a_b.example.com",
    "-a.example.com",
    "a-.example.com",
    "a..example.com",
    "example.com.",
    "a" * 64 + ".example.com",
    ".".join(["a" * 63] * 4),  # 255 characters
    "1.2.3.999",
    "",
    "exa mple.com",
    "ünicode.example",
]
for bad in INVALID_DOMAINS:
    HOST_ERRORS.append(
        (
            third_host(f'domains = ["c.example.com", "{bad}"]', UPSTREAM),
            THIRD + 1,
            f'[[hosts]] domains: invalid domain "{bad}": expected {DOMAIN_FORMS}',
        )
    )

UPSTREAM_ERRORS = [
    ("ftp://127.0.0.1:3000", "unsupported scheme 'ftp' (only http:// and https:// are supported)"),
    (
        "https://127.0.0.1:3000/api",
        "upstream must not have a path: Charon forwards the request path unchanged",
    ),
    (
        "http://127.0.0.1:3000/api",
        "upstream must not have a path: Charon forwards the request path unchanged",
    ),
    (
        "http://127.0.0.1:3000//",
        "upstream must not have a path: Charon forwards the request path unchanged",
    ),
    ("http://127.0.0.1:3000/?a=1", "an upstream must not have a query"),
    ("http://127.0.0.1:3000?a=1", "an upstream must not have a query"),
    ("http://127.0.0.1:3000#top", "an upstream must not have a fragment"),
    ("http://user:pw@127.0.0.1:3000", "an upstream must not contain user info"),
    ("http://127.0.0.1:0", "the port must be a number from 1 to 65535"),
    ("http://127.0.0.1:", "the port must be a number from 1 to 65535"),
    ("http://127.0.0.1:99999", "the port must be a number from 1 to 65535"),
    ("http://::1:3000", 'IPv6 addresses need brackets, like "http://[::1]:3000"'),
    ("http://[::g]:3000", '"::g" is not an IPv6 address'),
    ("http://[fe80::1%eth0]:3000", 'an IPv6 zone id ("fe80::1%eth0") is not supported'),
    ("http://back_end:3000", '"back_end" is not an IP address or a DNS name'),
    ("http://*.example.com", '"*.example.com" is not an IP address or a DNS name'),
]
for url, detail in UPSTREAM_ERRORS:
    HOST_ERRORS.append(
        (
            third_host(DOMAINS, f'upstream = "{url}"'),
            THIRD + 2,
            f'[[hosts]] upstream: "{url}": {detail}',
        )
    )
HOST_ERRORS += [
    (
        third_host(DOMAINS, 'upstream = "127.0.0.1:3000"'),
        THIRD + 2,
        '[[hosts]] upstream: expected a URL like "http://127.0.0.1:3000", got "127.0.0.1:3000"',
    ),
    (
        third_host(DOMAINS, 'upstream = "http://"'),
        THIRD + 2,
        '[[hosts]] upstream: expected "http://HOST:PORT", got "http://"',
    ),
    (
        third_host(DOMAINS, "upstream = 3000"),
        THIRD + 2,
        '[[hosts]] upstream: expected an upstream URL like "http://127.0.0.1:3000", got 3000',
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), HOST_ERRORS)
def test_host_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    check_error(tmp_path, text, line, message)


# -- errors: [[hosts.locations]] ---------------------------------------------------------------


def location(*lines: str) -> str:
    """A third host with one valid location, then a location made of `lines`."""
    return (
        third_host(DOMAINS, UPSTREAM)
        + '[[hosts.locations]]\npath = "/ok/"\nupstream = "http://127.0.0.1:1"\n'
        + "[[hosts.locations]]\n"
        + "".join(line + "\n" for line in lines)
    )


LOCATION = THIRD + 6  # the line of the second [[hosts.locations]] header of the third host
PATH = 'path = "/api/"'
LOCATION_UPSTREAM = 'upstream = "http://127.0.0.1:4000"'

LOCATION_ERRORS = [
    (location(LOCATION_UPSTREAM), LOCATION, "missing required key 'path' in [[hosts.locations]]"),
    (location(PATH), LOCATION, "missing required key 'upstream' in [[hosts.locations]]"),
    (
        location(PATH, LOCATION_UPSTREAM, "domains = []"),
        LOCATION + 3,
        "unknown key 'domains' in [[hosts.locations]]",
    ),
    (
        location('path = "api/"', LOCATION_UPSTREAM),
        LOCATION + 1,
        "[[hosts.locations]] path: must start with '/', got \"api/\"",
    ),
    (
        location('path = "/a b/"', LOCATION_UPSTREAM),
        LOCATION + 1,
        '[[hosts.locations]] path: must not contain spaces or control characters, got "/a b/"',
    ),
    (
        location('path = "/a\\u0000"', LOCATION_UPSTREAM),
        LOCATION + 1,
        '[[hosts.locations]] path: must not contain spaces or control characters, got "/a\\u0000"',
    ),
    (
        location('path = "/a?b"', LOCATION_UPSTREAM),
        LOCATION + 1,
        "[[hosts.locations]] path: must not contain '?' or '#' (locations match the path only), "
        'got "/a?b"',
    ),
    (
        location("path = 1", LOCATION_UPSTREAM),
        LOCATION + 1,
        '[[hosts.locations]] path: expected a path like "/api/", got 1',
    ),
    (
        location(LOCATION_UPSTREAM, 'path = "/ok/"'),
        LOCATION + 2,
        f"[[hosts.locations]] path: '/ok/' is already used by the location at line {LOCATION - 3}",
    ),
    (
        location(PATH, 'upstream = "http://127.0.0.1:4000/api/"'),
        LOCATION + 2,
        '[[hosts.locations]] upstream: "http://127.0.0.1:4000/api/": upstream must not have a '
        "path: Charon forwards the request path unchanged",
    ),
    (
        location(PATH, LOCATION_UPSTREAM, 'timeouts = { connect = "0ms" }'),
        LOCATION + 3,
        '[hosts.locations.timeouts] connect: must be greater than 0, got "0ms"',
    ),
    (
        location(PATH, LOCATION_UPSTREAM, "[hosts.locations.timeouts]", "", "idle = false"),
        LOCATION + 5,
        '[hosts.locations.timeouts] idle: expected a duration like "5s", got false',
    ),
    (
        location(PATH, LOCATION_UPSTREAM, 'websocket_max_frame_size = "1KB"'),
        LOCATION + 3,
        '[[hosts.locations]] websocket_max_frame_size: invalid size "1KB": '
        'use a number of bytes or e.g. "64KiB", "16MiB"',
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), LOCATION_ERRORS)
def test_location_errors(tmp_path: Path, text: str, line: int, message: str) -> None:
    check_error(tmp_path, text, line, message)


def test_inline_hosts_array_reports_the_key_line(tmp_path: Path) -> None:
    text = """
    # hosts as an inline array of tables
    hosts = [
      { domains = ["a.example.com"], upstream = "http://127.0.0.1:1" },
      { domains = ["a.example.com"], upstream = "http://127.0.0.1:2" },
    ]
    """
    check_error(tmp_path, text, 4, "domain 'a.example.com' is already used by the host at line 3")


# -- the line scanner --------------------------------------------------------------------------


def test_key_lines_tables_and_arrays_of_tables() -> None:
    lines = KeyLines(
        textwrap.dedent(
            """\
            [server.limits]
            max_header_count = 8
            [server]
            workers = 1
            [[hosts]]
            domains = ["a"]
            [[hosts.locations]]
            path = "/"
            [[hosts.locations]]
            path = "/b"
            [[hosts]]
            [hosts.timeouts]
            connect = 1
            [[hosts.locations]]
              "quoted.key" = 1
            dotted . key = 2
            'literal' = 3
            """
        )
    )
    assert lines.line_of(("server", "limits", "max_header_count")) == 2
    assert lines.line_of(("server",)) == 3  # the explicit header, not the earlier [server.limits]
    assert lines.line_of(("server", "workers")) == 4
    assert lines.line_of(("hosts", 0)) == 5
    assert lines.line_of(("hosts", 0, "domains", 0)) == 6
    assert lines.line_of(("hosts", 0, "locations", 0, "path")) == 8
    assert lines.line_of(("hosts", 0, "locations", 1)) == 9
    assert lines.line_of(("hosts", 0, "locations", 1, "path")) == 10
    assert lines.line_of(("hosts", 1)) == 11
    assert lines.line_of(("hosts", 1, "timeouts")) == 12
    assert lines.line_of(("hosts", 1, "timeouts", "connect")) == 13
    assert lines.line_of(("hosts", 1, "locations", 0)) == 14
    assert lines.line_of(("hosts", 1, "locations", 0, "quoted.key")) == 15
    assert lines.line_of(("hosts", 1, "locations", 0, "dotted")) == 16
    assert lines.line_of(("hosts", 1, "locations", 0, "dotted", "key")) == 16
    assert lines.line_of(("hosts", 1, "locations", 0, "literal")) == 17
    assert lines.line_of(("hosts", 1, "locations", 0, "missing")) == 14  # falls back to the table
    assert lines.line_of(("nothing",)) == 0
    assert lines.exact(("hosts", 1, "locations", 0, "missing")) is None


def test_key_lines_skip_multiline_strings_arrays_and_inline_tables() -> None:
    text = textwrap.dedent(
        '''\
        a = """
        [[hosts]]
        fake = 1
        """
        b = \'\'\'
        [server]
        \'\'\'
        c = [  # [[hosts]]
          "x", "y = 1",
          [1, 2],
          { k = 1,
            j = "]" },
        ]
        d = { e = { f = 1 },
              g = 'h' }
        e = """a \\""" [x]
        z = 1 """""
        f = "# not a comment [x]"
        g = 1979-05-27 07:32:00Z
        h = 2
        '''
    )
    lines = KeyLines(text)
    assert toml.loads(text)["e"] == 'a """ [x]\nz = 1 ""'
    assert lines.exact(("hosts",)) is None
    assert lines.exact(("fake",)) is None
    assert lines.exact(("server",)) is None
    assert lines.exact(("z",)) is None
    assert [lines.line_of(("a",)), lines.line_of(("b",)), lines.line_of(("c",))] == [1, 5, 8]
    assert lines.line_of(("c", 1)) == 9
    assert lines.line_of(("c", 2, 1)) == 10
    assert lines.line_of(("c", 3)) == 11
    assert lines.line_of(("c", 3, "j")) == 12
    assert lines.line_of(("d", "e", "f")) == 14
    assert lines.line_of(("d", "g")) == 15
    assert [lines.line_of((key,)) for key in "efgh"] == [16, 18, 19, 20]


def test_key_lines_never_fail_on_garbage() -> None:
    for text in ["[", "[[", "a = [", 'a = "', "a = {", "= = =", "a\n\n]]]", '"""', "x = '''"]:
        KeyLines(text)  # must not raise or hang


def test_underscores_in_headers_switch(tmp_path: Path) -> None:
    assert load(tmp_path, HOST).server.underscores_in_headers is False
    on = load(tmp_path, "[server]\nunderscores_in_headers = true\n" + HOST)
    assert on.server.underscores_in_headers is True
    check_error(
        tmp_path, '[server]\nunderscores_in_headers = "yes"\n' + HOST, 2,
        '[server] underscores_in_headers: expected true or false, got "yes"',
    )
