"""The TLS parts of the config: `[server] tls_listen`, the `[tls]` table, a host's `tls`,
`force_https` and `hsts`, and `tls_verify` / `tls_ca` toward https:// backends.

Certificate and CA files are checked here (see charon.tls.certs), so a bad pair is a
`charon check` error at the line that names it, never a failure at run time.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from charon.config import values
from charon.config.model import (
    CertificateFiles,
    HostTls,
    ListenAddress,
    ServerConfig,
    TlsConfig,
    Upstream,
)
from charon.config.table import Table, address_list, boolean

HOST_KEYS = ("tls", "force_https", "hsts", "tls_verify", "tls_ca")
LOCATION_KEYS = ("tls_verify", "tls_ca")
_TLS_KEYS = tuple(field.name for field in dataclasses.fields(TlsConfig))
_FILES_FORM = '{ cert = "PATH", key = "PATH" }'
_HSTS = re.compile(r"max-age=\d+(;.*)?", re.IGNORECASE)
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_DNS01 = (
    "wildcard names need the DNS-01 challenge, which Charon does not do: "
    "give this host tls = { cert, key }"
)
_IP_ACME = (
    "Charon's ACME client asks for DNS names only, not IP addresses: "
    "give this host tls = { cert, key }"
)


# -- listeners ---------------------------------------------------------------------------------


def tls_listen(table: Table, listen: Sequence[ListenAddress]) -> tuple[ListenAddress, ...]:
    """`[server] tls_listen`: like listen, but may be empty (the default: no TLS)."""
    if "tls_listen" not in table.data:
        return ()
    addresses = address_list(table, "tls_listen")
    for index, address in enumerate(addresses):
        for other in listen:
            if overlaps(address, other):
                raise table.error_at(
                    (*table.path, "tls_listen", index),
                    f"{table.label('tls_listen')}: {address} overlaps the [server] listen "
                    f"address {other}",
                )
    return addresses


def check_admin_overlap(table: Table, server: ServerConfig, admin: ListenAddress | None) -> None:
    """`[server] tls_listen` must not take the admin listener's address."""
    if admin is None:
        return
    for index, address in enumerate(server.tls_listen):
        if overlaps(address, admin):
            raise table.error_at(
                (*table.path, "tls_listen", index),
                f"{table.label('tls_listen')}: {address} overlaps the [admin] listen address "
                f"{admin}",
            )


def overlaps(a: ListenAddress, b: ListenAddress) -> bool:
    """Whether two listeners would share connections: the same port and family, and the same
    IP or one of them the wildcard (IPv6 sockets are V6ONLY, so "::" does not take IPv4)."""
    if a.port != b.port or a.family != b.family:
        return False
    return a.host == b.host or any(ipaddress.ip_address(x.host).is_unspecified for x in (a, b))


# -- [tls] -------------------------------------------------------------------------------------


def tls_config(table: Table, server: ServerConfig) -> TlsConfig:
    table.check_keys(_TLS_KEYS)
    default = TlsConfig()
    state_dir = table.get("state_dir", lambda v: file_name(v, "a directory path"), None)
    bundle = table.get("acme_ca_bundle", lambda v: file_name(v, "a file path"), None)
    if bundle is not None:
        bundle = ca_file(table, "acme_ca_bundle", bundle)
    default_certificate = None
    if "default_certificate" in table.data:
        _need_listener(table, "default_certificate", server, "a default certificate")
        default_certificate = certificate_files(table, "default_certificate", ())
    return TlsConfig(
        default_certificate=default_certificate,
        acme_directory=table.get("acme_directory", _acme_directory, default.acme_directory),
        email=table.get("email", _email, None),
        state_dir=str(table.resolve(state_dir)) if state_dir else default.state_dir,
        acme_ca_bundle=bundle,
        handshake_timeout=table.get(
            "handshake_timeout", values.positive_duration, default.handshake_timeout
        ),
        ciphers=table.get("ciphers", _ciphers, default.ciphers),
        min_version=table.get("min_version", _min_version, default.min_version),
        ticket_key_lifetime=table.get(
            "ticket_key_lifetime", values.duration, default.ticket_key_lifetime
        ),
    )


def certificate_files(table: Table, key: str, domains: Sequence[str]) -> CertificateFiles:
    """`key = { cert = "PATH", key = "PATH" }`, the pair checked for `domains`."""
    raw = table.data[key]
    if not isinstance(raw, dict):
        raise table.error(key, f"expected {_FILES_FORM}, got {values.describe(raw)}")
    for name in raw:
        if name not in ("cert", "key"):
            raise table.error(key, f"unknown key '{name}' (expected {_FILES_FORM})")
    for name in ("cert", "key"):
        if name not in raw:
            raise table.error(key, f"missing '{name}' (expected {_FILES_FORM})")
    files = []
    for name in ("cert", "key"):
        try:
            files.append(table.resolve(file_name(raw[name], "a file path")))
        except ValueError as err:
            raise table.error(key, f"{name}: {err}") from None
    cert, private = files
    if table.source.check_files:
        from charon.tls import certs  # cryptography: only for configs with certificates

        try:
            certs.check_pair(cert, private, domains)
        except certs.CertificateError as err:
            raise table.error(key, str(err)) from None
    line = table.source.lines.line_of((*table.path, key))
    return CertificateFiles(str(cert), str(private), line)


# -- [[hosts]] ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostTlsSettings:
    tls: HostTls | None
    force_https: bool
    hsts: str | None


