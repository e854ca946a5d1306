"""The certificate a host is served with while it has no real one yet (an ACME host before its
first order completes): self-signed, so a client sees a clear "Charon self-signed fallback"
issuer instead of another host's certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ISSUER = "Charon self-signed fallback"
_CACHE_SIZE = 32
# Valid 7 days ahead; made again after one day, so a long-running process never serves a
# fallback that is about to expire.
_VALID_AHEAD = datetime.timedelta(days=7)
_VALID_BEHIND = datetime.timedelta(days=1)  # clients with a clock a little behind accept it
_REUSE_SECONDS = 86400.0

_cache: OrderedDict[tuple[str, ...], tuple[float, bytes, bytes]] = OrderedDict()
_lock = threading.Lock()


def self_signed(names: Iterable[str]) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for `names`: EC P-256, SAN = the names (DNS names,
    wildcards as they are, IP literals as IP addresses). The same names give the same pair
    for a day (a small per-process cache)."""
    key = tuple(names)
    now = time.monotonic()
    with _lock:
        cached = _cache.get(key)
        if cached is not None and now - cached[0] < _REUSE_SECONDS:
            _cache.move_to_end(key)
            return cached[1], cached[2]
    cert_pem, key_pem = _make(key)
    with _lock:
        _cache[key] = (now, cert_pem, key_pem)
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return cert_pem, key_pem


def _make(names: tuple[str, ...]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _VALID_BEHIND)
        .not_valid_after(now + _VALID_AHEAD)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False
        )
    certificate = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)
