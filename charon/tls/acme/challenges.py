"""The two challenge types Charon answers, as files the workers serve:

- HTTP-01 (RFC 8555 8.3): the key authorization at paths.http01_path(token), served on the
  plain listener at /.well-known/acme-challenge/<token>.
- TLS-ALPN-01 (RFC 8737): a self-signed certificate for the domain carrying the critical
  id-pe-acmeIdentifier extension (the SHA-256 of the key authorization, as a DER OCTET
  STRING), at <tls_alpn01_dir>/<domain>.pem and .key, served by the TLS listener to a client
  that offers only the ALPN protocol `acme-tls/1` with that SNI.

The acme library no longer knows TLS-ALPN-01, so its challenge and response types are
registered here (the response posted is `{}`, as for HTTP-01).
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import josepy as jose
from acme import challenges
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from charon.tls.acme.store import remove, write_atomic
from charon.tls.paths import http01_path, tls_alpn01_dir

HTTP01 = "http-01"
TLS_ALPN01 = "tls-alpn-01"
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
ALPN_PROTOCOL = "acme-tls/1"


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    typ = TLS_ALPN01


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key: jose.JWK, **kwargs: object) -> str:
        return self.key_authorization(account_key)


def alpn_certificate(domain: str, key_authorization: str) -> tuple[bytes, bytes]:
    """RFC 8737 3: the validation certificate for `domain` (PEM chain, PEM key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    extension = b"\x04\x20" + digest  # DER OCTET STRING of 32 bytes
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "charon ACME challenge")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, extension), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def alpn_paths(state_dir: str, domain: str) -> tuple[Path, Path]:
    folder = tls_alpn01_dir(state_dir)
    return folder / f"{domain}.pem", folder / f"{domain}.key"


def write(state_dir: str, kind: str, domain: str, token: str, key_authorization: str) -> list[Path]:
    """Put one challenge's answer where the workers look; the files written."""
    if kind == HTTP01:
        path = http01_path(state_dir, token)
        if path is None:
            raise ValueError(f"the ACME server sent an unusable token {token!r}")
        write_atomic(path, key_authorization.encode("ascii"), 0o644)
        return [path]
    cert_pem, key_pem = alpn_certificate(domain, key_authorization)
    cert_path, key_path = alpn_paths(state_dir, domain)
    write_atomic(key_path, key_pem, 0o600)
    write_atomic(cert_path, cert_pem, 0o644)
    return [cert_path, key_path]


def remove_all(paths: list[Path]) -> None:
    for path in paths:
        remove(path)
