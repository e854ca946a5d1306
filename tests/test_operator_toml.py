"""TOML syntax errors name the key and the line that caused them (issue 15): an unclosed array
points at its opening line, not where the parser gave up; a key set twice is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from harness import REPO

from charon.config import ConfigError, load_config_text

HOST = '[[hosts]]\ndomains = ["a.example.com"]\nupstream = "http://127.0.0.1:3000"\n'


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "c.toml")
    return info.value


@pytest.mark.parametrize(
    ("text", "line", "key", "stopped"),
    [
        # the next table header
        ('[server]\nlisten = [\n  "127.0.0.1:8080",\n  "[::1]:8080"\n\n[admin]\nlisten = "x"\n',
         2, "server.listen", "line 6"),
        # the next key of the same table
        ('[[hosts]]\ndomains = ["a.example.com"\nupstream = "http://127.0.0.1:3000"\n',
         2, "hosts.domains", "line 3"),
        # the end of the file
        (f'{HOST}[[hosts]]\ndomains = [\n  "b.example.com",\n', 5, "hosts.domains",
         "the end of the file"),
        # a comment that looks like the closing bracket
        ("[server]\ntrusted_proxies = ['10.0.0.1',  # ]\n\nworkers = 2\n", 2,
         "server.trusted_proxies", "line 4"),
    ],
    ids=["before-header", "before-key", "at-eof", "bracket-in-comment"],
)
def test_unclosed_array_points_at_its_opening_line(
    text: str, line: int, key: str, stopped: str
) -> None:
    err = error_of(text)
    assert err.line == line, err
    assert err.message.startswith(f"invalid TOML: Unclosed array: the '[' of '{key}'"), err
    assert f"parser stopped at {stopped}" in err.message, err


def test_a_bad_value_inside_an_array_is_reported_where_it_is() -> None:
    err = error_of("[server]\nlisten = [\n  '127.0.0.1:8080'\n  '[::1]:8080',\n]\n")
    assert (err.line, err.message) == (4, "invalid TOML: Unclosed array")  # a missing comma


def test_unclosed_inline_table_over_several_lines() -> None:
    text = f'{HOST}timeouts = {{\n  connect = "1s",\n  idle = "2s",\n\n[admin]\nlisten = ""\n'
    err = error_of(text)
    assert err.line == 4, err
    assert "Unclosed inline table: the '{' of 'hosts.timeouts'" in err.message, err


def test_unterminated_multiline_string_points_at_its_start() -> None:
    err = error_of(f'[admin]\ntoken = """abc\n\n{HOST}')
    assert err.line == 2, err
    assert "the string opened on this line is never closed" in err.message, err


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[server]\nworkers = 1\nlisten = []\nworkers = 2\n", 4,
         "'server.workers' is set twice (first set on line 2)"),
        # a multi-line value: the parser reports the end of the second value
        ("[server]\nlisten = ['127.0.0.1:1']\nlisten = [\n  '127.0.0.1:2',\n]\n", 3,
         "'server.listen' is set twice (first set on line 2)"),
        # the same key in two [[hosts]] is fine; twice in the second one is not
        (f'{HOST}{HOST}upstream = "http://127.0.0.1:4000"\n', 7,
         "'hosts.upstream' is set twice (first set on line 6)"),
        ('[server.limits]\nmax_header_count = 10\n"max_header_count" = 11\n', 3,
         "'server.limits.max_header_count' is set twice (first set on line 2)"),
    ],
    ids=["plain", "multi-line", "array-of-tables", "quoted"],
)
def test_a_key_set_twice_is_named(text: str, line: int, message: str) -> None:
    err = error_of(text)
    assert err.line == line, err
    assert err.message == f"invalid TOML: Cannot overwrite a value: {message}", err


def test_a_table_declared_twice_names_the_first() -> None:
    err = error_of("[server]\nworkers = 1\n[admin]\n[server]\n")
    assert err.line == 4, err
    assert err.message == "invalid TOML: Cannot declare ('server',) twice (first on line 1)"


def test_charon_check_prints_the_opening_line(tmp_path: Path) -> None:
    path = tmp_path / "charon.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:8080",\n\n{HOST}')
    result = subprocess.run([sys.executable, "-m", "charon", "check", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith(f"{path}:2: invalid TOML: Unclosed array: "
                                    "the '[' of 'server.listen'"), result.stderr
