"""Who may come in (issue 14), config side: every key of access lists, basic and forward auth,
rate and connection limits, body sizes and header rules parsed into `Rules`, their defaults,
a location's inheritance, the [server] keys, htpasswd files (hashes made with the real bcrypt
and argon2 libraries), every error as "PATH:LINE: message", and `charon check`'s listing."""

from __future__ import annotations

import ipaddress
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import bcrypt
import pytest
from argon2 import PasswordHasher

from charon.config import (
    ConfigError,
    access,
    headerrules,
    hostrules,
    limits,
    load_config,
    load_config_text,
)
from charon.config.model import Config, ListenAddress, Upstream
from charon.config.rules import (
    DEFAULT_MAX_BODY_SIZE,
    AccessList,
    BasicAuth,
    ForwardAuth,
    HeaderOps,
    RateLimit,
    Rules,
)

ROOT = Path(__file__).resolve().parent.parent
HEAD = '[[hosts]]\ndomains = ["app.example.com"]\nupstream = "http://127.0.0.1:3000"\n'
LOC = '[[hosts.locations]]\npath = "/api/"\nupstream = "http://127.0.0.1:3001"\n'
# Fixed (made once by the libraries; checked against them below): test IDs contain them, and
# pytest-xdist needs every process to collect the same IDs.
BCRYPT = "$2b$04$bMZzOBfbL6DdXwKceXM0oeWKLz7ZNdTHkk6/.hWS/yy5RPUwMCVAS"
ARGON2 = (
    "$argon2id$v=19$m=8,t=1,p=1$1MmwBmYkkjL2840PsO0j5A$"
    "OOZ+c2xvXUTtEIy/eyJLOAAJQJsd135hFwsnaRnRocA"
)


def test_the_fixed_hashes_are_the_libraries_own() -> None:
    assert bcrypt.checkpw(b"alice's secret", BCRYPT.encode())
    assert PasswordHasher().verify(ARGON2, "bob's secret")
PRESET = (
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "strict-origin-when-cross-origin"),
    ("X-Frame-Options", "SAMEORIGIN"),
)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def load(text: str, head: str = HEAD, path: str = "c.toml") -> Config:
    return load_config_text(head + textwrap.dedent(text), path)


def rules(text: str) -> Rules:
    return load(text).hosts[0].rules


def error(text: str, head: str = HEAD, path: str = "c.toml") -> str:
    with pytest.raises(ConfigError) as info:
        load(text, head, path)
    return str(info.value)


# -- every key ---------------------------------------------------------------------------------


def test_defaults_are_bare() -> None:
    config = load("")
    assert config.hosts[0].rules == Rules() and config.hosts[0].rules.bare
    assert config.server.proxy_protocol == () and config.server.max_connections == 0
    assert config.server.max_connections_per_ip == 0 and config.hosts[0].hsts is None
    assert Rules().max_body_size == DEFAULT_MAX_BODY_SIZE == 1 << 30


