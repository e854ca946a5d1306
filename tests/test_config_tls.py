"""The TLS parts of the config: the model values a valid config gives, and the exact
"PATH:LINE: message" of every TLS error (certificates from tests/tlsca.py, a throwaway CA);
`charon check`'s certificate listing as a real process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import REPO
from tlsca import Leaf, TestCA

from charon.config import ConfigError, ListenAddress, Upstream, load_config
from charon.config.model import INTERMEDIATE_CIPHERS, LETS_ENCRYPT, CertificateFiles, HostTls
from charon.tls import paths
from charon.tls.certs import read_certificate_info

DNS01 = (
    "wildcard names need the DNS-01 challenge, which Charon does not do: "
    "give this host tls = { cert, key }"
)
NO_LISTENER = (
    'but [server] tls_listen is empty: add a TLS listener, e.g. tls_listen = ["0.0.0.0:443"]'
)


class Certs:
    """The CA and the leaves every test uses, made once for the module."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = TestCA(directory)
        self.app = self.ca.issue(["app.example.com", "*.example.org"], "app")
        self.other = self.ca.issue(["other.example.com"], "other")
        self.expired = self.ca.issue(["app.example.com"], "expired", days=-1, not_before_days=-30)
        self.future = self.ca.issue(["app.example.com"], "future", not_before_days=2)
        self.mismatched = self.ca.issue(["app.example.com"], "mismatched", key_path_from=self.other)
        self.ip = self.ca.issue(["127.0.0.1"], "ip")
        self.not_pem = directory / "not.pem"
        self.not_pem.write_text("hello\n")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("tlsca"))


def pair(leaf: Leaf) -> str:
    return f'{{ cert = "{leaf.cert_path}", key = "{leaf.key_path}" }}'


def write(directory: Path, text: str) -> str:
    path = directory / "charon.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return str(path)


def line_of(path: str, start: str) -> int:
    """The line of `path` that starts with `start` (so expected lines follow the text)."""
    lines = Path(path).read_text().splitlines()
    return next(number for number, line in enumerate(lines, 1) if line.startswith(start))


