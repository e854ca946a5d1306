"""Shared pieces of the end-to-end TLS tests: a Charon with TLS listeners whose certificates come
from tests/tlsca.py, and real TLS clients (Python ssl, curl, openssl s_client) that verify the
chain against that CA and report what was negotiated."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from harness import HOST, Charon, free_port
from tlsca import Leaf, TestCA


class TlsCharon(Charon):
    """A Charon with a TLS listener on 127.0.0.1:`tls_port` besides its plain one (or on the
    `tls_listen` addresses, where "{port}" is `tls_port`); `tls_toml` is its [tls] table."""

    def __init__(self, tmp: Path, hosts_toml: str, *, tls_toml: str = "", workers: int = 1,
                 tls_listen: list[str] | None = None, server_toml: str = "") -> None:
        self.tls_port = free_port()
        listen = tls_listen if tls_listen is not None else [f"{HOST}:{{port}}"]
        addresses = ", ".join(f'"{a.format(port=self.tls_port)}"' for a in listen)
        super().__init__(
            tmp, hosts_toml, workers=workers,
            server_toml=f"tls_listen = [{addresses}]" + (f"\n{server_toml}" if server_toml else ""),
            extra_toml=f"\n[tls]\n{tls_toml}\n" if tls_toml else "",
        )


@contextlib.contextmanager
def running_tls_charon(tmp: Path, hosts_toml: str, **kwargs: Any) -> Iterator[TlsCharon]:
    charon = TlsCharon(tmp, hosts_toml, **kwargs)
    try:
        charon.start()
        yield charon
    finally:
        charon.stop()


def tls_table(leaf: Leaf) -> str:
    """A host's `tls = {...}` value for a leaf's files."""
    return f'{{ cert = "{leaf.cert_path}", key = "{leaf.key_path}" }}'


def client_context(ca: TestCA, *, minimum: ssl.TLSVersion | None = None,
                   maximum: ssl.TLSVersion | None = None, alpn: list[str] | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that trusts only the test CA (the chain is always verified)."""
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.check_hostname = check_hostname
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


@dataclass
class Handshake:
    certificate: x509.Certificate  # the leaf the server sent
    version: str
    alpn: str | None
    reused: bool
    session: ssl.SSLSession | None
    cipher: str


def same_certificate(got: x509.Certificate, leaf: Leaf) -> bool:
    return got.serial_number == leaf.certificate.serial_number


def handshake(port: int, server_name: str | None, ctx: ssl.SSLContext, *,
              session: ssl.SSLSession | None = None, request_host: str | None = None,
              address: str = HOST, timeout: float = 5.0) -> Handshake:
    """One TLS connection: the handshake (SNI `server_name`; None or an IP literal sends none),
    then one GET / with `Connection: close` when `request_host` is given (a TLS 1.3 session
    ticket only arrives after the handshake, so a session to resume needs some traffic)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as raw:
        raw.settimeout(timeout)
        raw.connect((address, port))
        with ctx.wrap_socket(raw, server_hostname=server_name, session=session) as s:
            der = s.getpeercert(binary_form=True)
            assert der is not None
            cipher = s.cipher()
            done = Handshake(x509.load_der_x509_certificate(der), str(s.version()),
                             s.selected_alpn_protocol(), bool(s.session_reused), None,
                             cipher[0] if cipher else "")
            if request_host is not None:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {request_host}\r\nConnection: close\r\n\r\n"
                          .encode())
                while s.recv(65536):
                    pass
            done.session = s.session
            return done


class HttpsConnection(http.client.HTTPSConnection):
    """http.client over TLS to 127.0.0.1:port with SNI and Host `name` (no DNS needed)."""

    def __init__(self, name: str, port: int, ctx: ssl.SSLContext, timeout: float = 5.0,
                 address: str = HOST) -> None:
        super().__init__(name, port, context=ctx, timeout=timeout)
        self._address = address
        self._ctx = ctx

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


def https_json(conn: http.client.HTTPConnection, method: str, path: str,
               body: bytes | None = None, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, Any]]:
    """A request on an open connection whose answer is http_backend.py's JSON."""
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else {}


def header(echo: dict[str, Any], name: str) -> list[str]:
    """The values of `name` in http_backend.py's /echo answer."""
    return [v for n, v in echo["headers"] if n.lower() == name.lower()]


def _client_env() -> dict[str, str]:
    """The environment for client programs: without the ASan run's LD_PRELOAD of libasan
    (test_engine_asan.py), under which curl hangs before its first request."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def curl(port: int, name: str, ca: TestCA, path: str = "/", *args: str,
         timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """curl verifying against the test CA, `name` resolved to 127.0.0.1."""
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(ca.cert_path),
         "--resolve", f"{name}:{port}:{HOST}", "--noproxy", "*", *args,
         f"https://{name}:{port}{path}"],
        capture_output=True, text=True, timeout=timeout, check=False, env=_client_env(),
    )


def s_client(port: int, name: str | None, ca: TestCA, request: bytes = b"", *args: str,
             timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    """openssl s_client verifying against the test CA; `request` is written once the handshake
    is done (it waits for the answer until the server closes)."""
    sni = ["-servername", name] if name else ["-noservername"]
    return subprocess.run(
        ["openssl", "s_client", "-connect", f"{HOST}:{port}", *sni, "-CAfile", str(ca.cert_path),
         "-verify_return_error", "-ign_eof", *args],
        input=request.decode("latin-1"), capture_output=True, text=True, timeout=timeout,
        check=False, env=_client_env(),
    )


@contextlib.contextmanager
def tls_socket(port: int, name: str, ctx: ssl.SSLContext, timeout: float = 5.0
               ) -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection((HOST, port), timeout)
    try:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            yield s
    finally:
        raw.close()
