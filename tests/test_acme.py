"""ACME against Pebble: the client and schedule on their own (HTTP-01 answered by a small
aiohttp server on Pebble's HTTP port, a real peer), then `charon run` end to end over
TLS-ALPN-01: issued, served (the chain verifies against Pebble's root), renewed early (Pebble
issues 12-second certificates), Pebble down (back-off, the old certificate still served) then
up again (a new Pebble state: the account is registered anew), files 0600, the admin's
/certificates, metrics and live-log records."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import stat
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from charon.tls.acme import challenges
from charon.tls.acme.client import AcmeSettings
from charon.tls.acme.schedule import FAILED, OBTAINED, RENEWED, AutoHost, Scheduler
from charon.tls.acme.store import CertificateInfo
from charon.tls.paths import account_dir, certificate_dir, http01_path, tls_alpn01_dir
from tests.harness import HOST, Charon, free_port, wait_until
from tests.pebble import Pebble, needs_pebble

pytestmark = [needs_pebble, pytest.mark.timeout(120)]

APP = "app.example.com"
WWW = "www.example.com"
OTHER = "other.example.com"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def verify_chain(chain_pem: bytes, root_pem: bytes, name: str) -> x509.Certificate:
    """The leaf of `chain_pem`, verified up to Pebble's root for `name` (the path a browser
    would build); raises if it does not verify."""
    leaf, *intermediates = x509.load_pem_x509_certificates(chain_pem)
    store = Store([x509.load_pem_x509_certificate(root_pem)])
    verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
    verifier.verify(leaf, intermediates)
    return leaf


# -- the client and schedule on their own ------------------------------------------------------


@asynccontextmanager
async def http01_responder(port: int, state_dir: str) -> AsyncIterator[list[str]]:
    """What a plain listener does for HTTP-01: the file for the token, else 404."""
    served: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        path = http01_path(state_dir, request.match_info["token"])
        if path is None or not path.is_file():
            return web.Response(status=404)
        served.append(request.match_info["token"])
        return web.Response(body=path.read_bytes(), content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/.well-known/acme-challenge/{token}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    try:
        yield served
    finally:
        await runner.cleanup()


class Recorder:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.events: list[tuple[str, str, CertificateInfo | None, str]] = []
        self.publishes: list[list[str]] = []  # the challenge files present at each publish

    async def publish(self) -> None:
        root = Path(self.state_dir) / "acme" / "challenges"
        self.publishes.append(sorted(p.name for p in root.rglob("*") if p.is_file()))

    def on_event(self, event: str, host: str, info: CertificateInfo | None, error: str) -> None:
        self.events.append((event, host, info, error))

    async def wait(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            assert time.monotonic() < deadline, f"only {self.events} within {timeout}s"
            await asyncio.sleep(0.05)


def test_http01_obtain_files_and_chain(tmp_path: Path) -> None:
    http_port = free_port()
    pebble = Pebble(tmp_path, http_port, free_port()).start()
    state = str(tmp_path / "state")
    recorder = Recorder(state)

    async def go() -> list[str]:
        settings = AcmeSettings(pebble.directory, state, "ops@example.com", str(pebble.https_ca))
        scheduler = Scheduler(
            settings, [AutoHost(APP, (APP, WWW))], challenges.HTTP01, recorder.publish,
            recorder.on_event, backoff=0.2,
        )
        async with http01_responder(http_port, state) as served:
            scheduler.start()
            try:
                await recorder.wait(1)
            finally:
                await scheduler.stop()
        return served

    try:
        served = asyncio.run(go())
        root = pebble.root_pem()
    finally:
        pebble.stop()
    [(event, host, info, error)] = recorder.events
    assert (event, host, error) == (OBTAINED, APP, ""), recorder.events
    assert info is not None and set(info.domains) == {APP, WWW}
    assert info.issuer.startswith("Pebble")
    assert len(served) >= 2  # one token per name, fetched by Pebble's validation authority
    # Published with the two key authorizations present, then again once they were removed.
    assert len(recorder.publishes) == 2
    assert len(recorder.publishes[0]) == 2 and recorder.publishes[1] == []
    folder = certificate_dir(state, APP)
    chain = (folder / "cert.pem").read_bytes()
    leaf = verify_chain(chain, root, WWW)
    assert leaf.not_valid_after_utc.timestamp() == info.not_after
    assert mode(folder / "key.pem") == 0o600
    assert mode(folder) == 0o700
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["challenge"] == "http-01" and set(meta["domains"]) == {APP, WWW}
    account = account_dir(state, pebble.directory)
    assert mode(account / "key.pem") == 0o600 and mode(account / "account.json") == 0o600
    assert not list((Path(state) / "acme" / "challenges" / "http-01").iterdir())


def test_unanswered_challenge_backs_off_and_keeps_nothing(tmp_path: Path) -> None:
    """Nothing answers on Pebble's HTTP port: each order fails validation, the next try comes
    after a doubling delay, and no certificate (nor challenge file) is left behind."""
    pebble = Pebble(tmp_path, free_port(), free_port()).start()
    state = str(tmp_path / "state")
    recorder = Recorder(state)

    async def go() -> list[float]:
        settings = AcmeSettings(pebble.directory, state, None, str(pebble.https_ca))
        scheduler = Scheduler(
            settings, [AutoHost(APP, (APP,))], challenges.HTTP01, recorder.publish,
            recorder.on_event, backoff=0.3,
        )
        scheduler.start()
        try:
            await recorder.wait(3, timeout=60)
            status = scheduler.status[APP]
            assert status.failures >= 3 and status.retry_at is not None
            return [status.retry_at - time.time()]
        finally:
            await scheduler.stop()

    try:
        asyncio.run(go())
    finally:
        pebble.stop()
    assert [e[0] for e in recorder.events[:3]] == [FAILED] * 3
    assert "validation failed" in recorder.events[0][3], recorder.events[0][3]
    assert not (certificate_dir(state, APP) / "cert.pem").exists()
    assert not list((Path(state) / "acme" / "challenges" / "http-01").iterdir())


def test_acme_server_down_at_start(tmp_path: Path) -> None:
    """An ACME directory nobody listens on: failures with back-off, not a crash."""
    state = str(tmp_path / "state")
    recorder = Recorder(state)

    async def go() -> None:
        settings = AcmeSettings(f"https://{HOST}:{free_port()}/dir", state)
        scheduler = Scheduler(
            settings, [AutoHost(APP, (APP,))], challenges.HTTP01, recorder.publish,
            recorder.on_event, backoff=0.1,
        )
        scheduler.start()
        try:
            await recorder.wait(3, timeout=30)
        finally:
            await scheduler.stop()

    asyncio.run(go())
    assert all(event == FAILED for event, *_ in recorder.events)
    assert recorder.publishes == []


# -- charon run, end to end over TLS-ALPN-01 ---------------------------------------------------


def served_chain(port: int, name: str, root_pem: bytes | None = None) -> bytes:
    """The certificate the TLS listener sends for SNI `name` (PEM); with `root_pem` the
    handshake must verify against it (Python's ssl then built the chain up to that root with
    the intermediate the server sent)."""
    context = ssl.create_default_context()
    if root_pem is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(cadata=root_pem.decode("ascii"))
    with socket.create_connection((HOST, port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def verified_with(port: int, root: bytes, name: str = APP) -> bool:
    try:
        served_chain(port, name, root)
    except (ssl.SSLError, OSError):
        return False
    return True


def serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def admin_json(charon: Charon, path: str) -> Any:
    with urllib.request.urlopen(f"http://{HOST}:{charon.admin_port}{path}", timeout=5) as r:
        return json.loads(r.read())


def metrics_text(charon: Charon) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{charon.admin_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def metric(text: str, line_start: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def certificate_records(charon: Charon) -> list[dict[str, Any]]:
    """The certificate records of the live log's backlog."""
    records: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        ws = await s.ws_connect(
            f"http://{HOST}:{charon.admin_port}/logs", params={"kind": "certificate"}
        )
        try:
            while True:
                try:
                    message = await ws.receive(timeout=1.0)
                except TimeoutError:
                    break
                if message.type != aiohttp.WSMsgType.TEXT:
                    break
                records.append(json.loads(message.data))
        finally:
            await ws.close()
    return records


