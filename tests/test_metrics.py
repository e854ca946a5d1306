"""GET /metrics on the admin listener, with real processes on 127.0.0.1: exact counts for
proxied and unknown-host requests, WebSocket metrics, counters that survive a SIGKILLed worker,
the Prometheus text format as promtool sees it, and the event bus under a stopped supervisor
(decision 13). Every process is stopped by PID."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import HOST, Backend, Charon, free_port, kill_pid, wait_until
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

APP = "app.test"  # a configured proxy host, in front of the metrics backend
DOWN = "down.test"  # a configured proxy host whose upstream port is closed: 502, connect error
BODY_SIZE = len(b"metrics-ok\n")  # what the backend's /ok answers
FLUSH_WAIT = 6.0  # upper bound on waiting for a worker's once-a-second METRICS to show

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- helpers (also used by test_prometheus_grafana) ---------------------------------------------


def hosts_toml(backend: Backend, closed_port: int) -> str:
    return (
        f'[[hosts]]\ndomains = ["{APP}", "www.{APP}"]\nupstream = "{backend.url}"\n'
        f'[[hosts]]\ndomains = ["{DOWN}"]\nupstream = "http://{HOST}:{closed_port}"\n'
    )


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    return free_port()


def scrape_text(charon: Charon) -> str:
    url = f"http://{HOST}:{charon.admin_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return str(response.read().decode("utf-8"))
    except OSError as exc:
        if charon.proc is not None and charon.proc.poll() is not None:
            raise AssertionError(f"charon exited with {charon.proc.returncode} during the "
                                 f"test:\n{charon.log()[-3000:]}") from exc
        raise


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def scrape(charon: Charon) -> Samples:
    return parse(scrape_text(charon))


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_metrics(
    charon: Charon, check: Callable[[Samples], bool], what: str, timeout: float = FLUSH_WAIT
) -> Samples:
    """Scrape until `check` holds; the samples that satisfied it."""
    found: list[Samples] = []

    def ok() -> bool:
        samples = scrape(charon)
        if check(samples):
            found.append(samples)
            return True
        return False

    wait_until(ok, timeout, interval=0.2, what=what)
    return found[0]


def http_get(port: int, host: str, path: str, count: int = 1) -> list[tuple[int, bytes]]:
    """`count` keep-alive GETs on one connection with that Host header."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    out = []
    try:
        for _ in range(count):
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            out.append((response.status, response.read()))
    finally:
        conn.close()
    return out


@contextlib.contextmanager
def open_ws(
    port: int, host: str = APP, close_errors_ok: bool = False
) -> Iterator[ClientConnection]:
    """A WebSocket to /ws through the proxy with that Host header (websockets' sync client)."""
    sock = socket.create_connection((HOST, port), timeout=5)
    with ws_connect(f"ws://{host}/ws", sock=sock, ping_interval=None, compression=None,
                    open_timeout=5, close_timeout=5) as ws:
        yield ws
        if close_errors_ok:
            with contextlib.suppress(Exception):
                ws.close()


def worker_holding(charon: Charon, client_port: int) -> int:
    """The worker pid that holds the proxy's end of the client connection from client_port."""
    inode = None
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.split(":")[1], 16) == charon.port
                    and int(remote.split(":")[1], 16) == client_port and fields[3] == "01"):
                inode = fields[9]
    assert inode is not None, f"no proxy-side socket for client port {client_port}"
    for pid in charon.worker_pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    raise AssertionError(f"no worker holds socket inode {inode}")


def wait_replaced(charon: Charon, gone: int, workers: int) -> None:
    def replaced() -> bool:
        h = charon.health() or {}
        pids = h.get("worker_pids", [])
        return h.get("workers_ready", 0) >= workers and gone not in pids and len(pids) == workers

    wait_until(replaced, 15, what="the killed worker to be replaced")
    charon.worker_pids()


