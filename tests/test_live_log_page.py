"""The live log page (GET / on the admin listener) in headless Chromium, driven through the
DevTools protocol: entries appear as requests go through the proxy, per-host counters, the host
filter, pause, and escaping. Real Charon, backend and browser processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import HOST, Backend, Charon, free_port, raw_request
from test_dropped_notices import STOPPED_FOR, Load

CHROMIUM = "/usr/bin/chromium"
TOKEN = "page-t0ken"

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason=f"{CHROMIUM} is not installed (tests/setup.sh installs Debian's chromium)",
    ),
]


# -- the browser -------------------------------------------------------------------------------


class Browser:
    """Headless Chromium in its own process group, and one page driven over DevTools."""

    def __init__(self, profile: Path) -> None:
        self.port = free_port()
        self.log = open(profile.parent / "chromium.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
             f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.page_ws_url = self._page_target()

    def _page_target(self) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/json/list", timeout=2) as r:
                    targets = json.loads(r.read())
            except OSError:
                time.sleep(0.1)
                continue
            for target in targets:
                if target.get("type") == "page" and "webSocketDebuggerUrl" in target:
                    return str(target["webSocketDebuggerUrl"])
            time.sleep(0.1)
        raise AssertionError("chromium's DevTools endpoint did not come up within 20s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # what is left of the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.log.close()


class Page:
    """The DevTools session of the browser's page."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await self.ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.TEXT, message
            data = json.loads(message.data)
            if data.get("id") == ident:  # events (no id) are ignored
                assert "error" not in data, data
                return data["result"]  # type: ignore[no-any-return]

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def text(self) -> str:
        return str(await self.js("document.body.innerText"))

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && "
                            "document.getElementById('conn') !== null")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.js(expression):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}; the page shows:\n"
                             + await self.text())

    async def wait_text(self, *needles: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = await self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{needles} not all on the page within {timeout}s:\n{text}")
            await asyncio.sleep(0.1)

    async def live(self) -> None:
        await self.wait_for("document.getElementById('conn').textContent === 'live'")

    async def hosts(self) -> dict[str, list[str]]:
        rows = await self.js(
            "Array.from(document.querySelectorAll('#host-rows tr'))"
            ".map(tr => Array.from(tr.cells).map(td => td.textContent))"
        )
        return {row[0]: row[1:] for row in rows}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    profile = tmp_path_factory.mktemp("chromium") / "profile"
    b = Browser(profile)
    try:
        yield b
    finally:
        b.stop()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend("logs_backend.py")
    yield b
    b.stop()


def start_charon(tmp: Path, backend: Backend, extra_toml: str = "") -> Charon:
    return Charon(tmp, f"""
        [[hosts]]
        domains = ["alpha.test"]
        upstream = "{backend.url}"

        [[hosts]]
        domains = ["beta.test"]
        upstream = "{backend.url}"
        """, workers=1, extra_toml=extra_toml).start()


@pytest.fixture
def charon(tmp_path: Path, backend: Backend) -> Iterator[Charon]:
    """A Charon of its own for each test: the page counts everything since its start."""
    c = start_charon(tmp_path, backend)
    try:
        yield c
    finally:
        c.stop()


def with_page(browser: Browser, test: Any) -> None:
    async def go() -> None:
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(browser.page_ws_url, max_msg_size=0) as ws:
            await test(Page(ws), s)

    asyncio.run(go())


async def get(s: aiohttp.ClientSession, c: Charon, host: str, path: str) -> int:
    async with s.get(f"http://{HOST}:{c.port}{path}", headers={"Host": host}) as r:
        await r.read()
        return r.status


def tag() -> str:
    return uuid.uuid4().hex[:8]


# -- tests -------------------------------------------------------------------------------------


def test_entries_and_counters_appear_live(browser: Browser, charon: Charon) -> None:
    t = tag()

    async def test(page: Page, s: aiohttp.ClientSession) -> None:
        await page.open(f"http://{HOST}:{charon.admin_port}/")
        await page.live()
        assert "Waiting for entries" in await page.text()
        await get(s, charon, "alpha.test", f"/page-{t}/one")
        await get(s, charon, "beta.test", f"/page-{t}/two")
        await get(s, charon, "alpha.test", "/status/404")
        await page.wait_text(f"GET /page-{t}/one", f"GET /page-{t}/two", "GET /status/404")
        await get(s, charon, "alpha.test", "/status/503")
        await page.wait_text("GET /status/503")
        # host: requests, 4xx, 5xx, WebSockets open
        await page.wait_for("document.querySelectorAll('#host-rows tr').length === 2")
        assert await page.hosts() == {"alpha.test": ["3", "1", "1", "0"],
                                      "beta.test": ["1", "0", "0", "0"]}
        # Newest on top.
        first = await page.js("document.querySelector('#rows tr td.detail').textContent")
        assert first == "GET /status/503"

        ws = await s.ws_connect(f"http://{HOST}:{charon.port}/ws?{t}",
                                headers={"Host": "beta.test"}, protocols=("logs.v1",))
        await page.wait_text(f"/ws?{t} (logs.v1)")
        await page.wait_for("document.querySelectorAll('#host-rows tr')[1].cells[4]"
                            ".textContent === '1'")
        await ws.send_str("close 4000")
        await ws.receive(timeout=5)
        await ws.close()
        await page.wait_text(f"/ws?{t} closed")
        await page.wait_for("document.querySelectorAll('#host-rows tr')[1].cells[4]"
                            ".textContent === '0'")
        rows = await page.js("Array.from(document.querySelectorAll('#rows tr.k-ws_close td'))"
                             ".map(td => td.textContent)")
        assert "4000" in rows  # the close code, in the status column

    with_page(browser, test)


def test_host_filter_hides_other_hosts(browser: Browser, charon: Charon) -> None:
    t = tag()

    async def test(page: Page, s: aiohttp.ClientSession) -> None:
        await page.open(f"http://{HOST}:{charon.admin_port}/")
        await page.live()
        await get(s, charon, "alpha.test", f"/before-{t}/alpha")
        await get(s, charon, "beta.test", f"/before-{t}/beta")
        await page.wait_text(f"/before-{t}/alpha", f"/before-{t}/beta")

        # Type a host filter: the page reconnects with ?host= and shows that host only.
        await page.js("""(() => {
            const input = document.getElementById('f-host');
            input.value = 'alpha.test';
            input.dispatchEvent(new Event('change'));
        })()""")
        await page.wait_for("location.search === '?host=alpha.test'")
        await page.live()
        await get(s, charon, "beta.test", f"/after-{t}/beta")
        await get(s, charon, "alpha.test", f"/after-{t}/alpha")
        text = await page.wait_text(f"/after-{t}/alpha", f"/before-{t}/alpha")  # + backlog
        assert f"/after-{t}/beta" not in text
        assert f"/before-{t}/beta" not in text
        log_text = await page.js("document.getElementById('rows').innerText")
        assert "beta.test" not in log_text
        assert set(await page.hosts()) == {"alpha.test"}

        # Clearing the filter shows every host again (from the backlog).
        await page.js("""(() => {
            const input = document.getElementById('f-host');
            input.value = '';
            input.dispatchEvent(new Event('input'));
        })()""")
        await page.wait_text(f"/after-{t}/beta")

    with_page(browser, test)


def test_pause_keeps_counting(browser: Browser, charon: Charon) -> None:
    t = tag()

    async def test(page: Page, s: aiohttp.ClientSession) -> None:
        await page.open(f"http://{HOST}:{charon.admin_port}/")
        await page.live()
        await page.js("document.getElementById('pause').click()")
        await get(s, charon, "alpha.test", f"/paused-{t}")
        await page.wait_text("Resume (1 new)")
        assert f"/paused-{t}" not in await page.text()
        assert (await page.hosts())["alpha.test"][0] == "1"  # counted all the same
        await page.js("document.getElementById('pause').click()")
        await page.wait_text(f"/paused-{t}")

    with_page(browser, test)


def test_request_data_is_shown_as_text(browser: Browser, charon: Charon) -> None:
    async def test(page: Page, s: aiohttp.ClientSession) -> None:
        await page.open(f"http://{HOST}:{charon.admin_port}/")
        await page.live()
        target = "/<b>bold</b><img/src=x/onerror=window.pwned=1>"  # no spaces: a valid target
        raw_request(charon.port, f"GET {target} HTTP/1.1\r\nHost: alpha.test\r\n"
                                 "Connection: close\r\n\r\n".encode())
        await page.wait_text(f"GET {target}")
        assert await page.js("document.querySelector('#rows b') === null")
        assert await page.js("document.querySelector('#rows img') === null")
        assert await page.js("window.pwned === undefined")

    with_page(browser, test)


def test_records_lost_by_a_worker_are_shown(browser: Browser, charon: Charon) -> None:
    """The supervisor SIGSTOPped under load: the worker drops records, and the page says so."""

    async def test(page: Page, s: aiohttp.ClientSession) -> None:
        await page.open(f"http://{HOST}:{charon.admin_port}/")
        await page.live()
        with Load(charon.port, "alpha.test"):
            await asyncio.sleep(0.5)
            os.kill(charon.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(STOPPED_FOR)
            finally:
                os.kill(charon.pid, signal.SIGCONT)
            await asyncio.sleep(0.5)
        text = await page.wait_text("entries dropped by worker 0 (pid ", "lost by workers",
                                    timeout=30)
        assert "the supervisor did not take them in time" in text

    with_page(browser, test)


def test_page_with_a_token(browser: Browser, backend: Backend, tmp_path: Path) -> None:
    c = start_charon(tmp_path, backend, extra_toml=f'token = "{TOKEN}"\n')
    t = tag()
    try:
        async def test(page: Page, s: aiohttp.ClientSession) -> None:
            await page.open(f"http://{HOST}:{c.admin_port}/")
            await page.wait_text("needs a token")
            await page.js(f"""(() => {{
                document.getElementById('token').value = '{TOKEN}';
                document.getElementById('token-form').requestSubmit();
            }})()""")
            await page.live()  # the page passed the token on to /logs (test_operator_admin)
            await get(s, c, "alpha.test", f"/with-token-{t}")
            await page.wait_text(f"/with-token-{t}")

        with_page(browser, test)
    finally:
        c.stop()
