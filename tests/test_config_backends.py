"""Several backends per host or location (issue 13), config side: `upstreams` and the balancing,
health and retry keys parsed into `Backends`, with the exact "PATH:LINE: message" of errors,
inheritance by locations, sharing, the example file and `charon check`'s listing."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from charon.config import ConfigError, load_config, load_config_text
from charon.config import backends as config_backends
from charon.config.model import Backends, HealthCheck, Target, Upstream
from charon.config.sharing import share_equal

ROOT = Path(__file__).resolve().parent.parent
HEAD = '[[hosts]]\ndomains = ["chat.example.com"]\n'  # the host's keys start at line 3
ONE = 'upstreams = ["http://10.0.0.1:3000"]\n'


def load(text: str, *, check_files: bool = True) -> Backends:
    """The first host's backends of HEAD + text."""
    return load_config_text(HEAD + text, "c.toml", check_files=check_files).hosts[0].backends


def up(url: str, host: str, port: int, **tls: object) -> Upstream:
    return Upstream(url, host, port, tls=url.startswith("https"), **tls)  # type: ignore[arg-type]


# -- every key ---------------------------------------------------------------------------------


def test_every_host_key() -> None:
    text = textwrap.dedent(
        """\
        upstreams = [
          "http://10.0.0.1:3000",
          { url = "http://10.0.0.2:3000", weight = 2 },
          { url = "http://10.0.0.3:3000", backup = true },
          { url = "HTTP://App.Internal:3000", max_connections = 100, drain = true },
        ]
        lb_policy = "header_hash"
        lb_header = "X-User-Id"
        max_fails = 3
        fail_timeout = "30s"
        fail_status = [504, 502, 503, 502]
        slow_start = "1m"
        max_retries = 0
        retry_budget = 0.5
        resolve_interval = 0
        """
    ) + (
        'health_check = { path = "/healthz?deep=1", interval = "5s", timeout = "2s", '
        "expect_status = [204, 200], healthy_threshold = 4, unhealthy_threshold = 5, "
        'websocket = false, host = "probe.example.com:8080" }\n'
    )
    assert load(text) == Backends(
        name="chat.example.com",
        targets=(
            Target(up("http://10.0.0.1:3000", "10.0.0.1", 3000)),
            Target(up("http://10.0.0.2:3000", "10.0.0.2", 3000), weight=2),
            Target(up("http://10.0.0.3:3000", "10.0.0.3", 3000), backup=True),
            Target(
                up("HTTP://App.Internal:3000", "app.internal", 3000),
                max_connections=100,
                drain=True,
            ),
        ),
        policy="header_hash",
        hash_header="x-user-id",
        max_fails=3,
        fail_timeout=30.0,
        fail_status=(502, 503, 504),
        health_check=HealthCheck(
            path="/healthz?deep=1",
            interval=5.0,
            timeout=2.0,
            expect_status=(200, 204),
            healthy_threshold=4,
            unhealthy_threshold=5,
            websocket=False,
            host="probe.example.com:8080",
        ),
        slow_start=60.0,
        max_retries=0,
        retry_budget=0.5,
        resolve_interval=0.0,
    )


@pytest.mark.parametrize("policy", ["round_robin", "least_conn", "random_two", "ip_hash"])
def test_policies_without_options(policy: str) -> None:
    assert load(f'{ONE}lb_policy = "{policy}"\n').policy == policy


def test_cookie_policy_and_its_name() -> None:
    assert load(f'{ONE}lb_policy = "cookie"\n').cookie_name == "charon_target"
    assert load(f'{ONE}lb_policy = "cookie"\nlb_cookie = "sid"\n').cookie_name == "sid"


