"""CLI conventions (issue 15): `charon --version`, `--help` listing every subcommand on one line
each, the exit codes it documents, and the same codes in docs/operations.md."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

from harness import REPO

import charon

COMMANDS = ("demo", "run", "check", "reload", "logs", "hash-password")


def charon_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "charon", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "COLUMNS": "80"})


def test_version_matches_the_package() -> None:
    result = charon_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"charon {charon.__version__}\n"
    # pyproject takes its version from the package: one place to change it.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" in project["dynamic"]
    dynamic = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert dynamic["dynamic"]["version"] == {"attr": "charon.__version__"}


def test_help_lists_every_subcommand_on_one_line() -> None:
    result = charon_cli("--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for command in COMMANDS:
        (line,) = [line for line in lines if re.match(rf"\s+{command}\s{{2,}}\S", line)]
        at = lines.index(line)
        # the next line is the next command or the end of the list, never a wrapped rest
        following = lines[at + 1]
        assert following == "" or re.match(rf"\s+({'|'.join(COMMANDS)})\s", following), (
            f"the help of {command!r} takes more than one line:\n{result.stdout}")
    assert "--version" in result.stdout
    for code in ("0", "1", "2"):
        assert re.search(rf"^\s+{code}\s+\S", result.stdout, re.M), result.stdout


def test_every_subcommand_has_its_own_help() -> None:
    for command in COMMANDS:
        result = charon_cli(command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.startswith(f"usage: charon {command}"), result.stdout


def test_exit_codes_as_documented() -> None:
    assert charon_cli().returncode == 2  # no command
    assert charon_cli("bogus").returncode == 2
    assert charon_cli("check").returncode == 2  # a missing argument
    missing = charon_cli("check", "/nonexistent/charon.toml")
    assert missing.returncode == 1 and "cannot read" in missing.stderr, missing
    bad = charon_cli("demo", "--listen", "localhost:80")
    assert bad.returncode == 2 and "use an IP address" in bad.stderr, bad


def test_operations_doc_lists_the_exit_codes() -> None:
    text = (REPO / "docs/operations.md").read_text()
    section = text[text.index("## Exit status"):]
    for code in ("`0`", "`1`", "`2`"):
        assert code in section.split("\n## ")[0], f"docs/operations.md: no exit status {code}"
