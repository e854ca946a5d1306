"""Errors that name their cause (issue 15): a 502/504 says which backend, in which phase and
the system's error, in the worker's log lines, the access log, the live log and the `reason`
label of charon_upstream_errors_total; a request the proxy refuses (400, 414, 431) is logged
with what was read of its request line, and the proxy's own answers with the bytes it sent.

Real processes on 127.0.0.1: Charon, a misbehaving raw backend, a closed port, a name under
`.invalid` (RFC 6761: never resolves), and a blackhole: a listening socket that is never
accepted from, so a connect succeeds and no answer ever comes.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from harness import HOST, Backend, Charon, free_port, raw_request, wait_until
from httpwire import get
from test_metrics import scrape, value, wait_metrics

pytestmark = pytest.mark.timeout(120)

WS_HANDSHAKE = (
    "GET /ws-{tag} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


@dataclass
class Env:
    charon: Charon
    access: Path
    refused: str  # host:port of a closed port
    blackhole: str  # host:port of a socket never accepted from
    raw: str  # host:port of the raw backend


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("operator-errors")
    raw = Backend("raw_backend.py")
    ws = Backend("ws_backend.py")
    blackhole = socket.socket()
    blackhole.bind((HOST, 0))
    blackhole.listen(64)  # never accepted: the kernel completes connects into the backlog
    refused = f"{HOST}:{free_port()}"
    hole = f"{HOST}:{blackhole.getsockname()[1]}"
    access = tmp / "access.log"
    hosts = f"""
        [[hosts]]
        domains = ["refused.test"]
        upstream = "http://{refused}"

        [[hosts]]
        domains = ["dns.test"]
        upstream = "http://nowhere.invalid:80"

        [[hosts]]
        domains = ["blackhole.test"]
        upstream = "http://{hole}"
        timeouts = {{ first_byte = "1s" }}

        [[hosts]]
        domains = ["raw.test"]
        upstream = "{raw.url}"

        [[hosts]]
        domains = ["pair.test"]
        upstreams = ["http://{refused}", "{ws.url}"]
        max_fails = 0
        """
    charon = Charon(tmp, hosts, workers=1, server_toml=f'access_log = "{access}"')
    try:
        charon.start()
        yield Env(charon, access, refused, hole, f"{HOST}:{raw.port}")
    finally:
        charon.stop()
        raw.stop()
        ws.stop()
        blackhole.close()


def access_line(env: Env, needle: str) -> str:
    """The access log line holding `needle` (once the worker has flushed it)."""
    found: list[str] = []

    def flushed() -> bool:
        if env.access.exists():
            found[:] = [line for line in env.access.read_text().splitlines() if needle in line]
        return bool(found)

    wait_until(flushed, 5, what=f"{needle!r} in the access log")
    return found[-1]


def log_line(env: Env, needle: str) -> str:
    found: list[str] = []

    def logged() -> bool:
        found[:] = [line for line in env.charon.log().splitlines() if needle in line]
        return bool(found)

    wait_until(logged, 5, what=f"{needle!r} in the supervisor's log")
    return found[-1]


def live_record(env: Env, path: str) -> dict[str, Any]:
    """The upstream_error record of `path`, from the live log's backlog."""

    async def go() -> dict[str, Any]:
        url = f"http://{HOST}:{env.charon.admin_port}/logs"
        params = {"kind": "upstream_error", "backlog": "500", "path": path}
        deadline = time.monotonic() + 5
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.ws_connect(url, params=params) as ws:
                    try:
                        message = await ws.receive(timeout=0.5)
                    except TimeoutError:
                        message = None
                if message is not None and message.type == aiohttp.WSMsgType.TEXT:
                    return json.loads(message.data)  # type: ignore[no-any-return]
                assert time.monotonic() < deadline, f"no upstream_error record for {path}"

    return asyncio.run(go())


