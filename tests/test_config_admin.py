"""[admin] token, token_file and allowed_origins: the live log's access settings."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from charon.config import ConfigError, load_config

HOST = '[[hosts]]\ndomains = ["a.example.com"]\nupstream = "http://127.0.0.1:3000"\n'


def write(tmp_path: Path, admin: str) -> str:
    path = tmp_path / "charon.toml"
    path.write_text("[admin]\n" + textwrap.dedent(admin).lstrip("\n") + HOST, encoding="utf-8")
    return str(path)


def check_error(tmp_path: Path, admin: str, line: int, message: str) -> None:
    path = write(tmp_path, admin)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.line, info.value.message) == (line, message)


def test_defaults_no_token_no_extra_origins(tmp_path: Path) -> None:
    admin = load_config(write(tmp_path, "")).admin
    assert admin.token is None
    assert admin.allowed_origins == ()


def test_token(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, 'token = "s3cret-T0ken"\n')).admin.token == "s3cret-T0ken"


def test_empty_token_is_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, 'token = ""\n')).admin.token is None


def test_token_not_in_repr(tmp_path: Path) -> None:
    admin = load_config(write(tmp_path, 'token = "s3cret-T0ken"\n')).admin
    assert "s3cret" not in repr(admin)


def test_token_file_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("from-a-file\n")
    assert load_config(write(tmp_path, 'token_file = "admin.token"\n')).admin.token == "from-a-file"


def test_token_file_absolute(tmp_path: Path) -> None:
    token = tmp_path / "sub" / "token"
    token.parent.mkdir()
    token.write_text("  abc123  \n")
    assert load_config(write(tmp_path, f'token_file = "{token}"\n')).admin.token == "abc123"


def test_allowed_origins_normalized(tmp_path: Path) -> None:
    admin = load_config(write(tmp_path, """\
        allowed_origins = [
            "http://localhost:9090",
            "HTTPS://Admin.Example.com:443",
            "http://10.0.0.1:80",
            "http://[::1]:9090",
            "http://localhost:9090",
        ]
    """)).admin
    assert admin.allowed_origins == (
        "http://localhost:9090", "https://admin.example.com", "http://10.0.0.1", "http://[::1]:9090",
    )


@pytest.mark.parametrize(
    ("admin", "line", "message"),
    [
        ("token = 5\n", 2, "[admin] token: expected a token string, got 5"),
        (
            'token = "two words"\n', 2,
            "[admin] token: must be visible ASCII characters only "
            "(no spaces or control characters)",
        ),
        (
            'token = "a"\ntoken_file = "b"\n', 3,
            "[admin] token_file: set either token or token_file, not both",
        ),
        ("token_file = 1\n", 2, "[admin] token_file: expected a file path string, got 1"),
        ("allowed_origins = \"http://a\"\n", 2,
         '[admin] allowed_origins: expected an array of origin strings, got "http://a"'),
        (
            'allowed_origins = ["localhost:9090"]\n', 2,
            '[admin] allowed_origins: expected an origin like "http://localhost:9090" or '
            '"https://admin.example.com", got "localhost:9090"',
        ),
        (
            'allowed_origins = [\n  "http://ok:1",\n  "http://localhost:9090/",\n]\n', 4,
            '[admin] allowed_origins: "http://localhost:9090/": an origin is only '
            'scheme://host[:port], without a path (e.g. "http://localhost:9090")',
        ),
        (
            'allowed_origins = ["ws://localhost:9090"]\n', 2,
            '[admin] allowed_origins: expected an origin like "http://localhost:9090" or '
            '"https://admin.example.com", got "ws://localhost:9090"',
        ),
        (
            'allowed_origins = ["http://bad_name:1"]\n', 2,
            '[admin] allowed_origins: "http://bad_name:1": "bad_name" is not an IP address or '
            "a DNS name",
        ),
        (
            'allowed_origins = ["http://x:99999"]\n', 2,
            '[admin] allowed_origins: "http://x:99999": the port must be a number from 1 to 65535',
        ),
        ('tokn = "a"\n', 2, "unknown key 'tokn' in [admin] (did you mean 'token'?)"),
    ],
)
def test_errors(tmp_path: Path, admin: str, line: int, message: str) -> None:
    check_error(tmp_path, admin, line, message)


def test_token_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    check_error(
        tmp_path, f'token_file = "{missing}"\n', 2,
        f'[admin] token_file: cannot read "{missing}": No such file or directory',
    )


def test_token_file_empty(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    empty = tmp_path / "empty"
    check_error(tmp_path, 'token_file = "empty"\n', 2, f'[admin] token_file: "{empty}" is empty')


def test_token_file_with_spaces_inside(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("two words\n")
    check_error(
        tmp_path, 'token_file = "t"\n', 2,
        f'[admin] token_file: the token in "{tmp_path / "t"}" must be visible ASCII characters '
        "only (no spaces or control characters)",
    )


def test_admin_events_switch(tmp_path: Path) -> None:
    from charon.config import load_config_text

    base = '[[hosts]]\ndomains = ["a.example"]\nupstream = "http://127.0.0.1:1"\n'
    assert load_config_text(base, "c.toml").admin.events is True
    off = load_config_text("[admin]\nevents = false\n" + base, "c.toml")
    assert off.admin.events is False
    with pytest.raises(ConfigError) as err:
        load_config_text('[admin]\nevents = "no"\n' + base, "c.toml")
    assert str(err.value) == 'c.toml:2: [admin] events: expected true or false, got "no"'
