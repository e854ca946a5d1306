"""requestline.py against llhttp: a differential property test (no network).

Random pipelines of requests (no body, Content-Length, chunked with extensions and trailers,
CR/LF between messages, spaces in field values, request lines inside bodies), some request
lines with doubled spaces, cut into random reads. They are fed to httptools exactly as
client.py feeds them, with `RequestLines` told what client.py tells it; at each head's end its
verdict must be the truth of how that line was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import httptools
from hypothesis import given, settings
from hypothesis import strategies as st

from charon.worker.http.requestline import RequestLines

TARGETS = [b"/", b"/a", b"/echo/x?y=1", b"http://h.test/p", b"*"]
FIELDS = [b"X-Spaced: a  b   c \r\n", b"X-Tight:x\r\n", b"X-Lead:   \t x\r\n",
          b"X-Empty:\r\n", b"X-Empty-Spaces:    \r\n", b"X-Tab:\tv\t\r\n"]
BODY_TEXT = [b"", b"x", b"GET  / HTTP/1.1\r\n", b"\r\nGET / HTTP/1.1\r\n\r\n", b"0\r\n\r\n",
             b"  spaces  ", b"\r\n\r\n"]


@st.composite
def a_request(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(bytes, whether its request line has extra spaces)."""
    method = draw(st.sampled_from([b"GET", b"POST", b"OPTIONS", b"DELETE"]))
    target = draw(st.sampled_from(TARGETS))
    before = draw(st.integers(1, 3))
    after = draw(st.integers(1, 3))
    bad = before > 1 or after > 1
    line = method + b" " * before + target + b" " * after + b"HTTP/1.1\r\n"
    fields = b"Host: h.test\r\n" + b"".join(draw(st.lists(st.sampled_from(FIELDS), max_size=3)))
    kind = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b""
    if kind == "length":
        data = b"".join(draw(st.lists(st.sampled_from(BODY_TEXT), max_size=3)))
        fields += b"Content-Length: %d\r\n" % len(data)
        body = data
    elif kind == "chunked":
        fields += b"Transfer-Encoding: chunked\r\n"
        for piece in draw(st.lists(st.sampled_from(BODY_TEXT[1:]), max_size=3)):
            size = draw(st.sampled_from([b"%x", b"%X", b"000%x"])) % len(piece)
            ext = draw(st.sampled_from([b"", b";a=1", b';b="q"']))
            body += size + ext + b"\r\n" + piece + b"\r\n"
        body += b"0\r\n"
        if draw(st.booleans()):
            body += b"X-Trailer: 1\r\n"
        body += b"\r\n"
    crlf = draw(st.sampled_from([b"", b"", b"\r\n", b"\r\n\r\n"]))
    return crlf + line + fields + b"\r\n" + body, bad


@dataclass
class Driver:
    """What client.py does with llhttp's callbacks, for RequestLines only."""

    lines: RequestLines = field(default_factory=RequestLines)
    verdicts: list[bool] = field(default_factory=list)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    size: int = 0
    url: bytes = b""
    in_head: bool = False
    parser: httptools.HttpRequestParser | None = None

    def on_message_begin(self) -> None:
        self.headers = []
        self.size = 0
        self.url = b""
        self.in_head = True

    def on_url(self, part: bytes) -> None:
        self.url += part

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.headers.append((name, value))
            self.size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.in_head = False
        assert self.parser is not None
        method = self.parser.get_method()
        self.verdicts.append(
            self.lines.head_done(len(method) + len(self.url), None, self.headers, self.size)
        )


@settings(max_examples=400, deadline=None)
@given(
    requests=st.lists(a_request(), min_size=1, max_size=5),
    cuts=st.lists(st.integers(0, 2000), max_size=6),
)
def test_verdicts_match_how_lines_were_written(
    requests: list[tuple[bytes, bool]], cuts: list[int]
) -> None:
    stream = b"".join(r for r, _ in requests)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    driver = Driver()
    parser = driver.parser = httptools.HttpRequestParser(driver)
    for start, end in zip(points, points[1:], strict=False):
        if end > start:
            driver.lines.feed(stream[start:end])
            parser.feed_data(stream[start:end])
            driver.lines.read_done(driver.in_head)
    assert driver.verdicts == [bad for _, bad in requests]
    assert not driver.lines.lost


PIPELINE = [
    (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", False),
    (b"\r\nPOST  /a HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n\r\n\r\n", True),
    (b"POST /b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3;x=\"y\"\r\na\r\n\r\n0\r\nT: 1\r\n\r\n", False),
    (b"GET /c  HTTP/1.1\r\n\r\n", True),
    (b"GET /d HTTP/1.1\r\nX: a  b\r\n\r\n", False),
]


def _verdicts(reads: list[bytes]) -> list[bool]:
    driver = Driver()
    parser = driver.parser = httptools.HttpRequestParser(driver)
    for data in reads:
        driver.lines.feed(data)
        parser.feed_data(data)
        driver.lines.read_done(driver.in_head)
    # Nothing of a read is kept once llhttp took it (an idle keep-alive connection would hold
    # its last read, up to 256 KiB after an upload) but a few bytes of a cut line.
    assert driver.lines.data == b"" and len(driver.lines.last3) <= 3
    return driver.verdicts


def test_every_cut_and_byte_at_a_time() -> None:
    """The same pipeline in one read, cut in two at every point, and one byte per read."""
    stream = b"".join(r for r, _ in PIPELINE)
    truth = [bad for _, bad in PIPELINE]
    assert _verdicts([stream]) == truth
    for cut in range(1, len(stream)):
        assert _verdicts([stream[:cut], stream[cut:]]) == truth, cut
    assert _verdicts([stream[i : i + 1] for i in range(len(stream))]) == truth
    assert _verdicts([stream[i : i + 2] for i in range(0, len(stream), 2)]) == truth
