"""Bad certificate configs (issue 12): `charon run` refuses them with PATH:LINE and a reason
instead of crashing later, and a SIGHUP onto a bad certificate keeps the old one serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import HOST, REPO, Backend, free_port, wait_until
from tlsca import Leaf, TestCA
from tlsenv import (
    TlsCharon,
    client_context,
    handshake,
    running_tls_charon,
    same_certificate,
    tls_table,
)

NAME = "app.example.com"


def config(tmp: Path, host_tls: str | None, tls_table_body: str = "",
           domains: str = f'"{NAME}"') -> tuple[Path, int]:
    """A config file and the line of the line that names the certificate (the host's `tls`, or
    the `default_certificate` when `host_tls` is None)."""
    lines = [
        "[server]",
        f'listen = ["{HOST}:{free_port()}"]',
        f'tls_listen = ["{HOST}:{free_port()}"]',
        "workers = 1",
        "",
        "[admin]",
        f'listen = "{HOST}:{free_port()}"',
        "",
    ]
    if tls_table_body:
        lines += ["[tls]", tls_table_body, ""]
    lines += ["[[hosts]]", f"domains = [{domains}]", f'upstream = "http://{HOST}:{free_port()}"']
    if host_tls is not None:
        lines.append(f"tls = {host_tls}")
    path = tmp / "charon.toml"
    path.write_text("\n".join(lines) + "\n")
    marker = "tls = " if host_tls is not None else "default_certificate"
    line = next(i for i, text in enumerate(lines, 1) if text.startswith(marker))
    return path, line


def charon_run(path: Path) -> subprocess.CompletedProcess[str]:
    # A config refused at start-up exits at once; the timeout only bounds a broken build.
    return subprocess.run([sys.executable, "-m", "charon", "run", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=REPO, check=False)


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


def _files(cert: Path | str, key: Path | str) -> str:
    return f'{{ cert = "{cert}", key = "{key}" }}'


CASES = ["missing-cert", "missing-key", "not-pem", "expired", "not-yet-valid", "mismatched-key",
         "wrong-name", "wildcard-does-not-cover", "default-missing", "default-expired"]


@pytest.mark.parametrize("case", CASES)
def test_run_refuses_bad_certificate_with_path_and_line(tmp_path: Path, ca: TestCA,
                                                        case: str) -> None:
    good = ca.issue([NAME])
    names: str = NAME
    if case == "missing-cert":
        host_tls, default, named = _files(tmp_path / "nope.pem", good.key_path), "", "nope.pem"
    elif case == "missing-key":
        host_tls, default, named = _files(good.cert_path, tmp_path / "nope.key"), "", "nope.key"
    elif case == "not-pem":
        junk = tmp_path / "junk.pem"
        junk.write_text("this is not a certificate\n")
        host_tls, default, named = _files(junk, good.key_path), "", "junk.pem"
    elif case == "expired":
        leaf = ca.issue([NAME], "expired", days=-1, not_before_days=-30)
        host_tls, default, named = tls_table(leaf), "", "expired.pem"
    elif case == "not-yet-valid":
        leaf = ca.issue([NAME], "future", days=60, not_before_days=10)
        host_tls, default, named = tls_table(leaf), "", "future.pem"
    elif case == "mismatched-key":
        other = ca.issue(["other.example.com"])
        leaf = ca.issue([NAME], "mismatched", key_path_from=other)
        host_tls, default, named = tls_table(leaf), "", "mismatched"
    elif case == "wrong-name":
        leaf = ca.issue(["other.example.com"])
        host_tls, default, named = tls_table(leaf), "", "other.example.com.pem"
    elif case == "wildcard-does-not-cover":
        names = "*.example.org"  # a host wildcard needs a wildcard SAN, not one name under it
        leaf = ca.issue(["a.example.org"])
        host_tls, default, named = tls_table(leaf), "", "a.example.org.pem"
    elif case == "default-missing":
        host_tls = None
        default = f"default_certificate = {_files(tmp_path / 'gone.pem', good.key_path)}"
        named = "gone.pem"
    else:  # default-expired
        leaf = ca.issue(["default.test"], "old-default", days=-1, not_before_days=-30)
        host_tls, default, named = None, f"default_certificate = {tls_table(leaf)}", "old-default"
    path, line = config(tmp_path, host_tls, default, domains=f'"{names}"')

    result = charon_run(path)
    assert result.returncode != 0, result
    assert f"{path}:{line}:" in result.stderr, result.stderr
    assert named in result.stderr, f"the message should name the file:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr


def test_check_agrees_with_run(tmp_path: Path, ca: TestCA) -> None:
    leaf = ca.issue([NAME], "expired", days=-1, not_before_days=-30)
    path, line = config(tmp_path, tls_table(leaf))
    result = subprocess.run([sys.executable, "-m", "charon", "check", str(path)],
                            capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"{path}:{line}: "), result.stderr


# -- SIGHUP onto a bad certificate ------------------------------------------------------------


def _reloads(charon: TlsCharon) -> dict[str, object]:
    return dict((charon.health() or {}).get("reloads") or {})


def _count(charon: TlsCharon) -> int:
    return int(str(_reloads(charon).get("count", 0)))


def _reload(charon: TlsCharon) -> dict[str, object]:
    count = _count(charon)
    os.kill(charon.pid, signal.SIGHUP)
    wait_until(lambda: _count(charon) > count, 30,
               what="the reload's result")
    return _reloads(charon)


def _overwrite(leaf: Leaf, bad: Leaf) -> None:
    """Put `bad`'s files in place of `leaf`'s (replaced at once, as a deploy tool would)."""
    for src, dst in ((bad.cert_path, leaf.cert_path), (bad.key_path, leaf.key_path)):
        tmp = dst.with_suffix(".new")
        tmp.write_bytes(src.read_bytes())
        os.replace(tmp, dst)


@pytest.mark.timeout(120)
def test_sighup_onto_bad_certificate_keeps_serving_the_old_one(tmp_path: Path,
                                                               ca: TestCA) -> None:
    served = ca.issue([NAME], "served")
    backend = Backend("http_backend.py")
    hosts = f"""
        [[hosts]]
        domains = ["{NAME}"]
        upstream = "{backend.url}"
        tls = {tls_table(served)}
        """
    ctx = client_context(ca)
    try:
        with running_tls_charon(tmp_path, hosts, workers=2) as charon:
            port = charon.tls_port
            original = served.certificate
            pids = sorted(charon.worker_pids())
            bad_ones = {
                "expired": ca.issue([NAME], "bad-expired", days=-1, not_before_days=-30),
                "wrong-name": ca.issue(["other.example.com"], "bad-name"),
                "mismatched": ca.issue([NAME], "bad-pair",
                                       key_path_from=ca.issue(["x.test"], "x")),
            }
            for what, bad in bad_ones.items():
                _overwrite(served, bad)
                status = _reload(charon)
                assert status.get("last_result") == "error", (what, status)
                assert f"{charon.config_path}:" in str(status.get("last_error")), (what, status)
                done = handshake(port, NAME, ctx, request_host=NAME)
                assert done.certificate.serial_number == original.serial_number, what
                assert sorted(charon.worker_pids()) == pids, f"{what}: workers replaced"

            fixed = ca.issue([NAME], "fixed")
            _overwrite(served, fixed)
            status = _reload(charon)
            assert status.get("last_result") == "success", status
            done = handshake(port, NAME, ctx, request_host=NAME)
            assert same_certificate(done.certificate, fixed)
    finally:
        backend.stop()
