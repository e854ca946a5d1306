"""Certificate files: reading a PEM chain and its key, and the checks `charon check` makes
before anything is served with them (readable, PEM, the key matches, valid now, the names
cover the host's domains).

`read_certificate_info` is also what the admin page and the expiry metric show.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)


_PAIRS_KEPT = 4096
_pairs: dict[tuple[Path, Path], tuple[object, CertificateInfo]] = {}


class CertificateError(ValueError):
    """A certificate or key file that cannot be served; the message names the file."""


@dataclass(frozen=True)
class CertificateInfo:
    """What a certificate says about itself, for listings, the admin page and metrics."""

    names: tuple[str, ...]  # SAN DNS names and IP addresses (the CN when there is no SAN)
    issuer: str  # the issuer's CN, else its O, else the whole issuer name
    not_before: datetime.datetime  # UTC
    not_after: datetime.datetime  # UTC
    fingerprint: str  # SHA-256 of the DER, lowercase hex

    @classmethod
    def of(cls, certificate: x509.Certificate) -> CertificateInfo:
        return cls(
            names=certificate_names(certificate),
            issuer=_issuer(certificate),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            fingerprint=certificate.fingerprint(hashes.SHA256()).hex(),
        )


def read_certificate_info(path: str | Path) -> CertificateInfo:
    """The first (leaf) certificate of the PEM file at `path`.

    Raises CertificateError (a ValueError) when the file is unreadable or holds no certificate.
    """
    return CertificateInfo.of(_read_chain(Path(path))[0])


def check_pair(
    cert_path: str | Path,
    key_path: str | Path,
    domains: Iterable[str] = (),
    now: datetime.datetime | None = None,
) -> CertificateInfo:
    """Checks that the pair can be served for `domains`; returns the leaf's info.

    Raises CertificateError for a missing, unreadable or non-PEM file, no certificate, an
    encrypted or unparsable key, a key that does not match, a certificate not valid at `now`
    (default: the current time), or one whose names miss one of `domains` (the catch-all "*"
    needs no name).
    """
    info = _checked_pair(Path(cert_path), Path(key_path))
    cert_file = Path(cert_path)
    now = now or datetime.datetime.now(datetime.UTC)
    if info.not_after < now:
        raise CertificateError(f"{_shown(cert_file)} expired on {_when(info.not_after)}")
    if info.not_before > now:
        raise CertificateError(
            f"{_shown(cert_file)} is not valid yet (valid from {_when(info.not_before)})"
        )
    missing = [domain for domain in domains if not covers(info.names, domain)]
    if missing:
        listed = ", ".join(info.names) or "none"
        raise CertificateError(
            f"{_shown(cert_file)} does not cover {', '.join(missing)} (its names: {listed})"
        )
    return info


def _checked_pair(cert_file: Path, key_file: Path) -> CertificateInfo:
    """The leaf's info once the files are read and the key proven to match; remembered while
    neither file changes, so a config naming one wildcard pair for many hosts (and every
    reload) checks it once."""
    signature = (_signature(cert_file), _signature(key_file))
    cached = _pairs.get((cert_file, key_file))
    if cached is not None and cached[0] == signature:
        return cached[1]
    chain = _read_chain(cert_file)
    _check_key(key_file)
    _check_match(cert_file, key_file)
    info = CertificateInfo.of(chain[0])
    if len(_pairs) >= _PAIRS_KEPT:
        _pairs.clear()
    _pairs[(cert_file, key_file)] = (signature, info)
    return info


def _signature(path: Path) -> tuple[int, int, int, int]:
    try:
        st = path.stat()
    except OSError as err:
        raise CertificateError(f"cannot read {_shown(path)}: {err.strerror or err}") from None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def read_ca_bundle(path: str | Path) -> int:
    """Checks a CA bundle (PEM, at least one certificate); returns how many it holds."""
    return len(_read_chain(Path(path)))


def covers(names: Iterable[str], domain: str) -> bool:
    """Whether a certificate with `names` serves the host domain `domain`.

    A name "*.x" covers one more label in front of x; a host domain "*.x" (any such name)
    needs the name "*.x" itself; the catch-all "*" is served with whatever certificate.
    """
    if domain == "*":
        return True
    names = {name.lower() for name in names}
    if domain in names:
        return True
    if domain.startswith("*.") or _is_ip(domain):
        return False
    _, dot, parent = domain.partition(".")
    return bool(dot) and f"*.{parent}" in names


def certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """SAN DNS names and IP addresses, lowercase; the subject CN only when there is no SAN."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(attr.value).lower() for attr in common[:1])
    dns = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(dns + ips)


def _issuer(certificate: x509.Certificate) -> str:
    for oid in (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME):
        attributes = certificate.issuer.get_attributes_for_oid(oid)
        if attributes:
            return str(attributes[0].value)
    return certificate.issuer.rfc4514_string()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise CertificateError(f"cannot read {_shown(path)}: {err.strerror or err}") from None


def _read_chain(path: Path) -> list[x509.Certificate]:
    data = _read(path)
    blocks = list(_PEM_BLOCK.finditer(data))
    if not blocks:
        raise CertificateError(f"{_shown(path)} is not a PEM file")
    chain = []
    for block in blocks:
        if block[1] != b"CERTIFICATE":
            continue
        try:
            chain.append(x509.load_pem_x509_certificate(block[0]))
        except ValueError:
            raise CertificateError(
                f"{_shown(path)}: a CERTIFICATE block that is not a valid certificate"
            ) from None
    if not chain:
        raise CertificateError(f"{_shown(path)} contains no certificate")
    return chain


def _check_key(path: Path) -> None:
    data = _read(path)
    blocks = [block for block in _PEM_BLOCK.finditer(data) if block[1].endswith(b"PRIVATE KEY")]
    if not blocks:
        if not _PEM_BLOCK.search(data):
            raise CertificateError(f"{_shown(path)} is not a PEM file")
        raise CertificateError(f"{_shown(path)} contains no private key")
    try:
        serialization.load_pem_private_key(blocks[0][0], password=None)
    except TypeError:  # cryptography's way of saying the key needs a password
        raise CertificateError(
            f"{_shown(path)}: the private key is encrypted (Charon needs it unencrypted)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{_shown(path)}: the private key cannot be read") from None


def _check_match(cert_path: Path, key_path: Path) -> None:
    # OpenSSL's own check, the one the TLS context will make when it loads the pair.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except ssl.SSLError as err:
        if "KEY_VALUES_MISMATCH" in str(err) or "key values mismatch" in str(err):
            raise CertificateError(
                f"the key {_shown(key_path)} does not match the certificate {_shown(cert_path)}"
            ) from None
        raise CertificateError(
            f"OpenSSL cannot load {_shown(cert_path)} with {_shown(key_path)}: "
            f"{err.reason or err}"
        ) from None
    except OSError as err:
        raise CertificateError(f"cannot read {_shown(cert_path)}: {err.strerror or err}") from None


def _no_password() -> bytes:
    raise CertificateError("the private key is encrypted")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _shown(path: Path) -> str:
    return f'"{path}"'


def _when(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")
