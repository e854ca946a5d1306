"""The configs in the docs load (issue 15): every TOML block of docs/cookbook.md with
load_config, as `charon check` would, and those of README.md; the cookbook has its five
recipes and the README says what is not supported yet."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from harness import REPO

from charon.config import load_config

RECIPES = ("chat server", "path prefix", "several sites", "prometheus and grafana", "systemd")


def toml_blocks(doc: Path) -> list[tuple[int, str]]:
    """(line, text) of every ```toml block."""
    text = doc.read_text()
    return [(text[: m.start()].count("\n") + 2, m[1])
            for m in re.finditer(r"^```toml\n(.*?)^```$", text, re.M | re.S)]


def sections(doc: Path) -> list[tuple[str, str]]:
    """(title, body) of every `## ` section."""
    parts = re.split(r"^## (.*)$", doc.read_text(), flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


COOKBOOK = REPO / "docs" / "cookbook.md"


@pytest.mark.parametrize(("line", "block"), toml_blocks(COOKBOOK),
                         ids=lambda v: str(v) if isinstance(v, int) else "")
def test_every_cookbook_config_loads(tmp_path: Path, line: int, block: str) -> None:
    path = tmp_path / f"cookbook-{line}.toml"
    path.write_text(block)
    config = load_config(str(path))  # raises "PATH:LINE: reason"
    assert config.hosts, f"docs/cookbook.md:{line}: a config without [[hosts]]"


def test_the_cookbook_has_five_complete_recipes() -> None:
    found = sections(COOKBOOK)
    assert len(found) == 5, [title for title, _ in found]
    for (title, body), topic in zip(found, RECIPES, strict=True):
        assert topic in title.lower(), (title, topic)
        assert "```toml" in body, f"recipe {title!r} has no config"
    assert len(toml_blocks(COOKBOOK)) >= 5


@pytest.mark.parametrize(("line", "block"), toml_blocks(REPO / "README.md"),
                         ids=lambda v: str(v) if isinstance(v, int) else "")
def test_every_readme_config_loads(tmp_path: Path, line: int, block: str) -> None:
    path = tmp_path / f"readme-{line}.toml"
    path.write_text(block)
    # The TLS example names certificate files under /etc/charon that are not here.
    load_config(str(path), check_files=False)


def test_readme_says_what_is_not_supported() -> None:
    body = dict(sections(REPO / "README.md"))["Not supported yet"]
    for thing in ("HTTP/2", "h2c", "HTTP/3", "PROXY protocol", "Linux only"):
        assert thing in body, f"README.md's 'Not supported yet' does not mention {thing}"
    assert "TLS" in body and "supported" in body  # TLS has landed: said so