def test_every_host_key() -> None:
    got = rules(
        f"""\
        access = "office"
        allow = ["203.0.113.0/24", "10.0.0.0/8"]
        deny = "203.0.113.9"
        basic_auth = {{ realm = "App", users = {{ alice = "{BCRYPT}", bob = "{ARGON2}" }},
                       forward_authorization = true }}
        forward_auth = {{ url = "https://Auth.Internal:9091/api/verify?rd=1",
                         copy_headers = ["Remote-User", "Remote-Groups"], timeout = "2s" }}
        rate_limit = {{ requests = 100, per = "1s", burst = 50, by = "ip" }}
        websocket_rate_limit = {{ requests = 10, per = "1m" }}
        websocket_max_messages_per_second = 200
        max_connections = 500
        max_connections_per_ip = 20
        max_websockets = 10000
        max_websockets_per_ip = 10
        max_body_size = "10m"
        request_headers = {{ set = {{ "X-App" = "1" }}, add = {{ "X-Tag" = "a b" }},
                            remove = ["X-Debug"] }}
        response_headers = {{ set = {{ "Cache-Control" = "no-store" }}, remove = ["Server"] }}
        host_header = "upstream"
        security_headers = true

        [access.office]
        allow = ["10.0.0.0/8", "192.168.1.0/24"]
        deny = ["10.0.0.66"]
        """
    )
    zone = "app.example.com"
    assert got == Rules(
        access=AccessList(
            allow=(net("10.0.0.0/8"), net("192.168.1.0/24"), net("203.0.113.0/24")),
            deny=(net("10.0.0.66/32"), net("203.0.113.9/32")),
            names=("office",),
        ),
        basic_auth=BasicAuth("App", (("alice", BCRYPT), ("bob", ARGON2)), True),
        forward_auth=ForwardAuth(
            url="https://Auth.Internal:9091/api/verify?rd=1",
            upstream=Upstream("https://Auth.Internal:9091", "auth.internal", 9091, tls=True),
            path="/api/verify?rd=1",
            copy_headers=("Remote-User", "Remote-Groups"),
            timeout=2.0,
        ),
        rate_limits=(RateLimit(100, 1.0, 50, "ip", zone),),
        websocket_rate_limits=(RateLimit(10, 60.0, 10, "ip", zone),),
        websocket_max_messages_per_second=200,
        max_connections=500,
        max_connections_per_ip=20,
        max_websockets=10000,
        max_websockets_per_ip=10,
        max_body_size=10 << 20,
        request_headers=HeaderOps(set=(("X-App", "1"),), add=(("X-Tag", "a b"),),
                                  remove=("x-debug",)),
        response_headers=HeaderOps(set=(("Cache-Control", "no-store"),), remove=("server",),
                                   default=PRESET),
        host_header="upstream",
        security_headers=True,
    )


def test_server_keys() -> None:
    config = load(
        """\
        [server]
        listen = ["127.0.0.1:8080", "127.0.0.1:8081"]
        tls_listen = ["127.0.0.1:8443"]
        proxy_protocol = ["127.0.0.1:8081", "127.0.0.1:8443"]
        max_connections = 10000
        max_connections_per_ip = 100
        max_body_size = "512k"
        """
    )
    server = config.server
    assert server.proxy_protocol == (ListenAddress("127.0.0.1", 8081),
                                     ListenAddress("127.0.0.1", 8443))
    assert (server.max_connections, server.max_connections_per_ip) == (10000, 100)
    assert config.hosts[0].rules == Rules(max_body_size=512 << 10)
    every = load('[server]\nlisten = ["127.0.0.1:80"]\ntls_listen = ["127.0.0.1:443"]\n'
                 "proxy_protocol = true\n").server
    assert every.proxy_protocol == every.all_listen
    assert load("[server]\nproxy_protocol = false\n").server.proxy_protocol == ()


@pytest.mark.parametrize(("value", "size"), [
    ('"10m"', 10 << 20), ('"1g"', 1 << 30), ('"512k"', 512 << 10), ("1500", 1500),
    ('"0"', 0), ("0", 0), ('"2M"', 2 << 20), ('"16MiB"', 16 << 20), ('"100"', 100),
])
def test_sizes(value: str, size: int) -> None:
    assert rules(f"max_body_size = {value}\n").max_body_size == size


def test_rate_limit_forms() -> None:
    got = rules('rate_limit = [{ requests = 5 }, { requests = 100, per = "1m", by = "host" }]\n')
    assert got.rate_limits == (RateLimit(5, 1.0, 5, "ip", "app.example.com"),
                               RateLimit(100, 60.0, 100, "host", "app.example.com"))
    assert rules("rate_limit = false\n") == Rules()
    assert rules("rate_limit = []\n") == Rules()


def test_security_headers_fields_and_hsts() -> None:
    config = load('security_headers = { x_frame_options = "DENY", referrer_policy = false, '
                  'hsts = "max-age=60" }\n')
    host = config.hosts[0]
    assert host.rules.response_headers.default == (
        ("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"))
    assert host.hsts == "max-age=60" and host.rules.security_headers
    assert load("security_headers = true\n").hosts[0].hsts == "max-age=31536000"
    assert load("security_headers = { hsts = false }\n").hosts[0].hsts is None
    own = load('security_headers = true\nhsts = "max-age=5"\n').hosts[0]
    assert own.hsts == "max-age=5" and own.rules.response_headers.default == PRESET
    off = load("security_headers = false\n").hosts[0]
    assert off.rules == Rules() and off.hsts is None