def test_array_of_tables_form() -> None:
    text = (
        '[[hosts.upstreams]]\nurl = "http://10.0.0.1:3000"\n'
        '[[hosts.upstreams]]\nurl = "http://10.0.0.2:3000"\nweight = 3\n'
    )
    targets = load(text).targets
    assert [(t.upstream.url, t.weight) for t in targets] == [
        ("http://10.0.0.1:3000", 1),
        ("http://10.0.0.2:3000", 3),
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('{ websocket = true, path = "/ws" }', HealthCheck(path="/ws", websocket=True)),
        ("{}", HealthCheck()),
        ('{ host = "10.0.0.1" }', HealthCheck(host="10.0.0.1")),
        ('{ host = "[::1]:8080" }', HealthCheck(host="[::1]:8080")),
        ('{ interval = "2s", timeout = "2s" }', HealthCheck(interval=2.0, timeout=2.0)),
        ("false", None),
    ],
)
def test_health_check_forms(value: str, expected: HealthCheck | None) -> None:
    assert load(f"{ONE}health_check = {value}\n").health_check == expected


def test_health_check_as_a_sub_table() -> None:
    text = f'{ONE}[hosts.health_check]\npath = "/up"\nunhealthy_threshold = 1\n'
    assert load(text).health_check == HealthCheck(path="/up", unhealthy_threshold=1)


# -- defaults ----------------------------------------------------------------------------------


def test_one_upstream_is_a_one_target_backends_with_the_defaults() -> None:
    backends = load('upstream = "http://10.0.0.1:3000"\n')
    upstream = up("http://10.0.0.1:3000", "10.0.0.1", 3000)
    assert backends == Backends("chat.example.com", (Target(upstream),))
    assert backends.upstream == upstream
    assert (backends.policy, backends.hash_header, backends.cookie_name) == (
        "round_robin", None, "charon_target"
    )
    assert (backends.max_fails, backends.fail_timeout, backends.fail_status) == (1, 10.0, ())
    assert (backends.health_check, backends.slow_start) == (None, 0.0)
    assert (backends.max_retries, backends.retry_budget, backends.resolve_interval) == (
        2, 0.2, 30.0
    )
    assert Target(upstream) == Target(upstream, weight=1, backup=False, max_connections=0)
    assert HealthCheck() == HealthCheck(
        "/", 10.0, 5.0, (), healthy_threshold=2, unhealthy_threshold=3, websocket=False, host=None
    )
    # upstreams with one URL is the same thing
    assert load(ONE) == Backends("chat.example.com", (Target(upstream),))


# -- locations ---------------------------------------------------------------------------------

HOST_SETTINGS = textwrap.dedent(
    """\
    upstreams = ["http://10.0.0.1:3000", "http://10.0.0.2:3000"]
    lb_policy = "header_hash"
    lb_header = "X-User"
    max_fails = 2
    fail_status = [502]
    health_check = { path = "/healthz", interval = "3s", timeout = "1s", expect_status = [200] }
    slow_start = "20s"
    max_retries = 1
    """
)


LOC = HOST_SETTINGS.count("\n") + 3  # the line of [[hosts.locations]]; its path is LOC + 1


def location(*lines: str) -> str:
    return HOST_SETTINGS + '[[hosts.locations]]\npath = "/api/"\n' + "".join(
        line + "\n" for line in lines
    )


def test_location_inherits_the_hosts_settings_not_its_targets() -> None:
    config = load_config_text(HEAD + location('upstream = "http://10.0.1.1:4000"'), "c.toml")
    host = config.hosts[0].backends
    api = config.hosts[0].locations[0].backends
    assert api.name == "chat.example.com/api/"
    assert api.targets == (Target(up("http://10.0.1.1:4000", "10.0.1.1", 4000)),)
    assert api == Backends(**{**vars(host), "name": api.name, "targets": api.targets})


def test_location_overrides_and_merges() -> None:
    config = load_config_text(
        HEAD
        + location(
            'upstreams = ["http://10.0.1.1:4000", { url = "http://10.0.1.2:4000", backup = true }]',
            'lb_policy = "least_conn"',
            "max_fails = 0",
            'health_check = { path = "/api/health" }',
        ),
        "c.toml",
    )
    api = config.hosts[0].locations[0].backends
    assert [t.backup for t in api.targets] == [False, True]
    assert (api.policy, api.hash_header, api.max_fails) == ("least_conn", None, 0)
    # the keys of its health check it does not set are the host's
    assert api.health_check == HealthCheck("/api/health", 3.0, 1.0, (200,))
    assert (api.fail_status, api.slow_start, api.max_retries) == ((502,), 20.0, 1)