def host_tls(
    table: Table, server: ServerConfig, tls: TlsConfig, domains: Sequence[str]
) -> HostTlsSettings:
    """A host's `tls`, `force_https` and `hsts`."""
    host: HostTls | None = None
    if "tls" in table.data:
        _need_listener(table, "tls", server, "this host has tls set")
        raw = table.data["tls"]
        if raw == "auto":
            _check_auto(table, domains)
            host = HostTls(auto=True)
        elif isinstance(raw, dict):
            host = HostTls(files=certificate_files(table, "tls", domains))
        else:
            got = values.describe(raw)
            raise table.error("tls", f'expected "auto" or {_FILES_FORM}, got {got}')
    force_https = table.get("force_https", boolean, False)
    if force_https:
        _need_listener(table, "force_https", server, "force_https redirects to it")
        if host is None and tls.default_certificate is None:
            raise table.error(
                "force_https",
                "this host has no certificate to serve https with: set its tls, "
                "or [tls] default_certificate",
            )
    return HostTlsSettings(host, force_https, table.get("hsts", _hsts, None))


def _check_auto(table: Table, domains: Sequence[str]) -> None:
    for domain in domains:
        if domain == "*" or domain.startswith("*."):
            raise table.error("tls", f'"auto" cannot cover {values.quote(domain)}: {_DNS01}')
        if values.is_ip_address(domain):
            raise table.error("tls", f'"auto" cannot cover {values.quote(domain)}: {_IP_ACME}')


def _need_listener(table: Table, key: str, server: ServerConfig, why: str) -> None:
    if not server.tls_listen:
        raise table.error(
            key,
            f"{why}, but [server] tls_listen is empty: add a TLS listener, "
            'e.g. tls_listen = ["0.0.0.0:443"]',
        )


# -- https:// backends -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackendTls:
    verify: bool = True
    ca: str | None = None


def backend_tls(table: Table, inherited: BackendTls) -> BackendTls:
    """`tls_verify` and `tls_ca` of a host (inherited: the defaults) or a location (inherited:
    its host's)."""
    verify = table.get("tls_verify", boolean, inherited.verify)
    ca = inherited.ca
    if "tls_ca" in table.data:
        if table.data.get("tls_verify") is False:
            raise table.error("tls_ca", "has no effect with tls_verify = false")
        name = table.parse("tls_ca", lambda v: file_name(v, "a file path"))
        ca = ca_file(table, "tls_ca", name)
    return BackendTls(verify, ca if verify else None)


def with_backend_tls(upstream: Upstream, settings: BackendTls) -> Upstream:
    if not upstream.tls:
        return upstream
    return dataclasses.replace(upstream, tls_verify=settings.verify, tls_ca=settings.ca)


def check_backend_tls_used(table: Table, upstreams: Sequence[Upstream]) -> None:
    """`tls_verify` / `tls_ca` where no https:// upstream can use them is a mistake."""
    if any(upstream.tls for upstream in upstreams):
        return
    for key in LOCATION_KEYS:
        if key in table.data:
            raise table.error(key, "only applies to https:// upstreams, and there is none here")


# -- values ------------------------------------------------------------------------------------


def file_name(value: Any, what: str) -> str:
    name = values.string(value, what + " string")
    if not name:
        raise ValueError("must not be empty")
    return name


def ca_file(table: Table, key: str, name: str) -> str:
    """The path of the CA bundle `name` (checked to hold PEM certificates when files are)."""
    path = table.resolve(name)
    if table.source.check_files:
        from charon.tls import certs

        try:
            certs.read_ca_bundle(path)
        except ValueError as err:
            raise table.error(key, str(err)) from None
    return str(path)


def _acme_directory(value: Any) -> str:
    url = values.string(value, "an https:// URL")
    scheme, sep, rest = url.partition("://")
    if scheme.lower() != "https" or not sep or not rest.split("/", 1)[0]:
        raise ValueError(
            'expected an https:// URL like "https://acme-v02.api.letsencrypt.org/directory", '
            f"got {values.quote(url)}"
        )
    if any(char.isspace() or not char.isprintable() for char in url):
        raise ValueError(f"{values.quote(url)}: must not contain spaces or control characters")
    return url


def _email(value: Any) -> str:
    email = values.string(value, "an email address string")
    if not _EMAIL.fullmatch(email):
        raise ValueError(
            f'expected an email address like "ops@example.com", got {values.quote(email)}'
        )
    return email


def _ciphers(value: Any) -> str:
    ciphers = values.string(value, "an OpenSSL cipher list string")
    if not ciphers.strip():
        raise ValueError("must not be empty")
    import ssl  # only for configs that set ciphers

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
    except ssl.SSLError:
        raise ValueError(
            f"OpenSSL accepts no TLS 1.2 cipher in {values.quote(ciphers)} "
            "(see `openssl ciphers -v LIST`)"
        ) from None
    return ciphers


def _min_version(value: Any) -> str:
    if value not in ("1.2", "1.3") or not isinstance(value, str):
        quoted = " (a quoted string)" if isinstance(value, float) else ""
        raise ValueError(f'expected "1.2" or "1.3"{quoted}, got {values.describe(value)}')
    return str(value)


def _hsts(value: Any) -> str:
    hsts = values.string(value, 'a header value like "max-age=31536000"')
    if not hsts:
        raise ValueError("must not be empty (leave hsts out to send no header)")
    if not all(" " <= char <= "~" for char in hsts):
        raise ValueError(f"{values.quote(hsts)}: only printable ASCII is allowed in a header")
    if not _HSTS.fullmatch(hsts):
        raise ValueError(
            f'must start with "max-age=" and a number of seconds, got {values.quote(hsts)}'
        )
    return hsts