def test_literal_host_header_and_access_list_of_names() -> None:
    got = rules('host_header = "Backend.Internal:8080"\naccess = ["a", "b", "a"]\n'
                '[access.a]\nallow = "10.0.0.0/8"\n[access.b]\ndeny = ["::1"]\n')
    assert got.host_header == "backend.internal:8080"
    assert got.access == AccessList((net("10.0.0.0/8"),), (net("::1/128"),), ("a", "b"))


# -- htpasswd files ----------------------------------------------------------------------------


def test_htpasswd_file_with_comments_and_both_kinds(tmp_path: Path) -> None:
    (tmp_path / "app.htpasswd").write_text(
        f"# made with htpasswd -B\n\ncarol:{BCRYPT}\n  dave:{ARGON2}  \r\n"
    )
    config_path = tmp_path / "c.toml"
    config_path.write_text(
        HEAD + f'basic_auth = {{ htpasswd = "app.htpasswd", users = {{ alice = "{BCRYPT}" }} }}\n'
    )
    auth = load_config(str(config_path)).hosts[0].rules.basic_auth
    assert auth == BasicAuth("Restricted", (("alice", BCRYPT), ("carol", BCRYPT),
                                            ("dave", ARGON2)),
                             htpasswd=str(tmp_path / "app.htpasswd"))


@pytest.mark.parametrize(("lines", "line", "message"), [
    ("alice:$apr1$r31.....$HqJZimcKQFAMYayBlzkrA/\n", 1, "unsupported hash (Apache MD5 (apr1))"),
    ("# c\nbob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", 2, "unsupported hash (SHA-1)"),
    ("\n\ncarol:rOXv2z2sB2yHk\n", 3, "unsupported hash (crypt(3) DES)"),
    ("dave:$6$salt$abc\n", 1, "unsupported hash (SHA-512-crypt)"),
    ("erin:plain\n", 1, "unsupported hash (not a hash)"),
    (f"a:{BCRYPT}\nno colon here\n", 2, "expected USER:HASH"),
    (f"a:{BCRYPT}\n# x\na:{ARGON2}\n", 3, 'user "a" is already on line 1'),
    (":" + BCRYPT + "\n", 1, "a user name must not be empty"),
    ("a:$2b$04$short\n", 1, "not a valid bcrypt hash"),
    ("a:$argon2id$v=19$m=8,t=1,p=1$garbage\n", 1, "not a valid argon2 hash"),
])
def test_htpasswd_errors_name_the_files_line(
    tmp_path: Path, lines: str, line: int, message: str
) -> None:
    (tmp_path / "h").write_text(lines)
    text = f'basic_auth = {{ realm = "x",\n  htpasswd = "{tmp_path / "h"}" }}\n'
    got = error(text)
    assert got.startswith(f"{tmp_path / 'h'}:{line}: {message}"), got
    assert got.endswith("(the htpasswd of [[hosts]] basic_auth at c.toml:5)")
    if "unsupported" in message:
        assert "make it with `htpasswd -B` or `charon hash-password`" in got


def test_htpasswd_unreadable_and_workers_rereading(tmp_path: Path) -> None:
    text = f'basic_auth = {{ htpasswd = "{tmp_path / "missing"}" }}\n'
    assert error(text) == (f'c.toml:4: [[hosts]] basic_auth htpasswd: cannot read '
                           f'"{tmp_path / "missing"}": No such file or directory')
    # A worker re-reading a checked config does not stop on a file changed since: it keeps
    # what it can read (those users are refused), nothing else.
    (tmp_path / "h").write_text(f"a:{BCRYPT}\nb:$apr1$x$y\n")
    for name, users in ((tmp_path / "missing", ()), (tmp_path / "h", (("a", BCRYPT),))):
        config = load_config_text(HEAD + f'basic_auth = {{ htpasswd = "{name}" }}\n', "c.toml",
                                  check_files=False)
        assert config.hosts[0].rules.basic_auth.users == users  # type: ignore[union-attr]


# -- locations ---------------------------------------------------------------------------------


