"""The shipped examples work as shipped (issue 15): deploy/prometheus.yml scrapes the admin
address deploy/charon.example.toml uses (promtool, and a real Prometheus run on the file as it
is against a Charon on that address), and the example config is safe to copy: it trusts no
proxy and listens where its comments say. Loopback only; every process is stopped by PID."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from harness import HOST, REPO, child_pids, free_port, kill_pid, stop_process, wait_until

from charon.config import ListenAddress, load_config

EXAMPLE = REPO / "deploy" / "charon.example.toml"
SCRAPE = REPO / "deploy" / "prometheus.yml"


def scrape_targets() -> list[str]:
    """The static targets of deploy/prometheus.yml (a small file: no YAML library needed)."""
    text = SCRAPE.read_text()
    block = text[text.index("targets:"):].split("labels:")[0]
    return re.findall(r'^\s*-\s*"?([^"\s#]+)"?', block, re.M)


def test_prometheus_yml_scrapes_the_example_admin_address() -> None:
    admin = load_config(str(EXAMPLE)).admin.listen
    assert admin is not None
    assert scrape_targets() == [str(admin)]
    assert "metrics_path: /metrics" in SCRAPE.read_text()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; tests/setup.sh)")
    result = subprocess.run([promtool, "check", "config", str(SCRAPE)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_example_config_is_safe_to_copy() -> None:
    config = load_config(str(EXAMPLE))
    assert config.server.trusted_proxies == (), "the example trusts proxies nobody has checked"
    text = EXAMPLE.read_text()
    # The listen line says, in its comment just above, where it listens.
    assert "Here: port 8080 on every IPv4 and IPv6 address" in text
    assert config.server.listen == (ListenAddress("0.0.0.0", 8080), ListenAddress("::", 8080))
    assert config.admin.listen is not None and config.admin.listen.host == "127.0.0.1"
    assert f"Here {config.admin.listen.port}" in text


@pytest.mark.timeout(90)
def test_a_real_prometheus_on_the_shipped_file_scrapes_charon(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (tests/setup.sh)")
    admin = load_config(str(EXAMPLE)).admin.listen
    assert admin is not None
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if probe.connect_ex((admin.host, admin.port)) == 0:
            pytest.skip(f"{admin} is in use here")
    config = tmp_path / "charon.toml"
    config.write_text(
        f'[server]\nlisten = ["{HOST}:{free_port()}"]\nworkers = 1\n'
        f'[admin]\nlisten = "{admin}"\n'
        f'[[hosts]]\ndomains = ["*"]\nupstream = "http://{HOST}:9"\n'
    )
    web = free_port()
    with open(tmp_path / "charon.log", "wb") as log:
        charon = subprocess.Popen([sys.executable, "-m", "charon", "run", "--config", str(config)],
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    with open(tmp_path / "prometheus.log", "wb") as log:
        prometheus = subprocess.Popen(
            [binary, f"--config.file={SCRAPE}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address={HOST}:{web}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    workers: set[int] = set()
    try:
        def target() -> dict | None:  # type: ignore[type-arg]
            assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert charon.poll() is None, (tmp_path / "charon.log").read_text()
            workers.update(child_pids(charon.pid))
            url = f"http://{HOST}:{web}/api/v1/targets"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
                active = json.loads(r.read())["data"]["activeTargets"]
                if active and active[0]["health"] != "unknown":
                    return active[0]  # type: ignore[no-any-return]
            return None

        # The shipped file scrapes every 10 s; the first scrape comes within one interval.
        wait_until(lambda: target() is not None, 40, interval=0.5, what="the first scrape")
        found = target()
        assert found is not None
        assert found["scrapeUrl"] == f"http://{admin}/metrics", found
        assert found["health"] == "up", found
    finally:
        stop_process(prometheus)
        stop_process(charon)
        for pid in workers:
            kill_pid(pid)
