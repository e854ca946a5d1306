"""Packaging (issue 15): an MIT LICENSE matching pyproject's SPDX string, a bounded build
requirement, compatible ranges for the dependencies with every version pinned exactly in
constraints.txt (the one bootstrap and CI install with), and tests/setup.sh that waits for the
dpkg lock and says how to get the Autobahn suite."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from harness import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pins() -> dict[str, Version]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            found[canonicalize_name(name)] = Version(version)
    return found


def requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    return [Requirement(r) for r in
            [*project["dependencies"], *project["optional-dependencies"]["test"]]]


def test_license_is_mit_in_spdx_form() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text


def test_build_requirement_is_bounded() -> None:
    (setuptools,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    assert setuptools.name == "setuptools"
    assert any(s.operator == "<" for s in setuptools.specifier), setuptools
    assert not setuptools.specifier.contains("76.0"), "SPDX license strings need setuptools 77"


def test_dependencies_are_ranges_and_every_one_is_pinned() -> None:
    pinned = pins()
    for requirement in requirements():
        operators = {s.operator for s in requirement.specifier}
        assert "==" not in operators, f"{requirement}: a range, please (constraints.txt pins)"
        assert "<" in operators, f"{requirement}: no upper bound"
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        assert name in pinned, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(pinned[name]), (requirement, pinned[name])


def test_the_environment_is_the_pinned_one() -> None:
    # tests/setup.sh installed this venv with -c constraints.txt: every transitive dependency
    # there is at its pinned version (a stale venv would test something else).
    for name, version in pins().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # e.g. tomli where Python has TOML 1.1
        assert installed == version, f"{name} {installed} installed, constraints.txt pins {version}"


def test_bootstrap_and_ci_install_with_the_constraints() -> None:
    bootstrap = (REPO / "deploy" / "bootstrap.sh").read_text()
    installs = re.findall(r"pip install[^\n]*", bootstrap)
    charon_installs = [line for line in installs if "-e" in line]
    assert charon_installs and all("-c constraints.txt" in line for line in charon_installs)
    assert "deploy/bootstrap.sh --test" in (REPO / "tests" / "setup.sh").read_text()


def test_setup_waits_for_the_dpkg_lock_and_explains_autobahn() -> None:
    setup = (REPO / "tests" / "setup.sh").read_text()
    assert ". deploy/apt.sh" in setup and "apt-get" not in setup.replace("apt_get", "")
    apt = REPO / "deploy" / "apt.sh"
    assert "DPkg::Lock::Timeout" in apt.read_text()
    assert "shared/autobahn" in setup and "tests/test_autobahn.py will be skipped" in setup
    for script in ("deploy/apt.sh", "deploy/bootstrap.sh", "tests/setup.sh"):
        result = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True,
                                text=True, timeout=10)
        assert result.returncode == 0, (script, result.stderr)


FAKE_APT = """#!/bin/sh
# Holds "the lock" for the first two calls, as unattended-upgrades would.
n=$(cat "$COUNT" 2>/dev/null || echo 0); echo $((n + 1)) > "$COUNT"
if [ "$n" -lt 2 ]; then
    echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242" >&2
    exit 100
fi
echo "apt-get $*"
"""


@pytest.mark.skipif(os.getuid() != 0, reason="as_root would ask sudo")
def test_apt_get_waits_for_the_lock_then_runs(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text(FAKE_APT)
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "COUNT": str(tmp_path / "count"), "CHARON_APT_RETRY_SECONDS": "0"}
    script = f". {REPO / 'deploy' / 'apt.sh'} && apt_get install -y nginx-light"
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "count").read_text().strip() == "3"
    assert "waiting for another apt/dpkg" in result.stderr
    assert "install -y nginx-light" in result.stdout
    # Another failure is not waited for: reported at once, with apt's own message.
    (tmp_path / "count").write_text("2")
    fake.write_text('#!/bin/sh\necho "E: Unable to locate package nope" >&2\nexit 100\n')
    failed = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                            timeout=30)
    assert failed.returncode == 1 and "Unable to locate package" in failed.stderr