def test_location_inherits_every_rule_it_does_not_set() -> None:
    config = load(
        'rate_limit = { requests = 10 }\nmax_connections = 5\nsecurity_headers = true\n'
        'allow = ["10.0.0.0/8"]\nrequest_headers = { set = { "X-A" = "1" } }\n' + LOC
    )
    host, location = config.hosts[0], config.hosts[0].locations[0]
    assert location.rules is host.rules  # one object: the zone is the host's, same buckets
    assert location.rules.rate_limits[0].zone == "app.example.com"


def test_location_replaces_what_it_sets() -> None:
    config = load(
        'allow = ["10.0.0.0/8"]\nbasic_auth = { users = { a = "' + BCRYPT + '" } }\n'
        'rate_limit = { requests = 10 }\nmax_body_size = "1m"\nsecurity_headers = true\n'
        'response_headers = { remove = ["Server"] }\n[access.vpn]\nallow = ["fd00::/8"]\n' + LOC
        + 'access = "vpn"\nbasic_auth = false\nrate_limit = { requests = 99, by = "host" }\n'
        'max_body_size = 0\nresponse_headers = { set = { "X-Loc" = "1" } }\n'
    )
    host, location = config.hosts[0].rules, config.hosts[0].locations[0].rules
    assert location.access == AccessList((net("fd00::/8"),), (), ("vpn",))  # not merged
    assert location.basic_auth is None and host.basic_auth is not None
    assert location.rate_limits == (RateLimit(99, 1.0, 99, "host", "app.example.com/api/"),)
    assert location.max_body_size == 0
    # Its own set/add/remove, the host's preset still (security_headers is not set here).
    assert location.response_headers == HeaderOps(set=(("X-Loc", "1"),), default=PRESET)
    lifted = load('allow = ["10.0.0.0/8"]\nsecurity_headers = true\n' + LOC
                  + "allow = []\nsecurity_headers = false\n").hosts[0].locations[0].rules
    assert lifted == Rules()


def test_server_max_body_size_is_every_hosts_default() -> None:
    config = load(LOC, head='[server]\nmax_body_size = "0"\n' + HEAD)
    assert config.hosts[0].rules.max_body_size == 0
    assert config.hosts[0].locations[0].rules.max_body_size == 0


# -- errors ------------------------------------------------------------------------------------

