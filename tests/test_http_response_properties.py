"""The response side of the HTTP path (exchange.py and response.py `final_head`) end to end:
hypothesis chooses the backend's exact response (status, fields, framing by Content-Length,
chunked with extensions and trailers, or the close; a wrong or invalid length, both framings,
junk after the message) and tests/backends/replay_backend.py sends it through a real Charon.
A valid response reaches the client with the same status and body, re-framed by the proxy and
nothing after it (protocol notes, decision 4); an invalid one gets 502, or, once the head went
out, a body cut short and the close; Charon stays up either way."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import HOST, Backend, Charon, running_charon
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
VALID = ("length", "chunked", "close", "long")
HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"upgrade", b"proxy-connection"}


@pytest.fixture(scope="module")
def charon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Charon]:
    backend = Backend("replay_backend.py")
    try:
        hosts = f"""
            [[hosts]]
            domains = ["{HOST}"]
            upstream = "{backend.url}"
            """
        with running_charon(tmp_path_factory.mktemp("replay"), hosts) as c:
            yield c
    finally:
        backend.stop()


@dataclass
class Answer:
    raw: bytes
    status: int
    body: bytes  # what the client must get when the answer is valid
    framing: str


@st.composite
def answers(draw: st.DrawFn, head_request: bool) -> Answer:
    status = draw(st.sampled_from([200, 201, 204, 206, 304, 404, 500, 503]))
    body = draw(st.binary(max_size=600))
    framing = draw(st.sampled_from([*VALID, "short", "bad-length", "both"]))
    fields = [b"X-F%d: %s" % (i, v) for i, v in enumerate(draw(st.lists(
        st.sampled_from([b"v", b"", b"a, b", b"\x80\xff"]), max_size=3)))]
    fields += draw(st.lists(st.sampled_from([b"Connection: close", b"Keep-Alive: timeout=5",
                                             b"Connection: X-F0", b"Trailer: X-T"]),
                            max_size=2))
    payload = body
    if framing in ("length", "long", "short"):
        declared = {"length": len(body), "long": max(0, len(body) - 7),
                    "short": len(body) + 5}[framing]
        fields.append(b"Content-Length: %d" % declared)
        expected = body[:declared]
    elif framing == "chunked":
        fields.append(b"Transfer-Encoding: chunked")
        payload, at = b"", 0
        while at < len(body):
            n = draw(st.integers(1, max(1, len(body) - at)))
            ext = draw(st.sampled_from([b"", b";a=b", b";x"]))
            payload += b"%x%s\r\n%s\r\n" % (n, ext, body[at:at + n])
            at += n
        payload += b"0\r\n" + draw(st.sampled_from([b"", b"X-T: 1\r\n"])) + b"\r\n"
        expected = body
    elif framing == "bad-length":
        fields.append(b"Content-Length: 1x")
        expected = body
    elif framing == "both":
        fields += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
        expected = body
    else:
        expected = body
    junk = draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"]))
    if framing == "close":
        expected += junk  # no framing: everything up to the close is the body
    if status in (204, 304) or head_request:
        expected = b""
    order = draw(st.permutations(fields))
    raw = b"HTTP/1.1 %d X\r\n%s\r\n%s%s" % (
        status, b"".join(f + b"\r\n" for f in order), payload, junk)
    return Answer(raw, status, expected, framing)


def exchange(port: int, target: bytes, method: bytes, http10: bool) -> bytes:
    version = b"HTTP/1.0" if http10 else b"HTTP/1.1"
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(method + b" " + target + b" " + version + b"\r\nHost: " + HOST.encode()
                  + b"\r\nConnection: close\r\n\r\n")
        out = bytearray()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def unframe(data: bytes, no_body: bool) -> tuple[int, dict[bytes, list[bytes]], bytes, bytes]:
    """(status, fields, body, bytes after the body) of what the client got; a chunked body
    is decoded strictly (a malformed one raises)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data[:300]
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    fields: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        assert colon and name == name.strip(), line
        fields.setdefault(name.lower(), []).append(value.strip())
    if no_body:
        return status, fields, b"", rest
    if b"transfer-encoding" in fields:
        assert fields[b"transfer-encoding"][-1].split(b",")[-1].strip() == b"chunked"
        body = b""
        while True:
            size_line, crlf, rest = rest.partition(b"\r\n")
            assert crlf, "chunked body cut"
            n = int(size_line.split(b";")[0], 16)
            if n == 0:
                trailer_end = rest.index(b"\r\n") if rest.startswith(b"\r\n") else rest.index(
                    b"\r\n\r\n") + 2
                return status, fields, body, rest[trailer_end + 2:]
            body += rest[:n]
            assert rest[n:n + 2] == b"\r\n"
            rest = rest[n + 2:]
    if b"content-length" in fields:
        n = int(fields[b"content-length"][0])
        return status, fields, rest[:n], rest[n:]
    return status, fields, rest, b""


@SETTINGS
@given(st.data())
def test_backend_answers_are_relayed_or_refused(charon: Charon, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from([b"GET", b"GET", b"HEAD"]))
    http10 = data.draw(st.booleans())
    answer = data.draw(answers(head_request=method == b"HEAD"))
    got = exchange(charon.port, b"/replay/" + answer.raw.hex().encode(), method, http10)
    no_body = method == b"HEAD" or answer.status in (204, 304)
    if answer.framing in VALID:
        event(f"valid {answer.framing}")
        status, fields, body, after = unframe(got, no_body)
        assert status == answer.status, got[:300]
        assert body == answer.body
        assert after == b"", after[:200]  # nothing past the response (decision 4)
        assert not HOP.intersection(fields) - {b"connection"}
        if b"Connection: X-F0" in answer.raw:
            assert b"x-f0" not in fields  # named by the backend's Connection: hop-by-hop
        assert fields.get(b"connection", [b"close"]) == [b"close"]
        assert len(fields.get(b"content-length", [])) <= 1
        assert not (b"content-length" in fields and b"transfer-encoding" in fields)
    else:
        event(f"invalid {answer.framing}")
        if not got:
            return  # the client connection closed with nothing sent
        status = int(got.split(b" ", 2)[1])
        if status == 502:
            return
        # The head went out before the body turned out wrong: a body cut short, then the close.
        assert answer.framing == "short" and status == answer.status, got[:300]
    assert charon.proc is not None and charon.proc.poll() is None
