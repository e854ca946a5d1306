"""A throwaway certificate authority for the TLS tests: a CA and leaf certificates signed by it,
written as PEM files, so real TLS clients can verify chains (`ssl.create_default_context(
cafile=ca.cert_path)`, `curl --cacert`, `openssl s_client -CAfile`)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _key(kind: str) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Leaf:
    cert_path: Path  # the leaf then the CA (a chain, as a server sends it)
    key_path: Path
    names: tuple[str, ...]
    certificate: x509.Certificate


class TestCA:
    """A CA under `directory`; `issue()` writes a leaf's chain and key next to it."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "Charon Test CA") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = _key("ec")
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.certificate.public_bytes(serialization.Encoding.PEM)
        self.cert_path = self.directory / "ca.pem"
        self.cert_path.write_bytes(self.cert_pem)

    def issue(
        self,
        names: list[str] | tuple[str, ...],
        file_name: str | None = None,
        *,
        key_type: str = "ec",
        days: float = 90,
        not_before_days: float = -1,
        key_path_from: Leaf | None = None,
    ) -> Leaf:
        """A leaf for `names` (DNS names, wildcards or IP literals), valid from
        `not_before_days` to `days` from now (negative `days`: already expired).
        `key_path_from`: write another leaf's key as this one's (a mismatched pair)."""
        key = _key(key_type)
        now = datetime.datetime.now(datetime.UTC)
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=not_before_days))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        stem = file_name or names[0].replace("*", "wildcard").replace(":", "_")
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM) + self.cert_pem)
        if key_path_from is not None:
            key_path.write_bytes(key_path_from.key_path.read_bytes())
        else:
            key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return Leaf(cert_path, key_path, tuple(names), certificate)