H = "[[hosts]]"
L = "[[hosts.locations]]"
ERRORS = [
    ('allow = ["10.0.0.0/8",\n  "10.0.0.300"]\n', 5,
     f'{H} allow: "10.0.0.300" is not a network: use a CIDR like "10.0.0.0/8" or an IP address'),
    ("deny = 5\n", 4, f'{H} deny: expected an array of CIDRs like "10.0.0.0/8" or IP addresses,'
     " got 5"),
    ('access = "ofice"\n[access.office]\nallow = ["10.0.0.0/8"]\n', 4,
     f"{H} access: no [access.ofice] table (defined: office)"),
    ('access = ["x"]\n', 4, f"{H} access: no [access.x] table (defined: none is defined)"),
    ("[access.office]\n", 4, "[access.office] has neither allow nor deny"),
    ('[access.office]\nallow = ["10.0.0.0/8"]\nlist = []\n', 6,
     "unknown key 'list' in [access.office]"),
    ('[access]\nallow = ["10.0.0.0/8"]\n', 5,
     "[access] allow: expected a table [access.allow] with allow / deny, got an array"),
    ('basic_auth = "alice"\n', 4, f'{H} basic_auth: expected a table like '
     '{ users = { alice = "$2b$..." } } or false, got "alice"'),
    ('basic_auth = { realm = "App" }\n', 4, f"{H} basic_auth: no users (set users or htpasswd)"),
    ('basic_auth = { users = {\n  alice = "$apr1$x$y" } }\n', 5,
     f"{H} basic_auth users alice: unsupported hash (Apache MD5 (apr1)): use bcrypt or argon2, "
     "make it with `htpasswd -B` or `charon hash-password`"),
    ('basic_auth = { users = { "a:b" = "' + BCRYPT + '" } }\n', 4,
     f"{H} basic_auth users a:b: a user name must not be empty or contain ':' or control "
     "characters"),
    ('basic_auth = { users = { a = 1 } }\n', 4, f"{H} basic_auth users a: expected a hash "
     "string, got 1"),
    ('basic_auth = { realm = "a\\"b", users = {} }\n', 4, f'{H} basic_auth realm: "a\\"b": use '
     "printable ASCII without quotes or backslashes (it goes in a WWW-Authenticate header)"),
    ('basic_auth = { user = {} }\n', 4,
     f"unknown key 'user' in {H} basic_auth (did you mean 'users'?)"),
    ("basic_auth = { users = {}, forward_authorization = 1 }\n", 4,
     f"{H} basic_auth forward_authorization: expected true or false, got 1"),
    ('forward_auth = { copy_headers = [] }\n', 4, f"missing required key 'url' in {H} "
     "forward_auth"),
    ('forward_auth = { url = "ftp://a/x" }\n', 4, f'{H} forward_auth url: "ftp://a/x": '
     "unsupported scheme 'ftp' (only http:// and https:// are supported)"),
    ('forward_auth = { url = "http://a/x#f" }\n', 4,
     f'{H} forward_auth url: "http://a/x#f": a URL must not have a fragment'),
    ('forward_auth = { url = "http://a", copy_headers = [\n  "Bad Name"] }\n', 5,
     f'{H} forward_auth copy_headers: "Bad Name" is not a valid header name: letters, digits '
     "and !#$%&'*+-.^_`|~ only"),
    ('forward_auth = { url = "http://a", timeout = "0s" }\n', 4,
     f'{H} forward_auth timeout: must be greater than 0, got "0s"'),
    ("rate_limit = { per = \"1s\" }\n", 4, f"missing required key 'requests' in {H} rate_limit"),
    ("rate_limit = { requests = 0 }\n", 4,
     f"{H} rate_limit requests: must be between 1 and 1000000000, got 0"),
    ("rate_limit = [{ requests = 1 },\n  { requests = 5, burst = 0 }]\n", 5,
     f"{H} rate_limit[1] burst: must be between 1 and 1000000000, got 0"),
    ('rate_limit = { requests = 5, by = "user" }\n', 4, f'{H} rate_limit by: expected "ip" '
     '(a bucket per client) or "host" (one for all), got "user"'),
    ('websocket_rate_limit = { requests = 5, per = "soon" }\n', 4,
     f'{H} websocket_rate_limit per: invalid duration "soon": use e.g. "5s", "250ms", "2m", '
     '"1h", "1m30s"'),
    ("rate_limit = 100\n", 4, f'{H} rate_limit: expected a table like {{ requests = 100, per = '
     '"1s" }, an array of them or false, got 100'),
    ('rate_limit = { requests = 5, burts = 1 }\n', 4,
     f"unknown key 'burts' in {H} rate_limit (did you mean 'burst'?)"),
    ("max_connections = -1\n", 4, f"{H} max_connections: must be between 0 and 10000000, got -1"),
    ('max_websockets_per_ip = "10"\n', 4,
     f'{H} max_websockets_per_ip: expected an integer, got "10"'),
    ('max_body_size = "10 mb"\n', 4, f'{H} max_body_size: invalid size "10 mb": use a number of '
     'bytes or e.g. "512k", "10m", "1g"'),
    ("max_body_size = -5\n", 4, f"{H} max_body_size: must not be negative, got -5"),
    (LOC + "max_connections = 5\n", 7, f"{L} max_connections: can only be set on a [[hosts]] "
     "table: a location shares its host's counts"),
    (LOC + "max_websockets_per_ip = 5\n", 7, f"{L} max_websockets_per_ip: can only be set on a "
     "[[hosts]] table: a location shares its host's counts"),
    (LOC + "rate_limt = {}\n", 7, f"unknown key 'rate_limt' in {L} (did you mean 'rate_limit'?)"),
    ('request_headers = { set = {\n  "X App" = "1" } }\n', 5, f'{H} request_headers set X App: '
     "\"X App\" is not a valid header name: letters, digits and !#$%&'*+-.^_`|~ only"),
    ('request_headers = { set = { "X-A" = "a\\r\\nX-B: 1" } }\n', 4,
     f'{H} request_headers set X-A: "a\\u000d\\u000aX-B: 1": a header value must be printable '
     "ASCII (no CR, LF, NUL or other control characters)"),
    ('request_headers = { add = { "X-A" = "a\\u0000" } }\n', 4,
     f'{H} request_headers add X-A: "a\\u0000": a header value must be printable ASCII '
     "(no CR, LF, NUL or other control characters)"),
    ('request_headers = { set = { "X-A" = "1", "x-a" = "2" } }\n', 4,
     f'{H} request_headers set x-a: the same field as "X-A"'),
    ('request_headers = { set = { "Host" = "a" } }\n', 4,
     f"{H} request_headers set Host: Host cannot be changed: use host_header to change the "
     "Host sent upstream"),
    ('request_headers = { remove = [\n  "Connection"] }\n', 5,
     f"{H} request_headers remove: Connection cannot be changed: a hop-by-hop field: the proxy "
     "manages it per connection"),
    ('response_headers = { add = { "Content-Length" = "5" } }\n', 4,
     f"{H} response_headers add Content-Length: Content-Length cannot be changed: the proxy "
     "writes the body framing itself"),
    ('response_headers = { remove = ["transfer-encoding"] }\n', 4,
     f"{H} response_headers remove: transfer-encoding cannot be changed: the proxy writes the "
     "body framing itself"),
    ('response_headers = { set = { "TE" = "x" } }\n', 4, f"{H} response_headers set TE: TE "
     "cannot be changed: a hop-by-hop field: the proxy manages it per connection"),
    ('response_headers = { delete = ["Server"] }\n', 4,
     f"unknown key 'delete' in {H} response_headers"),
    ('response_headers = ["Server"]\n', 4, f'{H} response_headers: expected a table like '
     '{ set = { "X-App" = "1" }, remove = ["X-Debug"] }, got an array'),
    ('host_header = "a b"\n', 4, f'{H} host_header: "a b": expected a host name or an IP '
     'address, maybe with a port, like "app.example.com" or "[::1]:8080"'),
    ('security_headers = "on"\n', 4, f'{H} security_headers: expected true, false or a table '
     'like { x_frame_options = "DENY" }, got "on"'),
    ("security_headers = { x_frame_options = true }\n", 4, f"{H} security_headers "
     "x_frame_options: expected a header value string or false (no field), got true"),
    ('security_headers = { csp = "x" }\n', 4, f"unknown key 'csp' in {H} security_headers"),
    ('security_headers = { hsts = "1 year" }\n', 4, f'{H} security_headers hsts: must start '
     'with "max-age=" and a number of seconds, got "1 year"'),
    ('hsts = "max-age=1"\nsecurity_headers = { hsts = "max-age=2" }\n', 4,
     f"{H} hsts: set either hsts or security_headers.hsts, not both"),
    (LOC + 'security_headers = { hsts = "max-age=2" }\n', 7,
     f"{L} security_headers hsts: is set per host (a location cannot change it)"),
]
SERVER_ERRORS = [
    ('proxy_protocol = ["127.0.0.1:8080",\n  "127.0.0.1:9"]\n', 4,
     "[server] proxy_protocol: 127.0.0.1:9 is not one of the listen or tls_listen addresses"),
    ('proxy_protocol = "127.0.0.1:9"\n', 3,
     "[server] proxy_protocol: 127.0.0.1:9 is not one of the listen or tls_listen addresses"),
    ("proxy_protocol = 1\n", 3, "[server] proxy_protocol: expected true, false or listen "
     'addresses like ["0.0.0.0:80"], got 1'),
    ('max_connections = "many"\n', 3, '[server] max_connections: expected an integer, got "many"'),
    ("max_connections_per_ip = -1\n", 3,
     "[server] max_connections_per_ip: must be between 0 and 10000000, got -1"),
    ('max_body_size = "1t"\n', 3, '[server] max_body_size: invalid size "1t": use a number of '
     'bytes or e.g. "512k", "10m", "1g"'),
]