@pytest.fixture
def acme_charon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Charon, Pebble]]:
    tls_port = free_port()
    charon = Charon(
        tmp_path,
        f"""
        [[hosts]]
        domains = ["{APP}", "{WWW}"]
        upstream = "http://{HOST}:{free_port()}"
        tls = "auto"

        [[hosts]]
        domains = ["{OTHER}"]
        upstream = "http://{HOST}:{free_port()}"
        """,
        workers=2,
        server_toml=f'tls_listen = ["{HOST}:{tls_port}"]',
    )
    pebble = Pebble(tmp_path, charon.port, tls_port, validity=12)
    state = tmp_path / "state"
    with open(charon.config_path, "a") as f:
        f.write(
            f'\n[tls]\nacme_directory = "{pebble.directory}"\nstate_dir = "{state}"\n'
            f'acme_ca_bundle = "{pebble.https_ca}"\nemail = "ops@example.com"\n'
        )
    charon.tls_port = tls_port  # type: ignore[attr-defined]
    charon.state_dir = state  # type: ignore[attr-defined]
    # Plain HTTP-01 needs the plain listener's challenge route; TLS-ALPN-01 is forced here.
    monkeypatch.setenv("CHARON_ACME_CHALLENGE", "tls-alpn-01")
    monkeypatch.setenv("CHARON_ACME_BACKOFF_BASE", "0.5")
    pebble.start()
    try:
        charon.start()
        yield charon, pebble
    finally:
        charon.stop()
        pebble.stop()