def test_location_health_check_false_and_websocket() -> None:
    base = 'upstream = "http://10.0.1.1:4000"'
    off = load_config_text(HEAD + location(base, "health_check = false"), "c.toml")
    assert off.hosts[0].locations[0].backends.health_check is None
    ws = load_config_text(HEAD + location(base, "health_check = { websocket = true }"), "c.toml")
    # a WebSocket check expects 101: the host's expect_status is not carried over
    assert ws.hosts[0].locations[0].backends.health_check == HealthCheck(
        "/healthz", 3.0, 1.0, (), websocket=True
    )


def test_location_header_and_cookie() -> None:
    base = 'upstream = "http://10.0.1.1:4000"'
    own = load_config_text(HEAD + location(base, 'lb_header = "X-Other"'), "c.toml")
    assert own.hosts[0].locations[0].backends.hash_header == "x-other"
    text = HEAD + ONE + 'lb_policy = "cookie"\nlb_cookie = "sid"\n'
    text += f'[[hosts.locations]]\npath = "/a/"\n{base}\n'
    text += f'[[hosts.locations]]\npath = "/b/"\n{base}\nlb_policy = "ip_hash"\n'
    a, b = load_config_text(text, "c.toml").hosts[0].locations
    assert (a.backends.policy, a.backends.cookie_name) == ("cookie", "sid")
    assert (b.backends.policy, b.backends.cookie_name) == ("ip_hash", "charon_target")


# -- TLS toward https:// targets ---------------------------------------------------------------


def test_tls_settings_apply_to_every_https_target(tmp_path: Path) -> None:
    text = (
        'upstreams = ["https://10.0.0.1", "http://10.0.0.2", "https://10.0.0.3:8443"]\n'
        'tls_ca = "ca.pem"\n'
        '[[hosts.locations]]\npath = "/x/"\n'
        'upstreams = ["https://10.0.1.1", "https://10.0.1.2"]\ntls_verify = false\n'
    )
    config = load_config_text(HEAD + text, str(tmp_path / "c.toml"), check_files=False)
    host = config.hosts[0]
    ca = str(tmp_path / "ca.pem")
    targets = [t.upstream for t in host.backends.targets]
    assert [(u.tls, u.tls_verify, u.tls_ca) for u in targets] == [
        (True, True, ca), (False, True, None), (True, True, ca)
    ]
    targets = [t.upstream for t in host.locations[0].backends.targets]
    assert [(u.tls_verify, u.tls_ca) for u in targets] == [(False, None), (False, None)]


def test_tls_verify_is_used_when_any_target_is_https() -> None:
    # the host's https target is its location's second one
    text = (
        'upstream = "http://10.0.0.1"\ntls_verify = false\n'
        '[[hosts.locations]]\npath = "/x/"\nupstreams = ["http://10.0.1.1", "https://10.0.1.2"]\n'
    )
    target = load_config_text(HEAD + text, "c.toml").hosts[0].locations[0].backends.targets[1]
    assert target.upstream.tls_verify is False


# -- errors ------------------------------------------------------------------------------------


