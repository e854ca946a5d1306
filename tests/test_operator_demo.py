"""`charon demo --listen --admin` (issue 15): ports in use are named with free ones to use
instead, before anything starts or a URL is printed; on free ports the demo serves, and its page
shows the forwarded headers without scrolling (headless Chromium, phone and laptop sizes).
Real processes on 127.0.0.1, free ports only (never 8080/9090/8081: tests/test_cli.py's demo
tests use those)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from harness import HOST, REPO, child_pids, free_port, kill_pid, wait_until
from test_live_log_page import CHROMIUM, Browser, Page

pytestmark = pytest.mark.timeout(90)


def demo(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "charon", "demo", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def listeners(count: int) -> Iterator[list[int]]:
    """Ports held by plain listeners (another program)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            s.bind((HOST, 0))
            s.listen()
        yield [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_busy_ports_are_named_with_free_ones_to_use_instead() -> None:
    with listeners(2) as (proxy, admin):
        result = demo("--listen", f"{HOST}:{proxy}", "--admin", str(admin),
                      "--backend-port", "0")
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr, result.stderr
        assert result.stdout == "", "URLs printed although the ports are taken"
        err = result.stderr
        assert f"{HOST}:{proxy} (the proxy) is already in use" in err, err
        assert f"{HOST}:{admin} (the admin listener) is already in use" in err, err
        m = re.search(rf"charon demo --listen {HOST}:(\d+) --admin {HOST}:(\d+)$", err, re.M)
        assert m, err
        new_proxy, new_admin = int(m[1]), int(m[2])
        assert new_proxy != new_admin
        assert new_proxy not in (proxy, admin) and new_admin not in (proxy, admin)
    assert bindable(new_proxy) and bindable(new_admin), "a suggested port is not free"


def test_only_the_busy_port_is_named() -> None:
    with listeners(1) as (admin,):
        result = demo("--listen", str(free_port()), "--admin", f"{HOST}:{admin}",
                      "--backend-port", "0")
    assert result.returncode == 1, result
    assert "(the proxy)" not in result.stderr, result.stderr
    assert re.search(rf"Free ports now: charon demo --admin {HOST}:\d+$", result.stderr, re.M), (
        result.stderr)


def test_the_same_port_twice_and_an_address_not_here() -> None:
    port = str(free_port())
    same = demo("--listen", port, "--admin", port)
    assert same.returncode == 1 and "need two ports" in same.stderr, same
    absent = demo("--listen", "192.0.2.1:8080", "--admin", str(free_port()))
    assert absent.returncode == 1, absent
    assert "this machine has no address 192.0.2.1" in absent.stderr, absent


# -- a demo on free ports ----------------------------------------------------------------------


@pytest.fixture
def running_demo(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    proxy, admin = free_port(), free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "charon", "demo", "--listen", f"{HOST}:{proxy}",
             "--admin", f"{HOST}:{admin}", "--backend-port", "0"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    seen: set[int] = set()

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"charon demo exited with {proc.returncode}:\n{log.read_text()}")
        seen.update(child_pids(proc.pid))
        try:
            with urllib.request.urlopen(f"http://{HOST}:{admin}/healthz", timeout=2) as r:
                return bool(json.loads(r.read())["workers_ready"] == 2)
        except OSError:
            return False

    try:
        wait_until(ready, 30, what="charon demo to serve")
        yield proxy, admin, log
    finally:
        seen.update(child_pids(proc.pid))
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for pid in seen:
            kill_pid(pid)


def test_demo_on_given_ports_prints_them_and_forwards(running_demo) -> None:  # type: ignore[no-untyped-def]
    proxy, admin, log = running_demo
    printed = log.read_text()
    assert f"open http://{HOST}:{proxy}/" in printed, printed
    assert f"http://{HOST}:{admin}/metrics" in printed, printed
    with urllib.request.urlopen(f"http://{HOST}:{proxy}/api/info", timeout=5) as r:
        headers = json.loads(r.read())["headers"]
    assert headers["X-Forwarded-For"] == HOST
    assert headers["Via"] == "1.1 charon"
    # Any Host: the demo may be reached by the machine's name or address.
    request = urllib.request.Request(f"http://{HOST}:{proxy}/", headers={"Host": "demo.test"})
    with urllib.request.urlopen(request, timeout=5) as r:
        page = r.read().decode()
    # The forwarded headers come before the chat in the page.
    assert page.index('id="forwarded"') < page.index("<h2 class=\"grow\">Chat</h2>")


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                    reason=f"{CHROMIUM} is not installed (tests/setup.sh installs it)")
def test_forwarded_headers_are_visible_without_scrolling(running_demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proxy, _, _ = running_demo
    browser = Browser(tmp_path / "profile")

    async def check(page: Page, width: int, height: int) -> dict[str, object]:
        await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=1, mobile=width < 600)
        await page.call("Page.navigate", url=f"http://{HOST}:{proxy}/")
        await page.wait_for("document.getElementById('fwd-via') !== null && "
                            "document.getElementById('fwd-via').textContent === '1.1 charon'")
        return await page.js(  # type: ignore[no-any-return]
            "({bottom: document.getElementById('forwarded').getBoundingClientRect().bottom,"
            " height: window.innerHeight, scrolled: window.scrollY,"
            " xff: document.getElementById('fwd-for').textContent,"
            " proto: document.getElementById('fwd-proto').textContent,"
            " host: document.getElementById('fwd-host').textContent})")

    async def go() -> list[dict[str, object]]:
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(browser.page_ws_url, max_msg_size=0) as ws:
            page = Page(ws)
            return [await check(page, 1280, 720), await check(page, 390, 844)]

    try:
        results = asyncio.run(go())
    finally:
        browser.stop()
    for size, seen in zip(("1280x720", "390x844"), results, strict=True):
        assert seen["scrolled"] == 0, (size, seen)
        assert float(seen["bottom"]) <= float(seen["height"]), (  # type: ignore[arg-type]
            f"at {size} the forwarded headers end below the fold: {seen}")
        assert (seen["xff"], seen["proto"], seen["host"]) == (HOST, "http", f"{HOST}:{proxy}")