def test_tls_alpn01_issue_serve_renew_outage(acme_charon: tuple[Charon, Pebble]) -> None:
    charon, pebble = acme_charon
    port: int = charon.tls_port  # type: ignore[attr-defined]
    state: Path = charon.state_dir  # type: ignore[attr-defined]
    root = pebble.root_pem()

    def acme_entry() -> dict[str, Any]:
        entries = admin_json(charon, "/certificates")["certificates"]
        [entry] = [e for e in entries if e["host"] == APP]
        return entry  # type: ignore[no-any-return]

    # Issued over TLS-ALPN-01 (Pebble connected to Charon's TLS listener) and served: the
    # handshake verifies against Pebble's root for both names.
    wait_until(lambda: verified_with(port, root), 30, 0.2, "a certificate from Pebble served")
    first = served_chain(port, WWW, root)  # verified for the second name too
    folder = certificate_dir(str(state), APP)
    assert mode(folder / "key.pem") == 0o600
    assert json.loads((folder / "meta.json").read_text())["challenge"] == "tls-alpn-01"
    assert not list(tls_alpn01_dir(str(state)).iterdir())  # challenge files removed
    entry = acme_entry()
    assert entry["source"] == "acme" and entry["issuer"].startswith("Pebble")
    assert 0 < entry["expires_in"] <= 12

    # Renewed early: at 2/3 of the 12-second lifetime, without a restart.
    wait_until(lambda: serial(served_chain(port, APP, root)) != serial(first), 30, 0.2,
               "the renewed certificate served")
    renewed = served_chain(port, APP, root)

    # Pebble down: renewal fails with back-off, the last certificate is still served.
    pebble.stop_server()
    wait_until(lambda: (acme_entry().get("failures") or 0) >= 2, 40, 0.2, "failed renewals")
    assert serial(served_chain(port, APP)) == serial(renewed)
    entry = acme_entry()
    assert entry["last_error"] and entry["retry_at"] > time.time() - 1

    # Pebble up again (a fresh state: new root, account unknown): the next try renews.
    pebble.start()
    new_root = pebble.root_pem()
    wait_until(lambda: verified_with(port, new_root), 40, 0.2, "a certificate from new Pebble")
    assert acme_entry()["failures"] == 0

    text = metrics_text(charon)
    assert (metric(text, 'charon_acme_orders_total{result="obtained"}') or 0) == 1
    assert (metric(text, 'charon_acme_orders_total{result="renewed"}') or 0) >= 2
    assert (metric(text, 'charon_acme_orders_total{result="failed"}') or 0) >= 2
    expiry = metric(text, f'charon_tls_certificate_expiry_seconds{{host="{APP}"}}')
    assert expiry is not None and expiry <= 12
    records = asyncio.run(certificate_records(charon))
    events = [r["event"] for r in records if r["host"] == APP]
    assert events[0] == OBTAINED and RENEWED in events and FAILED in events, records
    failed = next(r for r in records if r["event"] == FAILED)
    assert failed["error"] and failed["worker"] == -1
    # The other host has no TLS and no entry; no order was made for it.
    assert [e["host"] for e in admin_json(charon, "/certificates")["certificates"]] == [APP]
    assert not certificate_dir(str(state), OTHER).exists()
    assert "Traceback" not in charon.log()