def check_error(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(HEAD + text, "c.toml")
    assert (info.value.line, info.value.message) == (line, message)
    assert str(info.value) == f"c.toml:{line}: {message}"


TARGET_ERRORS = [
    (
        'upstream = "http://a:1"\nupstreams = ["http://b:1"]\n',
        4,
        "[[hosts]] upstreams: set either upstream (one target) or upstreams, not both",
    ),
    ("upstreams = []\n", 3, "[[hosts]] upstreams: must list at least one target"),
    (
        'upstream = ["http://a:1", "http://b:1"]\n',
        3,
        "[[hosts]] upstream: is one URL: write several targets as upstreams = [...]",
    ),
    (
        'upstreams = "http://a:1"\n',
        3,
        '[[hosts]] upstreams: expected an array of upstream URLs or { url = "...", ... } tables, '
        'got "http://a:1"',
    ),
    (
        'upstreams = [\n  "http://a:1",\n  "http://a:1",\n]\n',
        5,
        '[[hosts]] upstreams: "http://a:1" is the same backend as the target at line 4',
    ),
    (
        'upstreams = [\n  "http://a",\n  { url = "HTTP://A:80" },\n]\n',
        5,
        '[[hosts]] upstreams: "HTTP://A:80" is the same backend as the target at line 4',
    ),
    (
        'upstreams = [\n  { url = "http://a:1", backup = true },\n]\n',
        3,
        "[[hosts]] upstreams: every target is a backup: at least one must not be",
    ),
    (
        'upstreams = [\n  "http://a:1",\n  { url = "http://b:1",\n    weight = 0 },\n]\n',
        6,
        "[[hosts]] upstreams[1] weight: must be between 1 and 1000, got 0",
    ),
    (
        'upstreams = [\n  "http://a:1",\n  { url = "http://b:1", weight = 1001 },\n]\n',
        5,
        "[[hosts]] upstreams[1] weight: must be between 1 and 1000, got 1001",
    ),
    (
        'upstreams = [\n  "http://a:1",\n  { url = "http://b:1", wieght = 2 },\n]\n',
        5,
        "unknown key 'wieght' in [[hosts]] upstreams[1] (did you mean 'weight'?)",
    ),
    (
        'upstreams = [\n  "http://a:1",\n  { weight = 2 },\n]\n',
        5,
        "missing required key 'url' in [[hosts]] upstreams[1]",
    ),
    (
        'upstreams = [{ url = "http://a:1", backup = "yes" }]\n',
        3,
        '[[hosts]] upstreams[0] backup: expected true or false, got "yes"',
    ),
    (
        'upstreams = [{ url = "http://a:1", max_connections = -1 }]\n',
        3,
        "[[hosts]] upstreams[0] max_connections: must be at least 0, got -1",
    ),
    (
        'upstreams = [{ url = "http://a:1", drain = 1 }]\n',
        3,
        "[[hosts]] upstreams[0] drain: expected true or false, got 1",
    ),
    (
        'upstreams = [\n  "http://a:1",\n  3,\n]\n',
        5,
        '[[hosts]] upstreams: expected an upstream URL or a { url = "...", ... } table, got 3',
    ),
    (
        'upstreams = [\n  "http://a:1",\n  "ftp://b",\n]\n',
        5,
        '[[hosts]] upstreams: "ftp://b": unsupported scheme \'ftp\' '
        "(only http:// and https:// are supported)",
    ),
    (
        'upstreams = [{ url = "http://a:1/path" }]\n',
        3,
        '[[hosts]] upstreams[0] url: "http://a:1/path": upstream must not have a path: '
        "Charon forwards the request path unchanged",
    ),
    (
        '[[hosts.upstreams]]\nurl = "http://b:1"\n[[hosts.upstreams]]\nurl = "http://c:1"\n'
        "weight = 1001\n",
        7,
        "[[hosts]] upstreams[1] weight: must be between 1 and 1000, got 1001",
    ),
    (
        'upstreams = [\n  "http://a:1",\n]\ntls_verify = false\n',
        6,
        "[[hosts]] tls_verify: only applies to https:// upstreams, and there is none here",
    ),
]

SETTING_ERRORS = [
    (
        f'{ONE}lb_policy = "fastest"\n',
        4,
        '[[hosts]] lb_policy: unknown policy "fastest": use one of round_robin, least_conn, '
        "random_two, ip_hash, header_hash, cookie",
    ),
    (f"{ONE}lb_policy = 1\n", 4, "[[hosts]] lb_policy: expected a policy name string, got 1"),
    (
        f'{ONE}lb_header = "X-A"\n',
        4,
        '[[hosts]] lb_header: only applies with lb_policy = "header_hash"',
    ),
    (
        f'{ONE}lb_policy = "header_hash"\n',
        4,
        '[[hosts]] lb_policy: "header_hash" needs lb_header, the header to hash',
    ),
    (
        f'{ONE}lb_policy = "header_hash"\nlb_header = "X A"\n',
        5,
        "[[hosts]] lb_header: \"X A\" is not a valid header name: letters, digits and "
        "!#$%&'*+-.^_`|~ only",
    ),
    (
        f'{ONE}lb_policy = "cookie"\nlb_cookie = "a;b"\n',
        5,
        "[[hosts]] lb_cookie: \"a;b\" is not a valid cookie name: letters, digits and "
        "!#$%&'*+-.^_`|~ only",
    ),
    (f'{ONE}lb_cookie = "c"\n', 4, '[[hosts]] lb_cookie: only applies with lb_policy = "cookie"'),
    (f"{ONE}max_fails = -1\n", 4, "[[hosts]] max_fails: must be between 0 and 1000, got -1"),
    (
        f'{ONE}fail_timeout = "soon"\n',
        4,
        '[[hosts]] fail_timeout: invalid duration "soon": '
        'use e.g. "5s", "250ms", "2m", "1h", "1m30s"',
    ),
    (
        f"{ONE}fail_status = [\n 502,\n 404,\n]\n",
        6,
        "[[hosts]] fail_status: must be between 500 and 599, got 404",
    ),
    (
        f"{ONE}fail_status = 502\n",
        4,
        "[[hosts]] fail_status: expected an array of status codes, got 502",
    ),
    (f"{ONE}slow_start = -1\n", 4, "[[hosts]] slow_start: must not be negative, got -1"),
    (f"{ONE}max_retries = 21\n", 4, "[[hosts]] max_retries: must be between 0 and 20, got 21"),
    (f"{ONE}retry_budget = 1.5\n", 4, "[[hosts]] retry_budget: must be between 0 and 1, got 1.5"),
    (
        f'{ONE}retry_budget = "20%"\n',
        4,
        '[[hosts]] retry_budget: expected a number from 0 to 1, got "20%"',
    ),
    (f"{ONE}resolve_interval = true\n", 4,
     '[[hosts]] resolve_interval: expected a duration like "5s", got true'),
]

HEALTH_ERRORS = [
    (
        f'{ONE}health_check = "/x"\n',
        4,
        '[[hosts]] health_check: expected a table like { path = "/healthz" } or false, got "/x"',
    ),
    (
        f"{ONE}health_check = true\n",
        4,
        '[[hosts]] health_check: expected a table like { path = "/healthz" } or false, got true',
    ),
    (
        f'{ONE}health_check = {{ pth = "/" }}\n',
        4,
        "unknown key 'pth' in [hosts.health_check] (did you mean 'path'?)",
    ),
    (f'{ONE}health_check = {{ path = "x" }}\n', 4,
     "[hosts.health_check] path: must start with '/', got \"x\""),
    (
        f'{ONE}health_check = {{ path = "/a b" }}\n',
        4,
        "[hosts.health_check] path: must be visible ASCII without spaces or '#', got \"/a b\"",
    ),
    (
        f'{ONE}health_check = {{ interval = "0s" }}\n',
        4,
        '[hosts.health_check] interval: must be greater than 0, got "0s"',
    ),
    (
        f'{ONE}health_check = {{ interval = "1s", timeout = "2s" }}\n',
        4,
        "[hosts.health_check] timeout: the timeout (2s) must not be longer than the interval (1s)",
    ),
    (
        f'{ONE}health_check = {{ interval = "2s" }}\n',
        4,
        "[hosts.health_check] interval: the timeout (5s) must not be longer than the interval (2s)",
    ),
    (
        f"{ONE}[hosts.health_check]\nexpect_status = [\n  200,\n  99,\n]\n",
        7,
        "[hosts.health_check] expect_status: must be between 100 and 599, got 99",
    ),
    (
        f"{ONE}health_check = {{ expect_status = [] }}\n",
        4,
        "[hosts.health_check] expect_status: must list at least one status "
        "(leave it out for any 2xx or 3xx)",
    ),
    (
        f"{ONE}health_check = {{ websocket = true, expect_status = [200] }}\n",
        4,
        "[hosts.health_check] expect_status: a WebSocket check expects 101: "
        "leave expect_status out",
    ),
    (
        f"{ONE}health_check = {{ healthy_threshold = 0 }}\n",
        4,
        "[hosts.health_check] healthy_threshold: must be between 1 and 100, got 0",
    ),
    (
        f"{ONE}health_check = {{ unhealthy_threshold = 101 }}\n",
        4,
        "[hosts.health_check] unhealthy_threshold: must be between 1 and 100, got 101",
    ),
    (
        f'{ONE}health_check = {{ websocket = "yes" }}\n',
        4,
        '[hosts.health_check] websocket: expected true or false, got "yes"',
    ),
    *(
        (
            f'{ONE}health_check = {{ host = "{bad}" }}\n',
            4,
            f'[hosts.health_check] host: "{bad}": expected a host name or an IP address, '
            'maybe with a port, like "app.example.com" or "[::1]:8080"',
        )
        for bad in ("a b", "a.example:0", "::1", "[::1", "[::1]x", "a.example:", "[1.2.3.4]")
    ),
]

LOCATION_ERRORS = [
    (
        location('upstream = "http://b:1"', "upstreams = []"),
        LOC + 3,
        "[[hosts.locations]] upstreams: set either upstream (one target) or upstreams, not both",
    ),
    (
        location('upstreams = ["http://b:1"]', 'lb_policy = "round_robin"', 'lb_header = "X"'),
        LOC + 4,
        '[[hosts.locations]] lb_header: only applies with lb_policy = "header_hash"',
    ),
    (
        location('upstreams = ["http://b:1"]', 'lb_cookie = "x"'),
        LOC + 3,
        '[[hosts.locations]] lb_cookie: only applies with lb_policy = "cookie"',
    ),
    (
        location('upstreams = ["http://b:1"]', "health_check = { websocket = true, "
                 "expect_status = [101] }"),
        LOC + 3,
        "[hosts.locations.health_check] expect_status: a WebSocket check expects 101: "
        "leave expect_status out",
    ),
    (
        location('upstreams = ["http://b:1"]', 'health_check = { interval = "500ms" }'),
        LOC + 3,
        "[hosts.locations.health_check] interval: the timeout (1s) must not be longer than "
        "the interval (0.5s)",
    ),
    (
        ONE + '[[hosts.locations]]\npath = "/a/"\nlb_policy = "cookie"\n',
        4,
        "missing required key 'upstream' in [[hosts.locations]]",
    ),
    (
        ONE + '[[hosts.locations]]\npath = "/a/"\nupstream = "http://b"\n'
        'lb_policy = "header_hash"\n',
        7,
        '[[hosts.locations]] lb_policy: "header_hash" needs lb_header, the header to hash',
    ),
    (
        ONE + '[[hosts.locations]]\npath = "/a/"\nupstreams = [\n "http://b",\n "http://c",\n'
        ' "http://b:80",\n]\n',
        9,
        '[[hosts.locations]] upstreams: "http://b:80" is the same backend as the target at '
        "line 7",
    ),
    (
        ONE + '[[hosts.locations]]\npath = "/a/"\nupstreams = ["http://b"]\ntls_verify = true\n',
        7,
        "[[hosts.locations]] tls_verify: only applies to https:// upstreams, and there is none "
        "here",
    ),
]


@pytest.mark.parametrize(
    ("text", "line", "message"),
    TARGET_ERRORS + SETTING_ERRORS + HEALTH_ERRORS + LOCATION_ERRORS,
)
def test_errors_name_the_key_and_its_line(text: str, line: int, message: str) -> None:
    check_error(text, line, message)


# -- sharing, the example file, the listing ----------------------------------------------------


def test_equal_targets_and_health_checks_are_shared() -> None:
    parts = []
    for i in range(20):
        parts.append(
            f'[[hosts]]\ndomains = ["h{i}.test"]\n'
            'upstreams = ["http://10.0.0.1:3000",\n'
            '  { url = "http://10.0.0.2:3000", weight = 2 }]\n'
            'health_check = { path = "/up" }\n'
            f'[[hosts.locations]]\npath = "/ws/"\nupstreams = ["http://10.0.0.2:3000"]\n'
        )
    config = load_config_text("\n".join(parts), "c.toml")
    shared = share_equal(config)
    assert shared == config
    after = pickle.loads(pickle.dumps(shared, pickle.HIGHEST_PROTOCOL))
    assert after == config
    hosts = after.hosts
    assert len({id(h.backends.targets[1]) for h in hosts}) == 1
    assert len({id(h.backends.health_check) for h in hosts}) == 1
    # the same address with another weight: its Upstream is still one object
    second = {id(h.backends.targets[1].upstream) for h in hosts}
    location = {id(h.locations[0].backends.targets[0].upstream) for h in hosts}
    assert len(second | location) == 1
    assert len({id(h.locations[0].backends.health_check) for h in hosts}) == 1


def test_example_file_loads_and_documents_every_key() -> None:
    path = ROOT / "deploy/charon.example.toml"
    config = load_config(str(path))
    app = config.hosts[0]
    live = next(loc for loc in app.locations if loc.path == "/live/")
    assert live.backends == Backends(
        "app.example.com/live/",
        (
            Target(up("http://127.0.0.1:4001", "127.0.0.1", 4001)),
            Target(up("http://127.0.0.1:4002", "127.0.0.1", 4002), weight=2),
        ),
        policy="cookie",
        health_check=HealthCheck("/live/health", 5.0, 2.0, websocket=True),
    )
    text = path.read_text()
    missing = [
        key for key in config_backends.KEYS if not re.search(rf"^(# )?{key} = ", text, re.M)
    ]
    assert missing == []
    # the commented example of several targets and settings is valid once uncommented
    block = re.search(r"^# upstreams = \[\n(#  .*\n)+# \]\n", text, re.M)
    assert block is not None
    others = [key for key in config_backends.SETTING_KEYS if not key.startswith("lb_")]
    settings = re.findall(rf"^# ((?:{'|'.join(others)}) = .*\n)", text, re.M)
    assert len(settings) == len(others)
    backends = load(re.sub(r"^# ?", "", block[0], flags=re.M) + "".join(settings))
    assert len(backends.targets) == 4 and backends.health_check is not None


def test_check_lists_targets_policy_and_health_check(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:18080"]\n[admin]\nlisten = false\n'
        '[[hosts]]\ndomains = ["plain.example.com"]\nupstream = "http://127.0.0.1:3000"\n'
        + HEAD
        + 'upstreams = [\n  "http://10.0.0.1:3000",\n'
        '  { url = "http://10.0.0.2:3000", weight = 2 },\n'
        '  { url = "http://10.0.0.3:3000", backup = true, max_connections = 5, drain = true },\n]\n'
        'lb_policy = "least_conn"\nhealth_check = { path = "/healthz", expect_status = [200] }\n'
        '[[hosts.locations]]\npath = "/ws/"\nupstream = "http://10.0.1.1:4000"\n'
        "health_check = false\n"
        'lb_policy = "cookie"\n'
        '[[hosts.locations]]\npath = "/plain/"\nupstream = "http://10.0.1.1:4000"\n'
        'lb_policy = "round_robin"\nhealth_check = false\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "charon", "check", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.splitlines() == [
        f"{path}: ok (2 proxy hosts)",
        "  chat.example.com: 3 targets, least_conn, health check GET /healthz every 10s "
        "(timeout 5s, expect 200)",
        "    http://10.0.0.1:3000",
        "    http://10.0.0.2:3000 (weight 2)",
        "    http://10.0.0.3:3000 (backup, max_connections 5, drain)",
        "  chat.example.com/ws/: 1 target, cookie charon_target, no active health check",
        "    http://10.0.1.1:4000",
    ]