def check_failure(
    env: Env, path: str, status: int, address: str, phase: str, reason: str, error: str
) -> None:
    """The failure of `path` is told alike in all three logs."""
    line = access_line(env, f'"GET {path}"')
    assert f'"GET {path}" {status} ' in line, line
    assert line.endswith(
        f' upstream={address} phase={phase} reason={reason} message="{error}"'), line
    text = log_line(env, f"{path} answered {status}")
    assert "WARNING" in text
    phrase = {"connect": "connecting", "first_byte": "waiting for the response"}[phase]
    assert text.endswith(f": upstream {address} failed {phrase}: {error}"), text
    record = live_record(env, path)
    assert (record["status"], record["upstream"], record["phase"], record["reason"],
            record["message"]) == (status, address, phase, reason, error), record


def test_connection_refused(env: Env) -> None:
    resp = get(env.charon.port, "refused.test", "/refused")
    assert resp.status == 502
    check_failure(env, "/refused", 502, env.refused, "connect", "refused", "connection refused")


def test_no_such_host(env: Env) -> None:
    resp = get(env.charon.port, "dns.test", "/dns")
    assert resp.status == 502
    check_failure(env, "/dns", 502, "nowhere.invalid:80", "connect", "dns", "no such host")


def test_first_byte_timeout_of_a_blackhole(env: Env) -> None:
    resp = get(env.charon.port, "blackhole.test", "/blackhole")
    assert resp.status == 504
    check_failure(env, "/blackhole", 504, env.blackhole, "first_byte", "timeout",
                  "timeout after 1s")


def test_reset_before_the_answer(env: Env) -> None:
    resp = get(env.charon.port, "raw.test", "/reset")
    assert resp.status == 502
    check_failure(env, "/reset", 502, env.raw, "first_byte", "reset",
                  "connection reset by peer")


def test_invalid_response(env: Env) -> None:
    resp = get(env.charon.port, "raw.test", "/garbage")
    assert resp.status == 502
    record = live_record(env, "/garbage")
    assert (record["reason"], record["phase"], record["upstream"]) == (
        "bad_response", "first_byte", env.raw)
    assert record["message"].startswith("invalid response")


def test_websocket_handshake_dialled_by_the_front_door(env: Env) -> None:
    """A handshake that is a connection's first read is dialled by the engine (dialled.py):
    its first-byte timeout is told the same way."""
    answer = raw_request(
        env.charon.port, WS_HANDSHAKE.format(tag="hole", host="blackhole.test").encode(),
        timeout=10)
    assert answer.startswith(b"HTTP/1.1 504 "), answer
    line = access_line(env, '"GET /ws-hole"')
    assert line.endswith(f' upstream={env.blackhole} phase=first_byte reason=timeout '
                         f'message="timeout after 1s"'), line
    record = live_record(env, "/ws-hole")
    assert (record["reason"], record["phase"], record["message"]) == (
        "timeout", "first_byte", "timeout after 1s")
    # Refused: handed back to the HTTP path, which connects again and tells why.
    answer = raw_request(
        env.charon.port, WS_HANDSHAKE.format(tag="refused", host="refused.test").encode())
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    assert access_line(env, '"GET /ws-refused"').endswith(
        f' upstream={env.refused} phase=connect reason=refused message="connection refused"')


def test_dialled_handshake_retried_on_another_target(env: Env) -> None:
    """Two targets taken in turn, one refusing: a handshake dialled to it goes on to the
    other (101), and the refused attempt is logged with the engine's error."""
    for n in range(2):
        answer = raw_request(
            env.charon.port, WS_HANDSHAKE.format(tag=f"pair{n}", host="pair.test").replace(
                "/ws-", "/echo?ws-").encode(), timeout=5, read_until_close=False)
        assert answer.startswith(b"HTTP/1.1 101 "), answer
    line = log_line(env, "tried on another target")
    assert re.search(r"GET pair\.test/echo\?ws-pair[01] tried on another target: upstream "
                     + re.escape(env.refused) + " failed connecting: connection refused$",
                     line), line