def check_error(path: str, start: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = line_of(path, start)
    assert (info.value.path, info.value.line, info.value.message) == (path, line, message)
    assert str(info.value) == f"{path}:{line}: {message}"


SERVER = '[server]\nlisten = ["127.0.0.1:8080"]\ntls_listen = ["127.0.0.1:8443"]\n'


def host(tls_line: str, domains: str = '["app.example.com", "x.example.org"]') -> str:
    """SERVER and one [[hosts]] ending with `tls_line`."""
    return SERVER + host_table(tls_line, domains)


def host_table(tls_line: str = "", domains: str = '["app.example.com", "x.example.org"]') -> str:
    return f'[[hosts]]\ndomains = {domains}\nupstream = "http://127.0.0.1:3000"\n{tls_line}\n'



# -- valid configs -----------------------------------------------------------------------------


def test_full_tls_config(certs: Certs) -> None:
    # Written next to the certificates: relative file names are relative to the config file.
    path = write(
        certs.dir,
        """
        [server]
        listen = ["127.0.0.1:8080"]
        tls_listen = ["127.0.0.1:8443", "[::1]:8443"]

        [tls]
        default_certificate = { cert = "other.pem", key = "other.key" }
        acme_directory = "https://127.0.0.1:14000/dir"
        email = "ops@example.com"
        state_dir = "state"
        acme_ca_bundle = "ca.pem"
        handshake_timeout = "5s"
        ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256"
        min_version = "1.3"
        ticket_key_lifetime = 0

        [[hosts]]
        domains = ["app.example.com", "x.example.org"]
        upstream = "https://127.0.0.1:3443"
        tls_ca = "ca.pem"
        tls = { cert = "app.pem", key = "app.key" }
        force_https = true
        hsts = "max-age=31536000; includeSubDomains"

        [[hosts.locations]]
        path = "/insecure/"
        upstream = "https://localhost"
        tls_verify = false

        [[hosts.locations]]
        path = "/api/"
        upstream = "https://[::1]:4443"

        [[hosts]]
        domains = ["auto.example.com", "www.auto.example.com"]
        upstream = "http://127.0.0.1:3000"
        tls = "auto"

        [[hosts]]
        domains = ["*"]
        upstream = "http://127.0.0.1:3000"
        tls = { cert = "ip.pem", key = "ip.key" }
        """,
    )
    config = load_config(path)
    d = certs.dir
    listeners = (ListenAddress("127.0.0.1", 8443), ListenAddress("::1", 8443))
    assert config.server.tls_listen == listeners
    tls = config.tls
    assert tls.default_certificate == CertificateFiles(
        str(d / "other.pem"), str(d / "other.key"), line_of(path, "default_certificate")
    )
    assert (tls.acme_directory, tls.email) == ("https://127.0.0.1:14000/dir", "ops@example.com")
    assert (tls.state_dir, tls.acme_ca_bundle) == (str(d / "state"), str(d / "ca.pem"))
    assert (tls.handshake_timeout, tls.ciphers) == (5.0, "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert (tls.min_version, tls.ticket_key_lifetime) == ("1.3", 0.0)

    app, auto, catch_all = config.hosts
    files = CertificateFiles(str(d / "app.pem"), str(d / "app.key"), line_of(path, "tls = { cert"))
    assert app.tls == HostTls(files=files)
    assert (app.force_https, app.hsts) == (True, "max-age=31536000; includeSubDomains")
    ca = str(d / "ca.pem")
    assert app.upstream == Upstream("https://127.0.0.1:3443", "127.0.0.1", 3443, True, True, ca)
    insecure, api = app.locations  # longest path first
    assert api.upstream == Upstream("https://[::1]:4443", "::1", 4443, True, True, ca)
    assert insecure.upstream == Upstream("https://localhost", "localhost", 443, True, False, None)
    assert (auto.tls, auto.force_https, auto.hsts) == (HostTls(auto=True), False, None)
    assert catch_all.tls is not None and catch_all.tls.files is not None


def test_defaults_without_tls(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, host("")))
    tls = config.tls
    assert tls.default_certificate is None
    assert (tls.acme_directory, tls.email, tls.acme_ca_bundle) == (LETS_ENCRYPT, None, None)
    assert (tls.state_dir, tls.handshake_timeout) == ("/var/lib/charon", 10.0)
    assert (tls.ciphers, tls.min_version, tls.ticket_key_lifetime) == (
        INTERMEDIATE_CIPHERS, "1.2", 3600.0,
    )
    (app,) = config.hosts
    assert (app.tls, app.force_https, app.hsts) == (None, False, None)
    assert app.upstream == Upstream("http://127.0.0.1:3000", "127.0.0.1", 3000)
    no_tls = load_config(write(tmp_path, host("").replace("tls_listen", "# tls_listen")))
    assert no_tls.server.tls_listen == ()


def test_tls_listen_single_string_and_empty_list(tmp_path: Path) -> None:
    text = host("").replace('["127.0.0.1:8443"]', '"[::1]:443"')
    assert load_config(write(tmp_path, text)).server.tls_listen == (ListenAddress("::1", 443),)
    text = host("").replace('["127.0.0.1:8443"]', "[]")
    assert load_config(write(tmp_path, text)).server.tls_listen == ()


def test_https_upstream_default_port(tmp_path: Path) -> None:
    text = host("").replace("http://127.0.0.1:3000", "https://backend.example.com")
    (app,) = load_config(write(tmp_path, text)).hosts
    assert app.upstream == Upstream("https://backend.example.com", "backend.example.com", 443, True)


def test_wildcard_and_catch_all_names(certs: Certs, tmp_path: Path) -> None:
    # "*.example.org" in the certificate covers one label, and the host's own "*.example.org".
    text = host(f"tls = {pair(certs.app)}", '["app.example.com", "*.example.org", "a.example.org"]')
    load_config(write(tmp_path, text))
    load_config(write(tmp_path, host(f"tls = {pair(certs.other)}", '["*"]')))
    load_config(write(tmp_path, host(f"tls = {pair(certs.ip)}", '["127.0.0.1"]')))


def test_check_files_false_reads_no_file(tmp_path: Path) -> None:
    text = host('tls = { cert = "gone.pem", key = "gone.key" }').replace(
        'upstream = "http://127.0.0.1:3000"',
        'upstream = "https://127.0.0.1:3000"\ntls_ca = "no.pem"',
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError):
        load_config(path)
    (app,) = load_config(path, check_files=False).hosts
    assert app.tls == HostTls(CertificateFiles(
        str(tmp_path / "gone.pem"), str(tmp_path / "gone.key"), line_of(path, "tls =")
    ))
    assert app.upstream.tls_ca == str(tmp_path / "no.pem")


# -- certificate file errors -------------------------------------------------------------------


def test_certificate_file_errors(certs: Certs, tmp_path: Path) -> None:
    d, app = certs.dir, certs.app
    cases = [
        (f'{{ cert = "{d}/nope.pem", key = "{app.key_path}" }}',
         f'cannot read "{d}/nope.pem": No such file or directory'),
        (f'{{ cert = "{d}", key = "{app.key_path}" }}', f'cannot read "{d}": Is a directory'),
        (f'{{ cert = "{certs.not_pem}", key = "{app.key_path}" }}',
         f'"{certs.not_pem}" is not a PEM file'),
        (f'{{ cert = "{app.key_path}", key = "{app.key_path}" }}',
         f'"{app.key_path}" contains no certificate'),
        (f'{{ cert = "{app.cert_path}", key = "{d}/nope.key" }}',
         f'cannot read "{d}/nope.key": No such file or directory'),
        (f'{{ cert = "{app.cert_path}", key = "{app.cert_path}" }}',
         f'"{app.cert_path}" contains no private key'),
        (f'{{ cert = "{app.cert_path}", key = "{certs.not_pem}" }}',
         f'"{certs.not_pem}" is not a PEM file'),
        (pair(certs.mismatched),
         f'the key "{certs.mismatched.key_path}" does not match the certificate '
         f'"{certs.mismatched.cert_path}"'),
        (pair(certs.expired),
         f'"{certs.expired.cert_path}" expired on '
         f"{certs.expired.certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"),
        (pair(certs.future),
         f'"{certs.future.cert_path}" is not valid yet (valid from '
         f"{certs.future.certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC)"),
        (pair(certs.other),
         f'"{certs.other.cert_path}" does not cover app.example.com, x.example.org '
         "(its names: other.example.com)"),
    ]
    for value, message in cases:
        path = write(tmp_path, host(f"tls = {value}"))
        check_error(path, "tls =", f"[[hosts]] tls: {message}")
    text = f"{SERVER}[tls]\ndefault_certificate = {pair(certs.expired)}\n{host_table()}"
    path = write(tmp_path, text)
    expired = cases[8][1]
    check_error(path, "default_certificate", f"[tls] default_certificate: {expired}")


@pytest.mark.parametrize(
    ("leaf", "domains", "missing"),
    [
        ("app", '["a.b.example.org"]', "a.b.example.org"),  # "*.x" covers one label
        ("app", '["example.org"]', "example.org"),
        ("app", '["*.example.org", "*.example.com"]', "*.example.com"),
        ("wildcard_for", '["*.example.org"]', "*.example.org"),  # needs "*.x" itself
        ("ip", '["127.0.0.2"]', "127.0.0.2"),
    ],
)
def test_names_must_cover_every_domain(
    certs: Certs, tmp_path: Path, leaf: str, domains: str, missing: str
) -> None:
    if leaf == "wildcard_for":
        chosen = certs.ca.issue(["a.example.org", "b.example.org"], "no-wildcard")
    else:
        chosen = getattr(certs, leaf)
    names = ", ".join(name for name in chosen.names)
    path = write(tmp_path, host(f"tls = {pair(chosen)}", domains))
    message = f'"{chosen.cert_path}" does not cover {missing} (its names: {names})'
    check_error(path, "tls =", f"[[hosts]] tls: {message}")


# -- other TLS errors --------------------------------------------------------------------------


def tls_table(line: str) -> str:
    return f"{SERVER}[tls]\n{line}\n{host_table()}"


def _errors() -> list[tuple[str, str, str]]:
    """(config text, the start of the line the error is at, message); `ca` stands for the test
    CA's certificate file, put in by the test."""
    ca = "CA_PEM"
    files = '{ cert = "a.pem", key = "a.key" }'
    http, https = 'upstream = "http://127.0.0.1:3000"', 'upstream = "https://127.0.0.1:3443"'
    no_listener = host("").replace('tls_listen = ["127.0.0.1:8443"]\n', "")
    return [
        (host('tls = "auto"', '["app.example.com", "*.example.org"]'), "tls =",
         f'[[hosts]] tls: "auto" cannot cover "*.example.org": {DNS01}'),
        (host('tls = "auto"', '["*"]'), "tls =",
         f'[[hosts]] tls: "auto" cannot cover "*": {DNS01}'),
        (host('tls = "auto"', '["app.example.com", "10.0.0.1"]'), "tls =",
         '[[hosts]] tls: "auto" cannot cover "10.0.0.1": Charon\'s ACME client asks for DNS '
         "names only, not IP addresses: give this host tls = { cert, key }"),
        (no_listener + 'tls = "auto"\n', "tls =",
         f"[[hosts]] tls: this host has tls set, {NO_LISTENER}"),
        (no_listener + "force_https = true\n", "force_https",
         f"[[hosts]] force_https: force_https redirects to it, {NO_LISTENER}"),
        (no_listener.replace("[[hosts]]", f"[tls]\ndefault_certificate = {files}\n[[hosts]]"),
         "default_certificate", f"[tls] default_certificate: a default certificate, {NO_LISTENER}"),
        (host("force_https = true"), "force_https",
         "[[hosts]] force_https: this host has no certificate to serve https with: set its tls, "
         "or [tls] default_certificate"),
        (host('tls = "manual"'), "tls =",
         '[[hosts]] tls: expected "auto" or { cert = "PATH", key = "PATH" }, got "manual"'),
        (host('tls = { cert = "a.pem" }'), "tls =",
         '[[hosts]] tls: missing \'key\' (expected { cert = "PATH", key = "PATH" })'),
        (host('tls = { cert = "a.pem", key = "a.key", chain = "c.pem" }'), "tls =",
         '[[hosts]] tls: unknown key \'chain\' (expected { cert = "PATH", key = "PATH" })'),
        (host('tls = { cert = "", key = "a.key" }'), "tls =",
         "[[hosts]] tls: cert: must not be empty"),
        (host('tls = { cert = "a.pem", key = 1 }'), "tls =",
         "[[hosts]] tls: key: expected a file path string, got 1"),
        (host('hsts = ""'), "hsts",
         "[[hosts]] hsts: must not be empty (leave hsts out to send no header)"),
        (host('hsts = "includeSubDomains"'), "hsts",
         '[[hosts]] hsts: must start with "max-age=" and a number of seconds, '
         'got "includeSubDomains"'),
        (host('hsts = "max-age=1y"'), "hsts",
         '[[hosts]] hsts: must start with "max-age=" and a number of seconds, got "max-age=1y"'),
        (host('hsts = "max-age=1\\r\\nX: y"'), "hsts",
         '[[hosts]] hsts: "max-age=1\\u000d\\u000aX: y": '
         "only printable ASCII is allowed in a header"),
        (host("hsts = 31536000"), "hsts",
         '[[hosts]] hsts: expected a header value like "max-age=31536000", got 31536000'),
        (host('force_https = "yes"'), "force_https",
         '[[hosts]] force_https: expected true or false, got "yes"'),
        (SERVER.replace('"127.0.0.1:8443"]', '"127.0.0.1:8443", "127.0.0.1:8443"]') + host_table(),
         "tls_listen", "[server] tls_listen: 127.0.0.1:8443 is listed twice"),
        (SERVER.replace("127.0.0.1:8443", "0.0.0.0:8080") + host_table(), "tls_listen",
         "[server] tls_listen: 0.0.0.0:8080 overlaps the [server] listen address 127.0.0.1:8080"),
        (SERVER.replace("127.0.0.1:8443", "127.0.0.1:9090") + host_table(), "tls_listen",
         "[server] tls_listen: 127.0.0.1:9090 overlaps the [admin] listen address 127.0.0.1:9090"),
        (host("").replace("[[hosts]]", '[admin]\nlisten = "[::1]:8443"\n[[hosts]]').replace(
            '"127.0.0.1:8443"', '"[::]:8443"'), "tls_listen",
         "[server] tls_listen: [::]:8443 overlaps the [admin] listen address [::1]:8443"),
        (SERVER.replace('["127.0.0.1:8443"]', "8443") + host_table(), "tls_listen",
         '[server] tls_listen: expected an array of "IP:PORT" strings, got 8443'),
        (tls_table('cipher = "x"'), "cipher",
         "unknown key 'cipher' in [tls] (did you mean 'ciphers'?)"),
        (tls_table('ciphers = ""'), "ciphers", "[tls] ciphers: must not be empty"),
        (tls_table('ciphers = "NOPE"'), "ciphers",
         '[tls] ciphers: OpenSSL accepts no TLS 1.2 cipher in "NOPE" '
         "(see `openssl ciphers -v LIST`)"),
        (tls_table('min_version = "1.1"'), "min_version",
         '[tls] min_version: expected "1.2" or "1.3", got "1.1"'),
        (tls_table("min_version = 1.2"), "min_version",
         '[tls] min_version: expected "1.2" or "1.3" (a quoted string), got 1.2'),
        (tls_table('handshake_timeout = "0s"'), "handshake_timeout",
         '[tls] handshake_timeout: must be greater than 0, got "0s"'),
        (tls_table('ticket_key_lifetime = "soon"'), "ticket_key_lifetime",
         '[tls] ticket_key_lifetime: invalid duration "soon": use e.g. "5s", "250ms", "2m", '
         '"1h", "1m30s"'),
        (tls_table('acme_directory = "http://127.0.0.1:14000/dir"'), "acme_directory",
         '[tls] acme_directory: expected an https:// URL like '
         '"https://acme-v02.api.letsencrypt.org/directory", got "http://127.0.0.1:14000/dir"'),
        (tls_table('email = "ops"'), "email",
         '[tls] email: expected an email address like "ops@example.com", got "ops"'),
        (tls_table('state_dir = ""'), "state_dir", "[tls] state_dir: must not be empty"),
        (tls_table(f'acme_ca_bundle = "{ca}.missing"'), "acme_ca_bundle",
         f'[tls] acme_ca_bundle: cannot read "{ca}.missing": No such file or directory'),
        (host("").replace(http, f'{https}\ntls_ca = "{ca}.missing"'),
         "tls_ca", f'[[hosts]] tls_ca: cannot read "{ca}.missing": No such file or directory'),
        (host(f'tls_ca = "{ca}"'), "tls_ca",
         "[[hosts]] tls_ca: only applies to https:// upstreams, and there is none here"),
        (host("tls_verify = false"), "tls_verify",
         "[[hosts]] tls_verify: only applies to https:// upstreams, and there is none here"),
        (host("").replace(http, f'{https}\ntls_verify = false\n'
                          f'tls_ca = "{ca}"'), "tls_ca",
         "[[hosts]] tls_ca: has no effect with tls_verify = false"),
        (host('[[hosts.locations]]\npath = "/a/"\nupstream = "http://127.0.0.1:4000"\n'
              "tls_verify = true"), "tls_verify",
         "[[hosts.locations]] tls_verify: "
         "only applies to https:// upstreams, and there is none here"),
        (host("tls_verify = 1"), "tls_verify",
         "[[hosts]] tls_verify: expected true or false, got 1"),
    ]


ERRORS = _errors()


@pytest.mark.parametrize(("text", "start", "message"), ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_tls_errors(certs: Certs, tmp_path: Path, text: str, start: str, message: str) -> None:
    ca = str(certs.ca.cert_path)
    path = write(tmp_path, text.replace("CA_PEM", ca))
    check_error(path, start, message.replace("CA_PEM", ca))


def test_ca_files_must_hold_a_certificate(certs: Certs, tmp_path: Path) -> None:
    key = certs.app.key_path
    path = write(tmp_path, tls_table(f'acme_ca_bundle = "{key}"'))
    check_error(path, "acme_ca_bundle", f'[tls] acme_ca_bundle: "{key}" contains no certificate')
    text = host('[[hosts.locations]]\npath = "/a/"\nupstream = "https://127.0.0.1:4000"\n'
                f'tls_ca = "{certs.not_pem}"')
    check_error(write(tmp_path, text), "tls_ca",
                f'[[hosts.locations]] tls_ca: "{certs.not_pem}" is not a PEM file')


# -- charon check ------------------------------------------------------------------------------


def test_check_lists_certificates(certs: Certs, tmp_path: Path) -> None:
    state = tmp_path / "state"
    issued = paths.certificate_dir(str(state), "issued.example.com")
    issued.mkdir(parents=True)
    (issued / "cert.pem").write_bytes(certs.other.cert_path.read_bytes())
    hosts = [
        ("app.example.com", f"tls = {pair(certs.app)}"),
        ("new.example.com", 'tls = "auto"'),
        ("issued.example.com", 'tls = "auto"'),
        ("plain.example.com", ""),
    ]
    text = f'{SERVER}[tls]\ndefault_certificate = {pair(certs.other)}\nstate_dir = "state"\n'
    for domain, tls_line in hosts:
        text += f'[[hosts]]\ndomains = ["{domain}"]\nupstream = "http://127.0.0.1:3000"\n{tls_line}\n'
    path = write(tmp_path, text)
    result = subprocess.run(
        [sys.executable, "-m", "charon", "check", path],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stderr) == (0, "")
    app = read_certificate_info(certs.app.cert_path)
    other = read_certificate_info(certs.other.cert_path)
    assert app.issuer == "Charon Test CA"
    expected = [
        f"{path}: ok (4 proxy hosts)",
        f"  app.example.com: {certs.app.cert_path} "
        f"(issuer Charon Test CA, expires {app.not_after:%Y-%m-%d})",
        f"  new.example.com: ACME (state in {state}/acme/certificates/new.example.com, "
        "no certificate yet)",
        f"  issued.example.com: ACME (state in {issued}, "
        f"issuer Charon Test CA, expires {other.not_after:%Y-%m-%d})",
        f"  default certificate: {certs.other.cert_path} "
        f"(issuer Charon Test CA, expires {other.not_after:%Y-%m-%d})",
    ]
    assert result.stdout.splitlines() == expected


def test_check_without_tls_prints_only_ok(tmp_path: Path) -> None:
    path = write(tmp_path, host(""))
    result = subprocess.run(
        [sys.executable, "-m", "charon", "check", path],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"{path}: ok (1 proxy hosts)\n", ""
    )
