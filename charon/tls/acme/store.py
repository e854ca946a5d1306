"""A host's ACME certificate on disk: written whole (temporary name, fsync, rename) so a worker
reading it sees the old pair or the new one, keys 0600 in 0700 folders."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from charon.tls.paths import certificate_dir

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
META_FILE = "meta.json"


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    make_private_dir(path.parent)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an older file of that name kept its mode through O_CREAT
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass(frozen=True)
class CertificateInfo:
    """What the schedule, the metrics and the admin page need of a certificate."""

    domains: tuple[str, ...]  # its DNS names (SAN)
    issuer: str  # the issuer's common name (or whole name)
    not_before: float  # Unix time
    not_after: float

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before


def describe(pem: bytes) -> CertificateInfo:
    """The first certificate of a PEM chain; ValueError if there is none."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        domains = tuple(name.lower() for name in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        domains = ()
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    issuer = str(names[0].value) if names else cert.issuer.rfc4514_string()
    return CertificateInfo(
        domains, issuer, cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    )


def load(state_dir: str, host: str) -> CertificateInfo | None:
    """The host's stored certificate, or None when there is none (or it cannot be read: the
    schedule then orders a new one)."""
    folder = certificate_dir(state_dir, host)
    try:
        pem = (folder / CERT_FILE).read_bytes()
        if not (folder / KEY_FILE).is_file():
            return None
        return describe(pem)
    except (OSError, ValueError):
        return None


def save(
    state_dir: str, host: str, fullchain_pem: bytes, key_pem: bytes, meta: dict[str, object]
) -> CertificateInfo:
    """Store a new certificate; the key goes first so the pair on disk never has a certificate
    without its key (a reader briefly sees the new key with the old certificate at worst, and
    the engine refuses a mismatched pair and keeps what it had until the next push)."""
    info = describe(fullchain_pem)
    folder = certificate_dir(state_dir, host)
    meta = dict(meta, domains=list(info.domains), issuer=info.issuer,
                not_before=_iso(info.not_before), not_after=_iso(info.not_after))
    write_atomic(folder / KEY_FILE, key_pem, 0o600)
    write_atomic(folder / CERT_FILE, fullchain_pem, 0o644)
    write_atomic(folder / META_FILE, json.dumps(meta, indent=1).encode("utf-8"), 0o644)
    return info


def _iso(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).isoformat()