def test_reasons_are_metric_labels(env: Env) -> None:
    for host, path in (("refused.test", "/m"), ("dns.test", "/m"), ("raw.test", "/reset")):
        get(env.charon.port, host, path)
    expected = {
        ("refused.test", "connect", "refused"), ("dns.test", "connect", "dns"),
        ("blackhole.test", "timeout", "timeout"), ("raw.test", "closed", "reset"),
        ("raw.test", "bad_response", "bad_response"),
    }

    def counted(samples: dict[Any, float]) -> bool:
        return all(
            (value(samples, "charon_upstream_errors_total", host=h, kind=k, reason=r) or 0) >= 1
            for h, k, r in expected
        )

    samples = wait_metrics(env.charon, counted, "every failure counted by reason")
    reasons = {dict(labels)["reason"] for (name, labels) in samples
               if name == "charon_upstream_errors_total"}
    assert reasons <= {"refused", "reset", "timeout", "dns", "tls", "bad_response", "closed",
                       "unreachable", "other"}, reasons
    # A host with no failure shows its usual reasons at 0 (rate() sees the first one).
    assert value(scrape(env.charon), "charon_upstream_errors_total", host="raw.test",
                 kind="connect", reason="refused") == 0


def test_json_access_log_names_the_cause(tmp_path: Path) -> None:
    refused = f"{HOST}:{free_port()}"
    access = tmp_path / "access.log"
    charon = Charon(tmp_path, f'[[hosts]]\ndomains = ["refused.test"]\nupstream = "http://{refused}"\n',
                    server_toml=f'access_log = "{access}"')
    with open(charon.log_path, "ab") as log:
        charon.proc = subprocess.Popen(
            [sys.executable, "-m", "charon", "run", "--config", str(charon.config_path),
             "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT)
    try:
        charon.wait_ready()
        assert get(charon.port, "refused.test", "/json").status == 502
        wait_until(lambda: access.exists() and b"/json" in access.read_bytes(), 5)
        entry = json.loads(access.read_text().splitlines()[-1])
        assert (entry["status"], entry["upstream"], entry["phase"], entry["reason"],
                entry["message"]) == (502, refused, "connect", "refused", "connection refused")
        warning = next(json.loads(line) for line in charon.log().splitlines()
                       if "/json answered 502" in line)
        assert warning["level"] == "WARNING" and warning["message"].endswith(
            f"upstream {refused} failed connecting: connection refused")
    finally:
        charon.stop()


# -- requests the proxy refuses ------------------------------------------------------------------


def refused_line(env: Env, data: bytes, status: int, needle: str) -> str:
    answer = raw_request(env.charon.port, data)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    body = answer.partition(b"\r\n\r\n")[2]
    line = access_line(env, needle)
    assert re.search(rf" {status} {len(body)} [0-9.]+ms$", line), (line, len(body))
    return line


def test_malformed_request_logged_with_its_request_line(env: Env) -> None:
    line = refused_line(
        env, b"GET /bad-header?x=1 HTTP/1.1\r\nHost: raw.test\r\nNo colon here\r\n\r\n",
        400, "/bad-header")
    assert ' "GET /bad-header?x=1" 400 ' in line, line
    # Refused before llhttp had a target: the raw bytes of the line, escaped.
    line = refused_line(env, b"\x16\x03\x01\x02\x00garbage-line\r\n\r\n", 400, "garbage-line")
    assert ' "- \\x16\\x03\\x01\\x02\\x00garbage-line" 400 ' in line, line


def test_long_target_and_big_head_logged(env: Env) -> None:
    target = "/long-" + "a" * 9000  # over max_request_target (8192)
    line = refused_line(
        env, f"GET {target} HTTP/1.1\r\nHost: raw.test\r\n\r\n".encode(), 414, "/long-aaa")
    logged = re.search(r'"GET (/long-a+)"', line)
    assert logged is not None and 100 < len(logged.group(1)) <= 512, line  # what was read, cut
    fields = "".join(f"X-F{i}: {i}\r\n" for i in range(150))  # over max_header_count (100)
    line = refused_line(
        env, f"GET /many-fields HTTP/1.1\r\nHost: raw.test\r\n{fields}\r\n".encode(), 431,
        "/many-fields")
    assert ' "GET /many-fields" 431 ' in line, line
