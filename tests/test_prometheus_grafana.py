"""The Grafana dashboard (grafana/charon.json) against a real Prometheus scraping a real Charon:
every PromQL expression of every panel returns data. Also the example scrape config
(deploy/prometheus.yml) passes `promtool check config`. Loopback only; stopped by PID."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import HOST, REPO, Backend, Charon, free_port, kill_pid, stop_process, wait_until
from test_metrics import (
    APP,
    DOWN,
    closed_port,
    hosts_toml,
    http_get,
    open_ws,
    value,
    wait_metrics,
    wait_replaced,
)

DASHBOARD = REPO / "grafana" / "charon.json"
# What Grafana would put in place of its variables when the query runs.
GRAFANA_VARIABLES = {
    "__rate_interval": "30s",
    "__interval": "5s",
    "__range": "5m",
    "host": ".*",
    "instance": ".*",
}
# The metrics the dashboard must show, each in at least one panel.
MUST_SHOW = (
    "charon_http_requests_total", "charon_http_request_duration_seconds_bucket",
    "charon_upstream_errors_total", "charon_websocket_connections_active",
    "charon_websocket_messages_total", "charon_websocket_bytes_total",
    "charon_websocket_closes_total", "charon_worker_restarts_total",
    "charon_config_reloads_total", "charon_events_dropped_total",
    "charon_upstream_healthy", "charon_upstream_requests_total",
    "charon_upstream_response_seconds_bucket", "charon_upstream_tunnels_open",
    "charon_requests_denied_total",
)


def panel_targets(panels: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(panel title, target) for every target of every panel, rows' nested panels included."""
    for panel in panels:
        yield from panel_targets(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield panel.get("title", "?"), target


def substitute(expr: str) -> str:
    """Grafana's variables ($name, ${name}, [[name]]) replaced; anything else left as is
    (label_replace's "${1}" is not a variable)."""

    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return GRAFANA_VARIABLES.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]", replace, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(title, substitute(t["expr"])) for title, t in panel_targets(dashboard["panels"])]


def test_dashboard_structure() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["host"]["allValue"] == ".*"
    titles = set()
    exprs = []
    for title, target in panel_targets(dashboard["panels"]):
        titles.add(title)
        assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", title
        assert target["expr"].strip(), title
        exprs.append(target["expr"])
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    assert len(exprs) >= 15
    for metric in MUST_SHOW:
        assert any(metric in e for e in exprs), f"no panel shows {metric}"
    assert any("histogram_quantile" in e for e in exprs)
    for wanted in ("Request rate by host and status class", "Latency percentiles",
                   "Upstream errors", "Active WebSockets", "WebSocket messages/s",
                   "WebSocket bytes/s", "WebSocket close codes", "Workers and restarts",
                   "Config reloads", "Dropped events", "Target health",
                   "Requests/s by target", "Target p95 response time",
                   "WebSocket tunnels by target", "Denied requests"):
        assert wanted in titles, f"no panel {wanted!r}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_example_scrape_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; tests/setup.sh)")
    result = subprocess.run([promtool, "check", "config", str(REPO / "deploy" / "prometheus.yml")],
                            capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")


class Prometheus:
    """A real Prometheus on 127.0.0.1, own storage, scraping `target` every second."""

    def __init__(self, tmp: Path, binary: str, target: str) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: charon\n    scrape_interval: 1s\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log_path = tmp / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address={HOST}:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
            )

    def get(self, path: str, **params: str) -> Any:
        """The JSON answer, errors (400 for a bad query, 422 for one it cannot run) included."""
        url = f"http://{HOST}:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return {"status": "error", "code": exc.code, "params": params,
                    "body": exc.read().decode(errors="replace")}

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log_path.read_text()}")
        url = f"http://{HOST}:{self.port}/-/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
        return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def scraped(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.mark.timeout(90)
def test_every_dashboard_query_returns_data(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (Debian's prometheus package; "
                    "tests/setup.sh)")
    backend = Backend("metrics_backend.py")
    charon = Charon(tmp_path, hosts_toml(backend, closed_port()), workers=2)
    prometheus: Prometheus | None = None
    try:
        charon.start()
        prometheus = Prometheus(tmp_path, binary, f"{HOST}:{charon.admin_port}")
        wait_until(prometheus.ready, 20, interval=0.2, what="prometheus to be ready")
        p = prometheus
        wait_until(lambda: p.scraped("up") == 1, 15, interval=0.2, what="a first scrape")

        # Traffic: proxied requests, unknown hosts (404), a backend that refuses (502),
        # slower requests for the latency buckets, WebSockets (one held open), a killed worker.
        for _ in range(3):
            http_get(charon.port, APP, "/ok", 30)
            http_get(charon.port, APP, "/slow?ms=30", 2)
            http_get(charon.port, "nobody.example", "/", 3)
            assert http_get(charon.port, DOWN, "/")[0][0] == 502
            with open_ws(charon.port) as ws:
                ws.send("hello")
                ws.recv(timeout=5)
                ws.send(b"\1" * 1000)
                ws.recv(timeout=5)
            time.sleep(1.0)
        with open_ws(charon.port) as held:
            held.send("close:4003")
            with contextlib.suppress(Exception):
                held.recv(timeout=5)
        # Deltas not yet reported die with a SIGKILLed worker: let them reach the supervisor.
        wait_metrics(charon, lambda s: value(
            s, "charon_websocket_closes_total", host=APP, code="4xxx") == 1, "the 4xxx close")
        pids = charon.worker_pids()
        kill_pid(pids[0])
        wait_replaced(charon, pids[0], 2)
        with open_ws(charon.port) as held:
            held.send("still here")
            held.recv(timeout=5)
            http_get(charon.port, APP, "/ok", 10)
            assert http_get(charon.port, DOWN, "/")[0][0] == 502
            # Prometheus has seen the restart and the held tunnel, plus two more scrapes so
            # every rate() has two samples after the last change.
            wait_until(lambda: p.scraped("charon_worker_restarts_total") == 1
                       and p.scraped("sum(charon_websocket_connections_active)") == 1,
                       15, interval=0.2, what="prometheus to see the restart and the tunnel")
            time.sleep(2.5)

            queries = dashboard_queries()
            empty = []
            for title, expr in queries:
                if not p.query(expr):
                    empty.append(f"{title}: {expr}")
            assert not empty, "queries with no data:\n" + "\n".join(empty)

            # A few that must show more than a series: the traffic made above.
            assert (p.scraped(f'sum(charon_http_requests_total{{host="{APP}",code="200"}})')
                    or 0) >= 100
            errors = f'sum(charon_upstream_errors_total{{host="{DOWN}",kind="connect"}})'
            assert (p.scraped(errors) or 0) >= 3
            assert p.scraped('sum(charon_http_requests_total{host="_other",code="404"})') == 9
            assert p.scraped('sum(charon_websocket_closes_total{code="4xxx"})') == 1

        # The template variables' label_values() queries have values too.
        for label, match in (("instance", "charon_workers"),
                             ("host", "charon_http_requests_total")):
            body = p.get(f"/api/v1/label/{label}/values", **{"match[]": match})
            assert body["status"] == "success" and body["data"], (label, body)
    finally:
        if prometheus is not None:
            prometheus.stop()
        charon.stop()
        backend.stop()
