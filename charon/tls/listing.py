"""Which certificate each TLS host is served with, as `charon check` lists it."""

from __future__ import annotations

from charon.config.model import CertificateFiles, Config
from charon.tls import paths
from charon.tls.certs import CertificateInfo, read_certificate_info


def certificate_lines(config: Config) -> list[str]:
    """One line per host with `tls` (then the default certificate), e.g.
    "app.example.com: /etc/charon/app.pem (issuer R11, expires 2027-03-01)"."""
    lines = []
    for host in config.hosts:
        if host.tls is None:
            continue
        if host.tls.files is not None:
            lines.append(f"{host.name}: {_files(host.tls.files)}")
        elif host.tls.auto:
            lines.append(f"{host.name}: {_acme(config.tls.state_dir, host.name)}")
    if config.tls.default_certificate is not None:
        lines.append(f"default certificate: {_files(config.tls.default_certificate)}")
    return lines


def _files(files: CertificateFiles) -> str:
    try:
        info = read_certificate_info(files.cert)
    except ValueError as err:  # changed since the config was checked
        return f"{files.cert} ({err})"
    return f"{files.cert} ({_describe(info)})"


def _acme(state_dir: str, host_name: str) -> str:
    directory = paths.certificate_dir(state_dir, host_name)
    cert = directory / "cert.pem"
    try:
        if not cert.exists():
            return f"ACME (state in {directory}, no certificate yet)"
        info = read_certificate_info(cert)
    except PermissionError:  # a state directory only the service's user may read
        return f"ACME (state in {directory}, not readable by this user)"
    except ValueError as err:
        return f"ACME (state in {directory}, {err})"
    return f"ACME (state in {directory}, {_describe(info)})"


def _describe(info: CertificateInfo) -> str:
    return f"issuer {info.issuer}, expires {info.not_after:%Y-%m-%d}"
