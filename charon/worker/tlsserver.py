"""The worker's TLS settings as the engine takes them: a `TlsServer` built from the config.

Certificates come from the files a host names (`tls = { cert, key }`), from the ACME state
directory (`tls = "auto"`, written by the supervisor), or, for an auto host whose certificate has
not come yet, from a self-signed fallback made for its names (never another host's certificate).
ACME tls-alpn-01 challenge certificates come from the same directory. Built again on every
in-place reload, and when the supervisor says certificates changed (same path).

Session tickets are sealed with keys derived from a secret every worker of a supervisor shares
(it passes it in the environment), one key per period of `[tls] ticket_key_lifetime`: every
worker seals with the current period's key and opens the previous period's too, so a ticket
resumes on any worker, and a key lives two periods at most.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

from charon.config.model import Config, ProxyHost
from charon.tls import paths
from charon.worker.listeners import fds_bound_to
from charon.worker.websocket._engine import TlsServer

log = logging.getLogger("charon.worker")

TICKET_SECRET_ENV = "CHARON_TLS_TICKET_SECRET"
_VERSIONS = {"1.2": 0x0303, "1.3": 0x0304}

Certificate = tuple[tuple[str, ...], bytes, bytes]  # (names, PEM chain, PEM key)


def take_ticket_secret() -> bytes:
    """The supervisor's secret (taken out of the environment: no child of ours inherits it);
    a worker started by hand gets one of its own."""
    value = os.environ.pop(TICKET_SECRET_ENV, "")
    try:
        secret = bytes.fromhex(value)
    except ValueError:
        secret = b""
    return secret if len(secret) >= 16 else secrets.token_bytes(32)


def ticket_keys(secret: bytes, lifetime: float, now: float) -> list[bytes]:
    """The current period's key, then the previous one's (80 bytes each: name, AES, HMAC)."""
    if lifetime <= 0:
        return []
    period = int(now // lifetime)
    return [_ticket_key(secret, period), _ticket_key(secret, period - 1)]


def _ticket_key(secret: bytes, period: int) -> bytes:
    blocks = [
        hmac.new(secret, b"charon ticket key %d %d" % (period, i), hashlib.sha256).digest()
        for i in range(3)
    ]
    return b"".join(blocks)[:80]


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def _auto_certificate(config: Config, host: ProxyHost) -> tuple[bytes, bytes]:
    directory = paths.certificate_dir(config.tls.state_dir, host.name)
    try:
        return (directory / "cert.pem").read_bytes(), (directory / "key.pem").read_bytes()
    except OSError:
        from charon.tls.selfsigned import self_signed

        return self_signed(host.domains)


def host_certificates(config: Config) -> list[Certificate]:
    """Every host's certificate with the names it serves."""
    items: list[Certificate] = []
    for host in config.hosts:
        tls = host.tls
        if tls is None:
            continue
        try:
            if tls.files is not None:
                cert, key = _read(tls.files.cert), _read(tls.files.key)
            elif tls.auto:
                cert, key = _auto_certificate(config, host)
            else:
                continue
        except OSError as exc:  # checked at load; gone since: this host has no certificate
            log.error("host %s: cannot read its certificate: %s", host.name, exc)
            continue
        items.append((host.domains, cert, key))
    return items


def challenge_certificates(config: Config) -> list[Certificate]:
    """The ACME tls-alpn-01 certificates the supervisor put in the state directory."""
    directory = paths.tls_alpn01_dir(config.tls.state_dir)
    items: list[Certificate] = []
    try:
        entries = sorted(directory.glob("*.pem"))
    except OSError:
        return items
    for cert_path in entries:
        try:
            cert = cert_path.read_bytes()
            key = cert_path.with_suffix(".key").read_bytes()
        except OSError:
            continue  # half written or removed meanwhile: the next push has it
        items.append(((cert_path.stem.lower(),), cert, key))
    return items


def build_server(config: Config, secret: bytes, now: float | None = None) -> TlsServer:
    """The engine's TlsServer for `config`; a certificate the engine refuses is left out and
    logged (its names then get the default certificate, or an unrecognized_name alert)."""
    tls = config.tls
    default = None
    if tls.default_certificate is not None:
        try:
            default = (_read(tls.default_certificate.cert), _read(tls.default_certificate.key))
        except OSError as exc:
            log.error("cannot read the default certificate: %s", exc)
    certificates = host_certificates(config)
    challenges = challenge_certificates(config)
    keys = ticket_keys(secret, tls.ticket_key_lifetime, time.time() if now is None else now)

    def make(certs: list[Certificate], fallback: tuple[bytes, bytes] | None) -> TlsServer:
        return TlsServer(
            certs, fallback, challenges, tls.ciphers, _VERSIONS[tls.min_version], keys,
            tls.handshake_timeout,
        )

    try:
        return make(certificates, default)
    except ValueError:
        pass
    # One of them is refused: find which (rare; each alone is cheap next to a handshake).
    kept = []
    for item in certificates:
        try:
            make([item], None)
        except ValueError as exc:
            log.error("host %s: certificate not used: %s", item[0][0], exc)
        else:
            kept.append(item)
    if default is not None:
        try:
            make([], default)
        except ValueError as exc:
            log.error("default certificate not used: %s", exc)
            default = None
    return make(kept, default)


class TicketKeyRotation:
    """Hands the engine's TlsServer the next period's keys when a period ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, secret: bytes) -> None:
        self._loop = loop
        self.secret = secret
        self._server: TlsServer | None = None
        self._lifetime = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def serve(self, server: TlsServer, lifetime: float) -> None:
        self._server = server
        self._lifetime = lifetime
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lifetime <= 0 or self._server is None:
            return
        now = time.time()
        next_period = (int(now // self._lifetime) + 1) * self._lifetime
        self._timer = self._loop.call_later(next_period - now + 0.01, self._rotate)

    def _rotate(self) -> None:
        self._timer = None
        if self._server is not None:
            self._server.set_ticket_keys(ticket_keys(self.secret, self._lifetime, time.time()))
        self._schedule()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def tls_listen_fds(fds: list[int], config: Config) -> frozenset[int]:
    """Which inherited listening fds are `[server] tls_listen` addresses."""
    return fds_bound_to(fds, config.server.tls_listen)