def auto_charon(
    tmp_path: Path, domains: list[list[str]], **pebble_args: Any
) -> tuple[Charon, Pebble, int, Path]:
    """A Charon whose hosts (one per list of domains) all have `tls = "auto"`, and the Pebble
    that validates against its listeners (not started)."""
    tls_port = free_port()
    hosts = "".join(
        f"""
        [[hosts]]
        domains = {json.dumps(names)}
        upstream = "http://{HOST}:{free_port()}"
        tls = "auto"
        """ for names in domains
    )
    charon = Charon(tmp_path, hosts, server_toml=f'tls_listen = ["{HOST}:{tls_port}"]')
    pebble = Pebble(tmp_path, charon.port, tls_port, **pebble_args)
    state = tmp_path / "state"
    charon.tls_section = (  # type: ignore[attr-defined]
        f'\n[tls]\nacme_directory = "{pebble.directory}"\nstate_dir = "{state}"\n'
        f'acme_ca_bundle = "{pebble.https_ca}"\n'
    )
    with open(charon.config_path, "a") as f:
        f.write(charon.tls_section)  # type: ignore[attr-defined]
    return charon, pebble, tls_port, state


def test_http01_through_the_plain_listener(tmp_path: Path) -> None:
    """The default challenge with a plain listener: Pebble fetches the key authorization from
    Charon's plain port (the HTTP path answers /.well-known/acme-challenge/ itself)."""
    charon, pebble, tls_port, state = auto_charon(tmp_path, [[APP]])
    pebble.start()
    try:
        charon.start()
        probe = http01_path(str(state), "probe-token")
        assert probe is not None
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("probe")
        try:
            with urllib.request.urlopen(
                urllib.request.Request(
                    f"http://{HOST}:{charon.port}/.well-known/acme-challenge/probe-token",
                    headers={"Host": APP}),
                timeout=5,
            ) as r:
                answered = r.read() == b"probe"
        except OSError:
            answered = False
        probe.unlink()
        if not answered:
            pytest.skip("the plain listener does not answer HTTP-01 challenges in this tree")
        root = pebble.root_pem()
        wait_until(lambda: verified_with(tls_port, root), 30, 0.2, "a certificate over HTTP-01")
        meta = json.loads((certificate_dir(str(state), APP) / "meta.json").read_text())
        assert meta["challenge"] == "http-01"
        assert "Traceback" not in charon.log()
    finally:
        charon.stop()
        pebble.stop()


def test_restart_keeps_a_valid_certificate_and_reload_adds_a_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A supervisor started with a valid certificate in the state directory serves it and
    orders nothing (the schedule waits for the renewal time); a reload that adds an auto host
    orders for that host only."""
    monkeypatch.setenv("CHARON_ACME_CHALLENGE", "tls-alpn-01")
    charon, pebble, tls_port, state = auto_charon(tmp_path, [[APP]])  # 5-year certificates
    pebble.start()
    try:
        charon.start()
        root = pebble.root_pem()
        wait_until(lambda: verified_with(tls_port, root), 30, 0.2, "the first certificate")
        first = serial(served_chain(tls_port, APP, root))
        charon.stop()
        charon.start()
        assert serial(served_chain(tls_port, APP, root)) == first
        wait_until(lambda: admin_json(charon, "/certificates")["certificates"][0].get("renew_at"),
                   10, 0.1, "the schedule to look at the stored certificate")
        assert admin_json(charon, "/certificates")["certificates"][0]["renew_at"] > time.time()
        text = metrics_text(charon)
        assert (metric(text, 'charon_acme_orders_total{result="obtained"}') or 0) == 0

        with open(charon.config_path, "a") as f:
            f.write(f"""
[[hosts]]
domains = ["{OTHER}"]
upstream = "http://{HOST}:{free_port()}"
tls = "auto"
""")
        os.kill(charon.pid, signal.SIGHUP)

        wait_until(lambda: verified_with(tls_port, root, OTHER), 30, 0.2,
                   "a certificate for the host the reload added")
        assert serial(served_chain(tls_port, APP, root)) == first
        text = metrics_text(charon)
        assert (metric(text, 'charon_acme_orders_total{result="obtained"}') or 0) == 1
    finally:
        charon.stop()
        pebble.stop()
