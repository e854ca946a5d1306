"""The admin page's targets table and upstream_health entries, in headless Chromium driven over
DevTools (tests/test_live_log_page.py's Browser and Page): a target held down by its check shows
down with its reason, and comes back up, without reloading the page. Real Charon, backends and
browser on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import HOST, Backend, Charon
from test_live_log_page import CHROMIUM, Browser, Page, with_page

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is not installed (tests/setup.sh installs Debian's chromium)",
    ),
]


def set_mode(backend: Backend, mode: str) -> None:
    with urllib.request.urlopen(f"http://{HOST}:{backend.port}/_mode/{mode}", timeout=5):
        pass


async def target_rows(page: Page) -> dict[str, list[str]]:
    rows = await page.js(
        "Array.from(document.querySelectorAll('#target-rows tr'))"
        ".map(tr => Array.from(tr.cells).map(td => td.textContent))"
    )
    return {row[1]: row for row in rows}


def test_targets_table_and_health_entries(tmp_path: Path) -> None:
    a, b = Backend("health_backend.py"), Backend("health_backend.py")
    browser = Browser(tmp_path / "profile")
    charon = Charon(tmp_path, f"""
        [[hosts]]
        domains = ["chat.test"]
        upstreams = ["{a.url}", {{ url = "{b.url}", backup = true }}]
        health_check = {{ path = "/healthz", interval = "250ms", timeout = "200ms",
                         healthy_threshold = 1, unhealthy_threshold = 1 }}
        """, workers=1)
    try:
        charon.start()

        async def test(page: Page, s: aiohttp.ClientSession) -> None:
            await page.open(f"http://{HOST}:{charon.admin_port}/")
            await page.live()
            await page.wait_for("!document.getElementById('targets').hidden")
            rows = await target_rows(page)
            assert rows[a.url][:3] == ["chat.test", a.url, "up"]
            assert rows[f"{b.url} (backup)"][2] == "up"

            set_mode(a, "status:503")
            await page.wait_text("down: " + a.url)  # the live log's entry
            await page.wait_for(
                "Array.from(document.querySelectorAll('#target-rows td.down')).length === 1")
            rows = await target_rows(page)
            assert rows[a.url][2] == "down" and "status 503" in rows[a.url][4]
            kinds: Any = await page.js(
                "Array.from(document.querySelectorAll('#rows tr.k-upstream_health td.k'))"
                ".map(td => td.textContent)")
            assert kinds == ["health"]

            set_mode(a, "ok")
            await page.wait_text("up: " + a.url)
            await page.wait_for(
                "Array.from(document.querySelectorAll('#target-rows td.down')).length === 0")

        with_page(browser, test)
    finally:
        charon.stop()
        browser.stop()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
        a.stop()
        b.stop()
