"""Pebble, Let's Encrypt's ACME test server (Debian package `pebble`), for the ACME tests.

`Pebble` starts /usr/bin/pebble on 127.0.0.1 with a config written to a temporary folder: its
own HTTPS certificate comes from tests/tlsca.py (Debian ships no minica certificates), and it
validates challenges on the ports Charon (or a test's own responder) serves: `http_port` for
HTTP-01, `tls_port` for TLS-ALPN-01. Names are resolved by `pebble-challtestsrv` acting as a DNS
server that answers every A query with 127.0.0.1 (and no AAAA), so every test domain is
loopback. Both processes are stopped by PID; `stop()` then `start()` again gives a Pebble with a
fresh state (new root, no accounts), as a restarted real server would lose nothing the client
keeps but its account.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import HOST, free_port, stop_process, wait_until
from tests.tlsca import TestCA

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"

needs_pebble = pytest.mark.skipif(
    shutil.which(PEBBLE) is None or shutil.which(CHALLTESTSRV) is None,
    reason="pebble is not installed (tests/setup.sh installs it)",
)


class Pebble:
    def __init__(
        self, tmp: Path, http_port: int, tls_port: int, validity: int | None = None
    ) -> None:
        self.dir = tmp / "pebble"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port
        self.tls_port = tls_port
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port()
        self.dns_management_port = free_port()
        ca = TestCA(self.dir / "ca", name="Pebble HTTPS test CA")
        leaf = ca.issue(["localhost", HOST], "pebble-https")
        self.https_ca = ca.cert_path  # what `[tls] acme_ca_bundle` points at
        settings: dict[str, object] = {
            "listenAddress": f"{HOST}:{self.port}",
            "managementListenAddress": f"{HOST}:{self.management_port}",
            "certificate": str(leaf.cert_path),
            "privateKey": str(leaf.key_path),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
        if validity is not None:
            settings["certificateValidityPeriod"] = validity  # seconds
        self.config_path = self.dir / "pebble-config.json"
        self.config_path.write_text(json.dumps({"pebble": settings}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.dns: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def directory(self) -> str:
        return f"https://{HOST}:{self.port}/dir"

    def start(self) -> Pebble:
        if self.dns is None:
            args = [
                CHALLTESTSRV, "-dns01", f"{HOST}:{self.dns_port}", "-http01", "",
                "-https01", "", "-tlsalpn01", "",
                "-management", f"{HOST}:{self.dns_management_port}",
                "-defaultIPv4", HOST, "-defaultIPv6", "",
            ]
            if _has_doh_flag():
                args += ["-doh", ""]
            self.dns = subprocess.Popen(
                args, stdout=self._log("challtestsrv"), stderr=subprocess.STDOUT
            )
            wait_until(lambda: _listening(self.dns_management_port), 10, what="challtestsrv")
        env = dict(
            os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_VA_ALWAYS_VALID="0",
            PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0",
        )
        self.proc = subprocess.Popen(
            [PEBBLE, "-config", str(self.config_path), "-dnsserver", f"{HOST}:{self.dns_port}"],
            stdout=self._log("pebble"), stderr=subprocess.STDOUT, env=env, cwd=self.dir,
        )
        self.starts += 1
        wait_until(self._answers, 15, what="pebble's directory")
        return self

    def stop_server(self) -> None:
        """Pebble alone (its DNS stays): the ACME server is down."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def stop(self) -> None:
        self.stop_server()
        if self.dns is not None:
            stop_process(self.dns)
            self.dns = None

    def _log(self, name: str) -> int:
        return os.open(self.dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def log(self) -> str:
        path = self.dir / "pebble.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.https_ca))

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"pebble exited: {self.log()[-2000:]}")
        try:
            with urllib.request.urlopen(self.directory, timeout=2, context=self._context()) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def root_pem(self) -> bytes:
        """The root Pebble issues under (new at every start)."""
        url = f"https://{HOST}:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, timeout=5, context=self._context()) as response:
            return bytes(response.read())


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


_doh: bool | None = None


def _has_doh_flag() -> bool:
    """Newer challtestsrv versions also serve DNS over HTTPS by default (-doh); turn it off
    where the flag exists."""
    global _doh
    if _doh is None:
        usage = subprocess.run([CHALLTESTSRV, "-h"], capture_output=True, text=True, timeout=10)
        _doh = "-doh" in usage.stdout + usage.stderr
    return _doh


@pytest.fixture
def pebble_factory(tmp_path: Path) -> Iterator[list[Pebble]]:
    """Tests append the Pebbles they start (`Pebble(...).start()`); all are stopped after."""
    started: list[Pebble] = []
    yield started
    for pebble in started:
        pebble.stop()
