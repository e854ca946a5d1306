"""Records a worker had to drop while the supervisor was stopped: the /logs stream says how many,
which worker, and when, in agreement with charon_events_dropped_total. Real processes on
127.0.0.1; the supervisor is SIGSTOPped under load and always SIGCONTed."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import HOST, REPO, Backend, Charon

pytestmark = pytest.mark.timeout(120)

STOPPED_FOR = 10.0  # long enough to fill both queues of batches (publisher.SEND_HWM + receiver's)


class Load:
    """Keep-alive GETs from two threads until stopped."""

    def __init__(self, port: int, host: str = HOST) -> None:
        self.port = port
        self.host = host
        self.done = 0
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            while not self.stopping.is_set():
                conn.request("GET", "/ok", headers={"Host": self.host})
                conn.getresponse().read()
                self.done += 1
        finally:
            conn.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(15)


def events_dropped(charon: Charon) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{charon.admin_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("charon_events_dropped_total "):
                return float(line.split()[1])
    raise AssertionError("no charon_events_dropped_total")


def test_records_dropped_by_a_worker_are_told_to_live_log_readers(
    tmp_path: Path, backend_factory: Callable[..., Backend]
) -> None:
    backend = backend_factory("sup_backend.py")
    charon = Charon(tmp_path, f'[[hosts]]\ndomains = ["{HOST}"]\nupstream = "{backend.url}"\n')
    charon.start()
    (worker_pid,) = charon.worker_pids()
    # `charon logs` too, reading the same stream (readable lines, into a file).
    cli_out = open(tmp_path / "cli.txt", "w+")  # noqa: SIM115 - closed in the finally below
    cli = subprocess.Popen(
        [sys.executable, "-m", "charon", "logs", "--admin", f"{HOST}:{charon.admin_port}",
         "--backlog", "0", "--path", "/nothing-like-this"],
        stdout=cli_out, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )
    loop_records: list[dict[str, Any]] = []

    async def go() -> tuple[float, float]:
        async with aiohttp.ClientSession() as s, s.ws_connect(
            # A filter that no notice matches by itself: notices pass every filter.
            f"http://{HOST}:{charon.admin_port}/logs",
            params={"backlog": "0", "kind": "request", "path": "/nothing-like-this"},
        ) as ws:
            async def read() -> None:
                async for message in ws:
                    loop_records.append(json.loads(message.data))

            reader = asyncio.create_task(read())
            with Load(charon.port) as load:
                await asyncio.sleep(1.0)
                assert load.done > 0, "the load did not run"
                stopped_at = time.time()
                os.kill(charon.pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(STOPPED_FOR)
                finally:
                    os.kill(charon.pid, signal.SIGCONT)
                resumed_at = time.time()
                await asyncio.sleep(1.0)

            # Until the workers' counts have reached the supervisor and every rise was told.
            deadline = time.monotonic() + 20
            while True:
                total = await asyncio.to_thread(events_dropped, charon)
                told = sum(r["count"] for r in loop_records if r.get("by") == "worker")
                if total > 0 and told == total:
                    break
                assert time.monotonic() < deadline, (
                    f"{told} records told dropped, the metric says {total}: {loop_records}")
                await asyncio.sleep(0.5)
            reader.cancel()
            return stopped_at, resumed_at

    try:
        stopped_at, _resumed_at = asyncio.run(go())
        time.sleep(1.0)  # the CLI prints what it got
    finally:
        cli.terminate()
        try:
            cli.wait(10)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli.wait(5)
        charon.stop()
        cli_out.close()
    cli_text = (tmp_path / "cli.txt").read_text()
    notices = [r for r in loop_records if r.get("by") == "worker"]
    assert notices and all(r["kind"] == "dropped" for r in notices), loop_records
    assert not [r for r in loop_records if r["kind"] != "dropped"], "the filter let records by"
    for notice in notices:
        assert notice["worker"] == 0 and notice["pid"] == worker_pid, notice
        # Lost once the supervisor had stopped reading, never before.
        assert stopped_at <= notice["since"] <= notice["time"], notice
    counts = sorted(str(n["count"]) for n in notices)
    shown = [line for line in cli_text.splitlines()
             if f"records dropped by worker 0 (pid {worker_pid}) over " in line]
    assert sorted(line.split()[1] for line in shown) == counts, cli_text
