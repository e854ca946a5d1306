"""The admin's certificate view for certificate files (no ACME needed): /certificates, the
expiry gauge, and the table on the live log page in headless Chromium. ACME hosts are covered
end to end in test_acme.py."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import HOST, Charon, free_port
from test_live_log_page import CHROMIUM, Browser, Page, browser, with_page  # noqa: F401
from tlsca import TestCA

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def charon(tmp_path: Path) -> Iterator[tuple[Charon, float]]:
    ca = TestCA(tmp_path / "ca")
    leaf = ca.issue(["secure.test"], days=30)
    c = Charon(
        tmp_path,
        f"""
        [[hosts]]
        domains = ["secure.test"]
        upstream = "http://{HOST}:{free_port()}"
        tls = {{ cert = "{leaf.cert_path}", key = "{leaf.key_path}" }}

        [[hosts]]
        domains = ["plain.test"]
        upstream = "http://{HOST}:{free_port()}"
        """,
        server_toml=f'tls_listen = ["{HOST}:{free_port()}"]',
    ).start()
    try:
        yield c, leaf.certificate.not_valid_after_utc.timestamp()
    finally:
        c.stop()


def get(c: Charon, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{HOST}:{c.admin_port}{path}", timeout=5) as r:
        return bytes(r.read())


def test_certificates_json_and_expiry_metric(charon: tuple[Charon, float]) -> None:
    c, not_after = charon
    [entry] = json.loads(get(c, "/certificates"))["certificates"]
    assert entry["host"] == "secure.test" and entry["source"] == "file"
    assert entry["issuer"] == "Charon Test CA" and entry["not_after"] == not_after
    assert 29 * 86400 < entry["expires_in"] <= 30 * 86400
    assert "renew_at" not in entry  # not an ACME host
    text = get(c, "/metrics").decode()
    [line] = [ln for ln in text.splitlines()
              if ln.startswith('charon_tls_certificate_expiry_seconds{host="secure.test"}')]
    assert abs(float(line.split()[-1]) - (not_after - time.time())) < 60
    for result in ("obtained", "renewed", "failed"):
        assert f'charon_acme_orders_total{{result="{result}"}} 0.0' in text


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
def test_page_shows_the_certificate_table(browser: Browser, charon: tuple[Charon, float]) -> None:  # noqa: F811
    c, _ = charon

    async def test(page: Page, s: aiohttp.ClientSession) -> None:
        await page.open(f"http://{HOST}:{c.admin_port}/")
        await page.wait_for("!document.getElementById('certs').hidden")
        rows: Any = await page.js(
            "Array.from(document.querySelectorAll('#cert-rows tr'))"
            ".map(tr => Array.from(tr.cells).map(td => td.textContent))"
        )
        [[host, source, issuer, expires, state]] = rows
        assert (host, source, issuer, state) == ("secure.test", "file", "Charon Test CA", "")
        assert expires.endswith("(29 days)") or expires.endswith("(30 days)"), expires

    with_page(browser, test)