@pytest.mark.parametrize(("text", "line", "message"), ERRORS)
def test_errors_name_the_key_and_its_line(text: str, line: int, message: str) -> None:
    assert error(text) == f"c.toml:{line}: {message}"


@pytest.mark.parametrize(("text", "line", "message"), SERVER_ERRORS)
def test_server_errors(text: str, line: int, message: str) -> None:
    head = '[server]\nlisten = ["127.0.0.1:8080"]\n'
    assert error(text, head=head) == f"c.toml:{line}: {message}", text


# -- the example file and `charon check` -------------------------------------------------------


def test_example_file_shows_every_rule_key_and_they_load(tmp_path: Path) -> None:
    text = (ROOT / "deploy/charon.example.toml").read_text()
    host = text[text.index("# Who may come in"):text.index("# Optional: send some paths")]
    lines = {key: re.findall(rf"^# ({key} = .*)$", host, re.M) for key in hostrules.KEYS}
    assert [key for key, found in lines.items() if len(found) != 1] == []
    server_part = text[:text.index("[server.limits]")]
    server = re.findall(rf"^# ((?:{'|'.join(limits.SERVER_KEYS)}) = .*)$", server_part, re.M)
    assert len(server) == len(limits.SERVER_KEYS)
    named = re.search(r"^# (\[access\.office\]\n)# (.*\n)# (.*\n)", text, re.M)
    assert named is not None
    (tmp_path / "app.htpasswd").write_text(f"alice:{BCRYPT}\n")
    body = "\n".join(found[0] for found in lines.values()).replace(
        "/etc/charon/app.htpasswd", str(tmp_path / "app.htpasswd"))
    config = load_config_text(
        "[server]\n" + "\n".join(server).replace("0.0.0.0:8080", "127.0.0.1:8080")
        + '\nlisten = "127.0.0.1:8080"\n' + HEAD + body + "\n" + "".join(named.groups()),
        str(tmp_path / "c.toml"),
    )
    got = config.hosts[0].rules
    assert got.access is not None and got.basic_auth is not None and got.rate_limits
    assert config.server.max_connections == 10000


