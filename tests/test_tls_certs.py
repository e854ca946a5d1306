"""charon/tls/certs.py (what a certificate says, which names it covers) and
charon/tls/selfsigned.py (the fallback certificate), proven with real TLS handshakes over a
loopback socket pair where it matters."""

from __future__ import annotations

import datetime
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import REPO
from tlsca import TestCA

from charon.config import tls as config_tls
from charon.tls import selfsigned
from charon.tls.certs import (
    CertificateError,
    certificate_names,
    check_pair,
    covers,
    read_certificate_info,
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.mark.parametrize(
    ("names", "domain", "covered"),
    [
        (["app.example.com"], "app.example.com", True),
        (["APP.example.com"], "app.example.com", True),
        (["app.example.com"], "www.example.com", False),
        (["*.example.com"], "a.example.com", True),
        (["*.example.com"], "example.com", False),
        (["*.example.com"], "a.b.example.com", False),
        (["*.example.com"], "*.example.com", True),
        (["a.example.com", "b.example.com"], "*.example.com", False),
        (["*.b.example.com"], "*.example.com", False),
        (["127.0.0.1"], "127.0.0.1", True),
        (["*.0.0.1"], "127.0.0.1", False),
        ([], "*", True),
    ],
)
def test_covers(names: list[str], domain: str, covered: bool) -> None:
    assert covers(names, domain) is covered


def test_certificate_info(ca: TestCA) -> None:
    leaf = ca.issue(["app.example.com", "*.example.org", "10.0.0.1"], "info", days=30)
    info = read_certificate_info(leaf.cert_path)
    assert info.names == ("app.example.com", "*.example.org", "10.0.0.1")
    assert info.issuer == "Charon Test CA"
    assert info.not_after == leaf.certificate.not_valid_after_utc
    assert info.not_before == leaf.certificate.not_valid_before_utc
    assert info.fingerprint == leaf.certificate.fingerprint(hashes.SHA256()).hex()
    assert re.fullmatch(r"[0-9a-f]{64}", info.fingerprint)
    assert check_pair(leaf.cert_path, leaf.key_path, ["x.example.org"]) == info


def test_names_fall_back_to_the_common_name_only_without_san(ca: TestCA) -> None:
    def certificate(san: list[str] | None) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CN.example.com")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org CA")]))
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if san is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False
            )
        return builder.sign(key, hashes.SHA256())

    assert certificate_names(certificate(None)) == ("cn.example.com",)
    assert certificate_names(certificate(["other.example.com"])) == ("other.example.com",)
    path = ca.directory / "org.pem"
    path.write_bytes(certificate(None).public_bytes(serialization.Encoding.PEM))
    assert read_certificate_info(path).issuer == "Org CA"


def test_encrypted_key_is_an_error_not_a_prompt(ca: TestCA) -> None:
    leaf = ca.issue(["app.example.com"], "encrypted")
    key = serialization.load_pem_private_key(leaf.key_path.read_bytes(), None)
    leaf.key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    with pytest.raises(CertificateError, match="the private key is encrypted"):
        check_pair(leaf.cert_path, leaf.key_path)


def test_a_combined_pem_file_is_a_pair(ca: TestCA) -> None:
    leaf = ca.issue(["app.example.com"], "combined", key_type="rsa")
    combined = ca.directory / "combined-all.pem"
    combined.write_bytes(leaf.key_path.read_bytes() + leaf.cert_path.read_bytes())
    assert check_pair(combined, combined, ["app.example.com"]).names == ("app.example.com",)


def handshake(cert_pem: bytes, key_pem: bytes, directory: Path, server_name: str) -> Any:
    """A real TLS handshake over a socket pair, the client trusting `cert_pem` itself and
    checking `server_name`; returns the peer certificate as the client saw it."""
    (directory / "s.pem").write_bytes(cert_pem)
    (directory / "s.key").write_bytes(key_pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "s.pem", directory / "s.key")
    client = ssl.create_default_context(cadata=cert_pem.decode())
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server.wrap_socket(a, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError) as err:
            errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(b, server_hostname=server_name) as tls:
            peer = tls.getpeercert()
            tls.sendall(b"x")
    finally:
        thread.join(10)
    assert not errors, errors
    assert peer is not None
    return peer


def test_self_signed_serves_its_names(tmp_path: Path) -> None:
    names = ("app.example.com", "*.example.org", "127.0.0.1")
    cert_pem, key_pem = selfsigned.self_signed(names)
    certificate = x509.load_pem_x509_certificate(cert_pem)
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    assert certificate.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert certificate_names(certificate) == names
    issuer = certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert issuer == "Charon self-signed fallback"
    now = datetime.datetime.now(datetime.UTC)
    before = now - certificate.not_valid_before_utc
    after = certificate.not_valid_after_utc - now
    # Certificates keep whole seconds: a minute's slack either way.
    assert abs(before - datetime.timedelta(days=1)) < datetime.timedelta(minutes=1)
    assert abs(after - datetime.timedelta(days=7)) < datetime.timedelta(minutes=1)
    (tmp_path / "c.pem").write_bytes(cert_pem)
    (tmp_path / "c.key").write_bytes(key_pem)
    check_pair(tmp_path / "c.pem", tmp_path / "c.key", ["app.example.com", "x.example.org"])
    peer = handshake(cert_pem, key_pem, tmp_path, "x.example.org")
    assert ("DNS", "*.example.org") in peer["subjectAltName"]


def test_self_signed_is_cached_per_names() -> None:
    first = selfsigned.self_signed(["a.example.com"])
    again = selfsigned.self_signed(("a.example.com",))
    assert again[0] is first[0] and again[1] is first[1]
    other = selfsigned.self_signed(["b.example.com"])
    assert other[0] != first[0] and other[1] != first[1]
    for index in range(40):  # more than the cache holds: it stays small
        selfsigned.self_signed([f"n{index}.example.com"])
    assert len(selfsigned._cache) <= 32


def test_example_config_documents_every_tls_key() -> None:
    text = (REPO / "deploy/charon.example.toml").read_text()
    keys = {*config_tls._TLS_KEYS, *config_tls.HOST_KEYS, "tls_listen"}
    missing = [key for key in sorted(keys) if not re.search(rf"^# {key} = ", text, re.M)]
    assert missing == []
    assert "# tls = \"auto\"" in text


def test_a_replaced_file_is_checked_again(ca: TestCA) -> None:
    leaf = ca.issue(["app.example.com"], "replaced")
    other = ca.issue(["app.example.com"], "replacement")
    check_pair(leaf.cert_path, leaf.key_path, ["app.example.com"])
    # Replaced the way deployment tools do it: a new file renamed over the old one.
    fresh = ca.directory / "replaced.key.new"
    fresh.write_bytes(other.key_path.read_bytes())
    fresh.replace(leaf.key_path)
    with pytest.raises(CertificateError, match="does not match"):
        check_pair(leaf.cert_path, leaf.key_path, ["app.example.com"])