def counter_samples(text: str) -> Samples:
    """Every sample of every counter and histogram family (they must never go down)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        if family.type in ("counter", "histogram"):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; tests/setup.sh)")
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                            capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")


@contextlib.contextmanager
def charon_with_backend(tmp_path: Path, workers: int = 2) -> Iterator[Charon]:
    backend = Backend("metrics_backend.py")
    charon = Charon(tmp_path, hosts_toml(backend, closed_port()), workers=workers)
    try:
        charon.start()
        yield charon
    finally:
        charon.stop()
        backend.stop()


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_metrics_counts_websockets_worker_kill_and_promtool(tmp_path: Path) -> None:
    n, m = 40, 7
    with charon_with_backend(tmp_path) as charon:
        first = scrape_text(charon)
        s = parse(first)
        # Present from the start: reload results with 0, the worker count, the gauges.
        assert value(s, "charon_config_reloads_total", result="success") == 0
        assert value(s, "charon_config_reloads_total", result="error") == 0
        assert value(s, "charon_config_last_reload_successful") == 1
        assert value(s, "charon_workers") == 2
        assert value(s, "charon_worker_restarts_total") == 0
        assert value(s, "charon_websocket_connections_active", host=APP) == 0

        # Requests spread over several connections, so both workers get some.
        for _ in range(4):
            for status, body in http_get(charon.port, APP, "/ok", n // 4):
                assert (status, body) == (200, b"metrics-ok\n")
        for status, _ in http_get(charon.port, "unknown.example", "/ok", m):
            assert status == 404
        assert http_get(charon.port, DOWN, "/ok")[0][0] == 502

        def http_counted(s: Samples) -> bool:
            return (value(s, "charon_http_requests_total", host=APP, method="GET", code="200") == n
                    and value(s, "charon_http_requests_total", host="_other", method="GET",
                              code="404") == m
                    and value(s, "charon_http_requests_total", host=DOWN, method="GET",
                              code="502") == 1)

        time.sleep(1.5)  # the workers flush their metrics once a second
        s = wait_metrics(charon, http_counted, "the requests to be counted")
        time.sleep(1.2)  # one more flush: nothing is counted twice
        s = scrape(charon)
        assert http_counted(s), s
        assert value(s, "charon_http_request_duration_seconds_count", host=APP) == n
        assert value(s, "charon_http_request_duration_seconds_bucket", host=APP, le="+Inf") == n
        assert value(s, "charon_http_request_duration_seconds_count", host="_other") == m
        buckets = [v for (name, labels), v in s.items()
                   if name == "charon_http_request_duration_seconds_bucket"
                   and ("host", APP) in labels]
        assert buckets == sorted(buckets), "buckets must be cumulative"
        assert 0 < value(s, "charon_http_request_duration_seconds_sum", host=APP) < n * 1.0  # type: ignore[operator]
        assert value(s, "charon_http_response_bytes_total", host=APP) == n * BODY_SIZE
        assert value(s, "charon_upstream_errors_total", host=DOWN, kind="connect",
                     reason="refused") == 1
        assert value(s, "charon_upstream_errors_total", host=APP, kind="connect",
                     reason="refused") == 0
        # host only ever holds configured hosts (first domain) or _other
        hosts = {dict(labels).get("host") for (_, labels) in s} - {None}
        assert hosts <= {APP, DOWN, "_other"}, hosts

        # WebSockets: one closed normally by the client, one closed by the backend with 4001.
        with open_ws(charon.port) as ws:
            ws.send("hello")
            assert ws.recv(timeout=5) == "hello"
            ws.send(b"\0" * 100)
            assert ws.recv(timeout=5) == b"\0" * 100
            wait_metrics(charon, lambda s: value(
                s, "charon_websocket_connections_active", host=APP) == 1, "active WebSocket = 1")
            assert value(scrape(charon), "charon_websocket_tunnels_open") == 1
            ws.close(code=1000)
        with open_ws(charon.port) as ws2:
            ws2.send("close:4001")
            with contextlib.suppress(Exception):
                ws2.recv(timeout=5)

        def ws_counted(s: Samples) -> bool:
            return (value(s, "charon_websocket_connections_total", host=APP) == 2
                    and value(s, "charon_websocket_closes_total", host=APP, code="4xxx") == 1
                    and value(s, "charon_websocket_connections_active", host=APP) == 0)

        s = wait_metrics(charon, ws_counted, "the WebSockets to be counted")
        assert value(s, "charon_websocket_closes_total", host=APP, code="1000") == 1
        assert value(s, "charon_websocket_messages_total", host=APP, direction="in") == 3
        assert value(s, "charon_websocket_messages_total", host=APP, direction="out") == 2
        # message bytes (control frames are not counted): in 5 + 100 + 10, out 5 + 100
        assert value(s, "charon_websocket_bytes_total", host=APP, direction="in") == 115
        assert value(s, "charon_websocket_bytes_total", host=APP, direction="out") == 105
        assert value(s, "charon_websocket_duration_seconds_count", host=APP) == 2
        assert value(s, "charon_http_requests_total", host=APP, method="GET", code="101") == 2
        assert value(s, "charon_websocket_tunnels_open") == 0

        # SIGKILL the worker holding an open tunnel: its gauges go with its exit event (not 5 s
        # later), the counters never go backwards, the restart is counted.
        with open_ws(charon.port, close_errors_ok=True) as ws3:  # its worker gets killed
            ws3.send("x")
            assert ws3.recv(timeout=5) == "x"
            wait_metrics(charon, lambda s: value(
                s, "charon_websocket_connections_active", host=APP) == 1, "active WebSocket = 1")
            victim = worker_holding(charon, ws3.socket.getsockname()[1])
            before_text = scrape_text(charon)
            before = counter_samples(before_text)
            kill_pid(victim)
            s = wait_metrics(charon, lambda s: value(s, "charon_worker_restarts_total") == 1,
                             "the worker's exit to be counted", timeout=4)
            assert value(s, "charon_websocket_connections_active", host=APP) == 0
            assert value(s, "charon_websocket_tunnels_open") == 0
        wait_replaced(charon, victim, 2)
        for status, _ in http_get(charon.port, APP, "/ok", 5):
            assert status == 200
        s = wait_metrics(charon, lambda s: value(
            s, "charon_http_requests_total", host=APP, method="GET", code="200") == n + 5,
            "the requests after the restart to be counted")
        after_text = scrape_text(charon)
        after = counter_samples(after_text)
        # (process_* describe one process each: a replaced worker's series starts again, with
        # its own process_start_time_seconds, as any restarted process's does.)
        went_back = {k: (v, after.get(k)) for k, v in before.items()
                     if (after.get(k) is None or after[k] < v) and not k[0].startswith("process_")}
        assert not went_back, went_back
        assert value(parse(after_text), "charon_worker_restarts_total") == 1
        assert value(parse(after_text), "charon_workers") == 2

        promtool_check(after_text)


@pytest.mark.timeout(60)
def test_reload_results_and_new_hosts(tmp_path: Path) -> None:
    """A reload's results are counted, a host added by the reload gets its own label, and
    what the old generation served is still counted once it has retired."""
    with charon_with_backend(tmp_path, workers=1) as charon:
        old_pid = charon.worker_pids()[0]
        for status, _ in http_get(charon.port, APP, "/ok", 5):
            assert status == 200
        config = charon.config_path.read_text()
        backend_url = re.search(r'upstream = "(http://[^"]+)"', config).group(1)  # type: ignore[union-attr]
        charon.config_path.write_text(
            config + f'[[hosts]]\ndomains = ["new.test"]\nupstream = "{backend_url}"\n')
        # A new generation (a config-only SIGHUP applies in place, in the same worker).
        os.kill(charon.pid, signal.SIGUSR2)
        s = wait_metrics(charon, lambda s: value(
            s, "charon_config_reloads_total", result="success") == 1, "a successful reload")
        assert value(s, "charon_config_last_reload_successful") == 1
        assert value(s, "charon_websocket_connections_active", host="new.test") == 0
        assert http_get(charon.port, "new.test", "/ok")[0][0] == 200
        wait_until(lambda: not any(p == old_pid for p in charon.worker_pids()), 15,
                   what="the old generation to retire")
        s = wait_metrics(charon, lambda s: value(
            s, "charon_http_requests_total", host="new.test", method="GET", code="200") == 1,
            "the new host's request")
        assert value(s, "charon_http_requests_total", host=APP, method="GET", code="200") == 5

        charon.config_path.write_text("[server]\nworkers = 0\n")
        os.kill(charon.pid, signal.SIGHUP)
        s = wait_metrics(charon, lambda s: value(
            s, "charon_config_reloads_total", result="error") == 1, "a failed reload")
        assert value(s, "charon_config_last_reload_successful") == 0
        assert value(s, "charon_config_reloads_total", result="success") == 1
        assert value(s, "charon_worker_restarts_total") == 0  # a retired worker is no restart
        assert value(s, "charon_workers") == 1


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class Load:
    """Threads doing keep-alive GETs through the proxy; the time of every answer is kept."""

    def __init__(self, port: int, threads: int = 8) -> None:
        self.port = port
        self.stop = threading.Event()
        self.answered: list[list[float]] = [[] for _ in range(threads)]  # per connection
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(times,), daemon=True)
                        for times in self.answered]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    @property
    def done(self) -> list[float]:
        return [t for times in self.answered for t in list(times)]

    def _run(self, answered: list[float]) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/ok", headers={"Host": APP})
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    answered.append(time.monotonic())
                else:
                    self.errors.append(f"status {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        conn.close()

    def rate(self, start: float, end: float) -> float:
        return sum(1 for t in self.done if start <= t < end) / (end - start)

    def longest_wait(self, start: float, end: float) -> float:
        """The longest any one connection went without an answer between start and end."""
        longest = 0.0
        for times in self.answered:
            inside = [t for t in list(times) if start <= t <= end]
            marks = [start, *inside, end]
            longest = max(longest, *(b - a for a, b in zip(marks, marks[1:], strict=False)))
        return longest


@pytest.mark.timeout(90)
def test_stopped_supervisor_does_not_stall_workers(tmp_path: Path) -> None:
    """Decision 13: workers never wait on the event bus. With the supervisor SIGSTOPped for
    10 s under load, requests keep being answered, the queues fill and events are dropped and
    counted (not queued without bound), the workers' and supervisor's memory stays bounded, and
    after SIGCONT the counts add up."""
    with charon_with_backend(tmp_path) as charon:
        workers = charon.worker_pids()
        assert len(workers) == 2
        with Load(charon.port) as load:
            time.sleep(1.0)  # warm up
            t0 = time.monotonic()
            time.sleep(2.0)
            t1 = time.monotonic()
            rate_before = load.rate(t0, t1)
            # A worker's very first METRICS can be dropped at start (see the report): count
            # only what is dropped from here on.
            dropped_before = value(scrape(charon), "charon_events_dropped_total") or 0
            rss_before = {pid: _rss_kib(pid) for pid in [*workers, charon.pid]}
            rss_max = dict(rss_before)
            os.kill(charon.pid, signal.SIGSTOP)
            try:
                stopped_at = time.monotonic()
                while time.monotonic() - stopped_at < 10.0:
                    time.sleep(0.25)
                    for pid in workers:
                        rss_max[pid] = max(rss_max[pid], _rss_kib(pid))
                t2 = time.monotonic()
            finally:
                os.kill(charon.pid, signal.SIGCONT)
            rate_during = load.rate(stopped_at + 0.5, t2)
            longest_wait = load.longest_wait(stopped_at, t2)
            time.sleep(1.0)  # the supervisor catches up; its memory then holds what was queued
            rss_max[charon.pid] = max(rss_max[charon.pid], _rss_kib(charon.pid))
        made = len(load.done)
        assert not load.errors, load.errors[:5]
        assert rate_before > 50, f"the load is too slow to tell anything: {rate_before:.0f}/s"
        assert rate_during >= rate_before / 2, (
            f"{rate_during:.0f} req/s with the supervisor stopped, {rate_before:.0f} before")
        # Every connection, whichever worker it is on, keeps getting answers.
        assert longest_wait < 2.0, f"a connection waited {longest_wait:.1f}s for an answer"
        grown = {pid: (rss_max[pid] - rss_before[pid]) / 1024 for pid in rss_before}
        assert max(grown.values()) < 30, f"RSS grew by MiB (pid: growth): {grown}"

        def settled(s: Samples) -> bool:
            # Request counts travel in METRICS deltas, which a worker keeps until they are
            # queued: every request ends up counted. Live-log records are what gets dropped.
            counted = value(s, "charon_http_requests_total", host=APP, method="GET", code="200")
            dropped = (value(s, "charon_events_dropped_total") or 0) - dropped_before
            return counted == made and dropped > 0

        s = wait_metrics(charon, settled, "every request counted, and dropped events counted",
                         timeout=15)
        counted = value(s, "charon_http_requests_total", host=APP, method="GET", code="200")
        assert set(charon.worker_pids()) == set(workers), "no worker was replaced"
        print(f"before {rate_before:.0f}/s, stopped {rate_during:.0f}/s, longest wait "
              f"{longest_wait:.2f}s, made {made}, "
              f"counted {counted:.0f}, dropped {value(s, 'charon_events_dropped_total'):.0f} "
              f"(before the stop {dropped_before:.0f}), "
              f"RSS growth MiB {grown}")


def test_metrics_text_is_valid_for_promtool_from_the_start(tmp_path: Path) -> None:
    with charon_with_backend(tmp_path, workers=1) as charon:
        text = scrape_text(charon)
        assert re.search(r"^charon_workers 1\.0$", text, re.M), text
        promtool_check(text)


def test_section_totals_gauges_and_labels_without_processes() -> None:
    """MetricsSection fed events directly: per-pid events_dropped, gauges dropped on exit and
    when stale, late reports of an exited process, bounded labels, malformed events."""
    from charon.admin.metrics import MetricsSection
    from charon.events.schema import CONFIG_RELOAD, METRICS, REQUEST, WORKER_EXIT

    now = [100.0]
    section = MetricsSection([APP], lambda: 2, clock=lambda: now[0])

    def report(pid: int, dropped: int, deltas: dict | None = None, **gauges: object) -> None:  # type: ignore[type-arg]
        g = {"ws_active": [], "in_flight": 0, "connections": 0, "tunnels": 0,
             "events_dropped": dropped, **gauges}
        section.on_event(0, pid, [METRICS, deltas or {}, g])

    def get(name: str, **labels: str) -> float | None:
        return value(parse(section.render().decode()), name, **labels)

    report(11, 3, {"requests": [[APP, "GET", 200, 5], ["evil.example", "GET", 200, 2],
                                ["_other", "BREW", 404, 1]],
                   "ws_closes": [[APP, 1000, 1], [APP, 4001, 1], [APP, 4999, 1], [APP, 65535, 1]],
                   "http_durations": [[APP, [1, 2] + [0] * 11 + [1], 70.5]]},
           connections=4, ws_active=[[APP, 2]])
    report(12, 0, connections=1)
    report(11, 5, connections=4, ws_active=[[APP, 2]])  # events_dropped is cumulative: +2
    section.on_event(0, 11, [REQUEST, 1.0, APP, "GET", 200, 0.1, 2, "127.0.0.1", "/"])
    assert get("charon_events_dropped_total") == 5
    assert get("charon_http_requests_total", host=APP, method="GET", code="200") == 5
    assert get("charon_http_requests_total", host="_other", method="GET", code="200") == 2
    assert get("charon_http_requests_total", host="_other", method="OTHER", code="404") == 1
    assert get("charon_websocket_closes_total", host=APP, code="1000") == 1
    assert get("charon_websocket_closes_total", host=APP, code="4xxx") == 2
    assert get("charon_websocket_closes_total", host=APP, code="other") == 1
    assert get("charon_http_request_duration_seconds_bucket", host=APP, le="0.005") == 1
    assert get("charon_http_request_duration_seconds_bucket", host=APP, le="0.01") == 3
    assert get("charon_http_request_duration_seconds_bucket", host=APP, le="60.0") == 3
    assert get("charon_http_request_duration_seconds_count", host=APP) == 4
    assert get("charon_connections_open") == 5
    assert get("charon_websocket_connections_active", host=APP) == 2

    # pid 11 exits: its gauges go at once, its events_dropped total stays; its last report,
    # read after the exit, adds its deltas but not its gauges.
    section.on_event(-1, 1, [WORKER_EXIT, 0.0, 0, 11, "signal SIGKILL", 0.0])
    assert get("charon_connections_open") == 1
    assert get("charon_websocket_connections_active", host=APP) == 0
    report(11, 6, {"requests": [[APP, "GET", 200, 1]]}, connections=9)
    assert get("charon_connections_open") == 1
    assert get("charon_http_requests_total", host=APP, method="GET", code="200") == 6
    assert get("charon_events_dropped_total") == 6
    report(13, 2)  # the replacement starts its own count
    assert get("charon_events_dropped_total") == 8
    assert get("charon_worker_restarts_total") == 1

    # A process that stops reporting loses its gauges after 5 s.
    now[0] += 4.0
    report(13, 2, connections=7)
    assert get("charon_connections_open") == 8
    now[0] += 2.0
    assert get("charon_connections_open") == 7  # pid 12: silent for 6 s

    # Reloads: both results from the start, last result as a gauge.
    assert get("charon_config_reloads_total", result="error") == 0
    section.on_event(-1, 1, [CONFIG_RELOAD, 0.0, "error", "/x.toml", "bad"])
    assert get("charon_config_last_reload_successful") == 0
    section.on_event(-1, 1, [CONFIG_RELOAD, 0.0, "success", "/x.toml", None])
    assert get("charon_config_last_reload_successful") == 1
    assert get("charon_config_reloads_total", result="error") == 1
    assert get("charon_config_reloads_total", result="success") == 1

    # A malformed event is counted and ignored; the sink never raises.
    section.on_event(0, 14, [METRICS, {"requests": [[APP, "GET"]]}, {}])
    section.on_event(0, 14, [METRICS, {"http_durations": [[APP, [1, 2], 0.1]]}, {}])
    assert section.bad_events == 2
    assert get("charon_workers") == 2
    promtool_check(section.render().decode())
