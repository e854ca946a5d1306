"""Properties of head planning (request.py `plan_request`) and response framing (response.py
`final_head`) on heads from hypothesis: structured heads built from the fields that matter
(framing, Host, Connection, Upgrade, forwarding) and byte-level mutations of valid ones, parsed
by llhttp (httptools) as the worker parses them. Whatever llhttp lets through, planning raises
nothing but HttpError with a 4xx/5xx status, and what it writes is one valid head whose framing,
Host and forwarding fields are the proxy's own (protocol notes, decisions 3-6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from charon.config.loader import load_config_text
from charon.worker.http.errors import HttpError
from charon.worker.http.headers import ForwardedPolicy
from charon.worker.http.request import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, plan_request
from charon.worker.http.response import (
    OUT_CHUNKED,
    OUT_NONE,
    OUT_RAW,
    OUT_UNTIL_CLOSE,
    final_head,
    has_no_body,
)
from charon.worker.routing import Router

SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PEER = "192.0.2.7"
CONFIG = """
[[hosts]]
domains = ["a.test", "*.wild.test"]
upstream = "http://127.0.0.1:9"
"""
ROUTER = Router(load_config_text(CONFIG, "props.toml").hosts, lambda upstream: None)  # type: ignore[arg-type,return-value]
POLICY = ForwardedPolicy(())
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
              b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization"}

NAMES = [b"Host", b"host", b"HOST", b"Content-Length", b"Transfer-Encoding", b"Connection",
         b"Upgrade", b"Keep-Alive", b"TE", b"Trailer", b"Proxy-Connection",
         b"Proxy-Authorization", b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Host",
         b"Forwarded", b"Via", b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"X-Custom",
         b"Accept", b"Expect"]
VALUES = [b"a.test", b"A.TEST:8080", b"x.wild.test", b"b.test", b"a.test, a.test", b"[::1]:80",
          b"", b" ", b"0", b"5", b"05", b"5, 5", b"-1", b"99999999999999999999", b"chunked",
          b"gzip, chunked", b"chunked, chunked", b"identity", b"close", b"keep-alive",
          b"Upgrade", b"upgrade, X-Custom", b"X-Forwarded-For, Content-Length, Host",
          b"websocket", b"WebSocket, h2c", b"dGhlIHNhbXBsZSBub25jZQ==", b"13", b"8",
          b"1.2.3.4", b"for=1.2.3.4", b"1.1 other", b"100-continue", b"\xff\xfe"]
TARGETS = [b"/", b"/a?b=c", b"//x/../y", b"*", b"http://a.test/p", b"HTTPS://A.TEST:1/",
           b"http://u@a.test/", b"http://b.test", b"a.test:80", b"/%00"]
PRINTABLE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10).map(
    str.encode)
SENSIBLE = {b"Content-Length": [b"0", b"5", b"5, 5", b"12"],
            b"Transfer-Encoding": [b"chunked", b"gzip, chunked", b"chunked, gzip"],
            b"Host": [b"a.test", b"x.wild.test:80"],
            b"Connection": [b"Upgrade", b"keep-alive, Upgrade", b"close, X-Custom, Upgrade"],
            b"Upgrade": [b"websocket", b"WebSocket"],
            b"Sec-WebSocket-Key": [b"dGhlIHNhbXBsZSBub25jZQ=="],
            b"Sec-WebSocket-Version": [b"13"]}
METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"CONNECT", b"PATCH", b"GET"]


@dataclass
class Parsed:
    method: bytes = b""
    target: bytes = b""
    version: str = ""
    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    complete: bool = False
    parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None
    parts: list[bytes] = field(default_factory=list)

    def on_url(self, part: bytes) -> None:
        self.parts.append(part)

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True
        assert self.parser is not None
        self.version = self.parser.get_http_version()
        if isinstance(self.parser, httptools.HttpRequestParser):
            self.method = self.parser.get_method()
            self.target = b"".join(self.parts)
        else:
            self.status = self.parser.get_status_code()


def parse(raw: bytes, response: bool = False) -> Parsed | None:
    """The head as llhttp gives it to the worker, or None if llhttp refuses it."""
    p = Parsed()
    p.parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(p)
    try:
        p.parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    return p if p.complete else None


def fields_of(head: bytes) -> list[tuple[bytes, bytes]]:
    return [(n.lower(), v) for n, v in (parse(head) or Parsed()).headers]


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(METHODS))
    target = draw(st.sampled_from(TARGETS) | PRINTABLE.map(lambda b: b"/" + b))
    lines = [method + b" " + target + b" " + draw(st.sampled_from(
        [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/2.0"])) + b"\r\n"]
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES)
                                     | PRINTABLE | st.binary(max_size=4)), max_size=8))
    handshake = draw(st.integers(0, 3)) == 0  # every handshake field, valid, among the rest
    if handshake:
        lines[0] = b"GET" + lines[0][len(method):]
    for name, choices in SENSIBLE.items():  # fields with values that pass, often
        framing = name in (b"Content-Length", b"Transfer-Encoding")
        if (handshake and not framing) or draw(st.integers(0, 2)) == 0:
            fields.insert(draw(st.integers(0, len(fields))), (name, draw(st.sampled_from(choices))))
    if draw(st.integers(0, 3)):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b"a.test"))
    lines += [n + b": " + v + b"\r\n" for n, v in fields]
    head = b"".join(lines) + b"\r\n"
    if draw(st.integers(0, 3)) == 0:  # byte-level mutation of a head that mostly parses
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(head)))
            head = head[:at] + draw(st.binary(max_size=3)) + head[at + draw(st.integers(0, 3)):]
    return head


@SETTINGS
@given(request_heads())
def test_plan_request_raises_only_http_errors_and_writes_a_clean_head(raw: bytes) -> None:
    parsed = parse(raw)
    if parsed is None:
        event("llhttp refuses it")
        return  # llhttp's 400: plan_request never sees it
    try:
        plan = plan_request(parsed.method, parsed.target, parsed.version, parsed.headers, PEER,
                            None, ROUTER, POLICY)
    except HttpError as error:
        event(f"HttpError {error.status}")
        assert 400 <= error.status <= 505
        return
    event(f"planned, body {plan.body}, websocket {plan.websocket_key is not None}")
    out = parse(plan.head)
    assert out is not None and plan.head.endswith(b"\r\n\r\n"), plan.head
    assert out.method == parsed.method and out.target == parsed.target
    got = fields_of(plan.head)
    names = [n for n, _ in got]
    assert names.count(b"host") == 1
    assert [v for n, v in got if n == b"x-forwarded-for"] == [PEER.encode()]
    assert names.count(b"x-forwarded-proto") == names.count(b"x-forwarded-host") == 1
    assert not HOP_BY_HOP.intersection(names) - {b"connection", b"upgrade", b"transfer-encoding"}
    lengths = [v for n, v in got if n == b"content-length"]
    codings = [v for n, v in got if n == b"transfer-encoding"]
    if plan.body == BODY_LENGTH:
        assert codings == []
        assert len(lengths) == 1 and int(lengths[0]) == plan.length >= 0
    elif plan.body == BODY_CHUNKED:
        assert (lengths, codings) == ([], [b"chunked"])
    else:
        assert plan.body == BODY_NONE and lengths == [] and codings == []
    connection = [v for n, v in got if n == b"connection"]
    if plan.websocket_key is not None:
        assert connection == [b"Upgrade"] and [v for n, v in got if n == b"upgrade"] == [
            b"websocket"]
    else:
        assert connection == [] and b"upgrade" not in names
    # Fields the client's Connection named are dropped, except those the proxy protects.
    named = {t.strip().lower() for n, v in parsed.headers if n.lower() == b"connection"
             for t in v.split(b",")}
    protected = {b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto",
                 b"x-forwarded-host", b"via", b"forwarded", b"sec-websocket-key",
                 b"sec-websocket-version", b"connection", b"upgrade", b"transfer-encoding"}
    assert not (named - protected).intersection(names)


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    status = draw(st.sampled_from([100, 103, 200, 204, 206, 301, 304, 404, 500, 599]))
    lines = [b"HTTP/1.%d %d Reason\r\n" % (draw(st.integers(0, 1)), status)]
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES + [b"Content-Type", b"Set-Cookie"]),
                                     st.sampled_from(VALUES) | PRINTABLE),
                           max_size=8))
    lines += [n + b": " + v + b"\r\n" for n, v in fields]
    head = b"".join(lines) + b"\r\n"
    if draw(st.integers(0, 3)) == 0:
        at = draw(st.integers(0, len(head)))
        head = head[:at] + draw(st.binary(max_size=3)) + head[at + draw(st.integers(0, 3)):]
    return head


@SETTINGS
@given(response_heads(), st.sampled_from([b"GET", b"HEAD", b"POST"]), st.booleans(),
       st.booleans())
def test_final_head_frames_every_response_it_is_given(raw: bytes, method: bytes, http11: bool,
                                                     keep_alive: bool) -> None:
    parsed = parse(raw, response=True)
    if parsed is None or parsed.status < 200:
        event("llhttp refuses it, or 1xx")
        return  # llhttp refuses it (502), or a 1xx (interim_head)
    event("framed")
    no_body = has_no_body(parsed.status, method)
    head, framing, keep, delimited = final_head(parsed.status, parsed.reason, parsed.headers,
                                                no_body, http11, keep_alive)
    out = parse(head, response=True)
    assert out is not None and out.status == parsed.status, head
    got = [(n.lower(), v) for n, v in out.headers]
    names = [n for n, _ in got]
    lengths = [v for n, v in got if n == b"content-length"]
    codings = b", ".join(v for n, v in got if n == b"transfer-encoding")
    assert not (lengths and codings), head  # never both (RFC 9112 6.3)
    assert len(lengths) <= 1
    assert not {b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}.intersection(
        names)
    if framing == OUT_NONE:
        assert no_body and not codings
    elif framing == OUT_RAW:
        assert lengths and not no_body
    elif framing == OUT_CHUNKED:
        assert http11 and codings.split(b",")[-1].strip() == b"chunked"
    else:
        assert framing == OUT_UNTIL_CLOSE and not http11 and not keep
    connection = [v for n, v in got if n == b"connection"]
    if not keep:
        assert connection == [b"close"]
    assert keep <= keep_alive
    assert delimited or framing in (OUT_CHUNKED, OUT_UNTIL_CLOSE)
