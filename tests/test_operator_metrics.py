"""The standard process_* series (issue 15): the supervisor's without labels, each serving
worker's with a `worker` label, read from /proc by the supervisor; charon_build_info{version}.
A real Charon with two workers on 127.0.0.1; the figures are checked against /proc as the test
reads it, and a killed worker's series start again with its replacement."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from harness import Backend, Charon, wait_until
from test_metrics import Samples, promtool_check, scrape, scrape_text, value

import charon as charon_package

pytestmark = pytest.mark.timeout(60)

SERIES = (
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_start_time_seconds", "process_open_fds", "process_max_fds",
)


@pytest.fixture(scope="module")
def charon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Charon]:
    backend = Backend("http_backend.py", "--name", "m")
    c = Charon(tmp_path_factory.mktemp("operator-metrics"),
               f'[[hosts]]\ndomains = ["m.test"]\nupstream = "{backend.url}"\n', workers=2)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        backend.stop()


def worker_pids(c: Charon) -> dict[str, int]:
    health = c.health()
    assert health is not None
    return {w: info["pid"] for w, info in health["reloads"]["workers"].items()}


def proc_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def soft_fd_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError(f"no fd limit for {pid}")


def check_process(samples: Samples, pid: int, started_after: float, **labels: str) -> None:
    """One process's series against what /proc says of `pid` now."""
    got = {name: value(samples, name, **labels) for name in SERIES}
    assert all(v is not None for v in got.values()), (labels, got)
    assert 0 < got["process_cpu_seconds_total"] < 600, got  # type: ignore[operator]
    rss = proc_rss(pid)
    assert rss / 2 < got["process_resident_memory_bytes"] < rss * 2, (rss, got)  # type: ignore[operator]
    assert got["process_virtual_memory_bytes"] >= got["process_resident_memory_bytes"]  # type: ignore[operator]
    assert started_after - 2 < got["process_start_time_seconds"] <= time.time() + 1, got  # type: ignore[operator]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    assert 3 <= got["process_open_fds"] <= fds + 20, (fds, got)  # type: ignore[operator]
    assert got["process_max_fds"] == soft_fd_limit(pid), got


def test_process_series_for_supervisor_and_workers(charon: Charon) -> None:
    pids = worker_pids(charon)
    assert set(pids) == {"0", "1"}
    samples = scrape(charon)
    supervisor_start = value(samples, "process_start_time_seconds")
    assert supervisor_start is not None
    check_process(samples, charon.pid, time.time() - 60)
    for worker, pid in pids.items():
        # A worker starts after its supervisor.
        check_process(samples, pid, supervisor_start, worker=worker)
    workers = {dict(labels).get("worker") for (name, labels) in samples
               if name == "process_open_fds"}
    assert workers == {None, "0", "1"}  # the supervisor's series has no label
    assert value(samples, "charon_build_info", version=charon_package.__version__) == 1
    promtool_check(scrape_text(charon))


def test_a_replaced_worker_starts_its_series_again(charon: Charon) -> None:
    before = scrape(charon)
    old = worker_pids(charon)["1"]
    old_start = value(before, "process_start_time_seconds", worker="1")
    assert old_start is not None
    os.kill(old, signal.SIGKILL)

    def replaced() -> bool:
        pid = worker_pids(charon).get("1")
        return pid is not None and pid != old
    wait_until(replaced, 20, what="worker 1 to be replaced")
    new = worker_pids(charon)["1"]

    def new_series() -> bool:
        s = scrape(charon)
        start = value(s, "process_start_time_seconds", worker="1")
        return start is not None and start > old_start
    wait_until(new_series, 10, what="worker 1's series to be its replacement's")
    charon.wait_ready()  # (its figures settle once it serves)
    after = scrape(charon)
    check_process(after, new, old_start, worker="1")

