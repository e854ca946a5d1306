"""The standard `process_*` series for the supervisor and each worker, and charon_build_info.

Prometheus' client libraries export process_cpu_seconds_total, process_resident_memory_bytes,
process_virtual_memory_bytes, process_open_fds, process_max_fds and process_start_time_seconds
for the process that serves /metrics. Here that process is the supervisor, whose series keep
exactly that form (no labels), so any dashboard made for them works. The workers do the real
work, so each serving worker has the same series with a `worker` label (its slot, 0..N-1: as
bounded as the worker count); a replaced worker's counter starts again, as a restarted
process's does (rate() takes it as a reset). Workers of an old generation still draining after
a reload are left out (their slot numbers are the new workers' too).

Everything is read from /proc/PID (stat, fd/, limits) when the scrape is formatted: nothing is
sent by the workers and nothing runs between scrapes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

import charon

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


_BOOT = _boot_time()


@dataclass(frozen=True)
class ProcessStats:
    cpu_seconds: float
    resident_bytes: int
    virtual_bytes: int
    start_time: float  # Unix time
    open_fds: int
    max_fds: int | None  # the soft limit (None: unlimited or unknown)


def read_process(pid: int | str = "self") -> ProcessStats | None:
    """The process's figures from /proc, None if it is gone."""
    base = f"/proc/{pid}"
    try:
        with open(f"{base}/stat", "rb") as f:
            stat = f.read()
        open_fds = len(os.listdir(f"{base}/fd"))
    except OSError:
        return None
    # The command name (field 2) may hold spaces or parentheses: fields start after its ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    # (field n of proc(5) is fields[n - 3])
    utime, stime = int(fields[11]), int(fields[12])
    start = int(fields[19])
    return ProcessStats(
        cpu_seconds=(utime + stime) / _TICKS,
        resident_bytes=int(fields[21]) * _PAGE,
        virtual_bytes=int(fields[20]),
        start_time=_BOOT + start / _TICKS,
        open_fds=open_fds,
        max_fds=_max_fds(base),
    )


def _max_fds(base: str) -> int | None:
    try:
        with open(f"{base}/limits", "rb") as f:
            for line in f:
                if line.startswith(b"Max open files"):
                    soft = line.split()[3]
                    return None if soft == b"unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None


# name, help, counter?, the ProcessStats field
_SERIES = (
    ("process_cpu_seconds", "Total user and system CPU time spent in seconds.", True,
     "cpu_seconds"),
    ("process_resident_memory_bytes", "Resident memory size in bytes.", False, "resident_bytes"),
    ("process_virtual_memory_bytes", "Virtual memory size in bytes.", False, "virtual_bytes"),
    ("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
     False, "start_time"),
    ("process_open_fds", "Number of open file descriptors.", False, "open_fds"),
    ("process_max_fds", "Maximum number of open file descriptors.", False, "max_fds"),
)


class ProcessMetrics:
    """Made once by the supervisor; `collector()` is one of MetricsSection's `extra`."""

    def __init__(self, workers: Callable[[], dict[int, int]]) -> None:
        self.workers = workers  # worker slot -> pid, the serving workers

    def collector(self) -> ProcessCollector:
        return ProcessCollector(self.workers())


class ProcessCollector(Collector):
    def __init__(self, workers: dict[int, int]) -> None:
        self.workers = workers
        # CPU time and memory change all the time: a scrape a second later is formatted anew.
        self.key = (tuple(sorted(workers.items())), int(time.time()))

    def collect(self) -> Iterator[Metric]:
        readings: list[tuple[dict[str, str], ProcessStats]] = []
        own = read_process()
        if own is not None:
            readings.append(({}, own))
        for worker, pid in sorted(self.workers.items()):
            stats = read_process(pid)
            if stats is not None:
                readings.append(({"worker": str(worker)}, stats))
        for name, doc, counter, attribute in _SERIES:
            family: Metric
            if counter:
                family = CounterMetricFamily(name, doc)
                sample_name = name + "_total"
            else:
                family = GaugeMetricFamily(name, doc)
                sample_name = name
            for labels, stats in readings:
                figure = getattr(stats, attribute)
                if figure is not None:
                    # The supervisor's sample has no labels, the workers' a `worker` label.
                    family.samples.append(Sample(sample_name, labels, figure))
            yield family
        build = InfoMetricFamily("charon_build", "Charon's version.")
        build.add_metric([], {"version": charon.__version__})
        yield build
