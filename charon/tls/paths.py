"""Where ACME state lives under `[tls] state_dir`, shared by the supervisor (which writes it)
and the workers (which read it):

    <state_dir>/acme/accounts/<directory-id>/key.pem, account.json   the ACME account (0600)
    <state_dir>/acme/certificates/<host>/cert.pem, key.pem, meta.json  a host's certificate
    <state_dir>/acme/challenges/http-01/<token>                     key authorization text
    <state_dir>/acme/challenges/tls-alpn-01/<domain>.pem, .key      RFC 8737 certificates

`<host>` is the proxy host's first domain; files are written to a temporary name and renamed,
so a reader sees a whole old file or a whole new one."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")


def acme_root(state_dir: str) -> Path:
    return Path(state_dir) / "acme"


def account_dir(state_dir: str, directory_url: str) -> Path:
    digest = hashlib.sha256(directory_url.encode("utf-8")).hexdigest()[:16]
    return acme_root(state_dir) / "accounts" / digest


def certificate_dir(state_dir: str, host_name: str) -> Path:
    return acme_root(state_dir) / "certificates" / host_name


def http01_path(state_dir: str, token: str) -> Path | None:
    """The file answering `/.well-known/acme-challenge/<token>`; None for a token that cannot
    be one (RFC 8555 8.3: base64url characters only), so no path can leave the directory."""
    if not _TOKEN.fullmatch(token):
        return None
    return acme_root(state_dir) / "challenges" / "http-01" / token


def tls_alpn01_dir(state_dir: str) -> Path:
    return acme_root(state_dir) / "challenges" / "tls-alpn-01"


HTTP01_PREFIX = "/.well-known/acme-challenge/"