def test_check_lists_the_rules_of_hosts_and_locations(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    (tmp_path / "h").write_text(f"alice:{BCRYPT}\nbob:{BCRYPT}\n")
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:18080"]\nproxy_protocol = true\nmax_connections = 9\n'
        '[admin]\nlisten = false\n'
        '[access.office]\nallow = ["10.0.0.0/8"]\ndeny = ["10.0.0.66"]\n'
        '[[hosts]]\ndomains = ["plain.example.com"]\nupstream = "http://127.0.0.1:3000"\n'
        + HEAD + 'access = "office"\nbasic_auth = { htpasswd = "h" }\n'
        'rate_limit = { requests = 100, burst = 50 }\nmax_body_size = "10m"\n'
        'max_connections = 5\nrequest_headers = { remove = ["X-Debug"] }\n'
        "security_headers = { referrer_policy = false, hsts = false }\n"
        + LOC + 'allow = []\nforward_auth = { url = "http://127.0.0.1:9091/v" }\n'
        '[[hosts.locations]]\npath = "/same/"\nupstream = "http://127.0.0.1:3002"\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "charon", "check", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"{path}: ok (2 proxy hosts)",
        "  server: proxy_protocol on 127.0.0.1:18080; max_connections 9",
        "  app.example.com: rules",
        "    access: allow 10.0.0.0/8; deny 10.0.0.66 (office)",
        f'    basic_auth: 2 users (bcrypt) from {tmp_path / "h"}, realm "Restricted"',
        "    rate_limit: 100/1s burst 50 by ip",
        "    max_connections: 5",
        "    max_body_size: 10 MiB",
        "    request_headers: remove x-debug",
        "    security_headers: X-Content-Type-Options: nosniff, X-Frame-Options: SAMEORIGIN",
        "  app.example.com/api/: rules as its host's, except",
        "    forward_auth: http://127.0.0.1:9091/v (timeout 5s)",
        "    access: off",
    ]


def test_docs_reference_names_every_key() -> None:
    for doc, keys in (("access.md", (*access.KEYS, *headerrules.KEYS)),
                      ("limits.md", (*limits.KEYS, *limits.SERVER_KEYS))):
        text = (ROOT / "docs" / doc).read_text()
        reference = text[text.index("## Reference: every key"):]
        assert [key for key in keys if f"`{key}" not in reference] == [], doc
