"""max_body_size through `charon run` (issue 14): 413 for a Content-Length over it (the huge
one that used to be forwarded included, with the default limit) and for a chunked body once it
passes it; the backend sees nothing of a refused Content-Length request."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import Backend, Charon, raw_request
from test_rate_limits import APP, get, hosts

pytestmark = pytest.mark.timeout(60)


def test_content_length_and_chunked_over_the_limit(tmp_path: Path) -> None:
    backend = Backend("http_backend.py")
    charon = Charon(tmp_path, hosts(backend.url, 'max_body_size = "1k"') + (
        '[[hosts]]\ndomains = ["default.test"]\nupstream = "' + backend.url + '"\n'
    ), workers=2)
    try:
        charon.start()
        huge = raw_request(charon.port, (
            b"POST /upload HTTP/1.1\r\nHost: default.test\r\n"
            b"Content-Length: 9223372036854775807\r\n\r\nabc"))
        assert huge.startswith(b"HTTP/1.1 413 "), huge[:200]
        over = raw_request(charon.port, (
            b"POST /upload HTTP/1.1\r\nHost: " + APP.encode() + b"\r\n"
            b"Content-Length: 1025\r\n\r\n" + b"x" * 1025))
        assert over.startswith(b"HTTP/1.1 413 "), over[:200]
        fits = raw_request(charon.port, (
            b"POST /upload HTTP/1.1\r\nHost: " + APP.encode() + b"\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n"))
        assert fits.startswith(b"HTTP/1.1 200 ") and b'"length": 1024' in fits.replace(
            b'"length":1024', b'"length": 1024'), fits[-300:]
        # The backend answers /upload only once the whole body is read: a cut body gets 413.
        chunked = raw_request(charon.port, (
            b"POST /upload HTTP/1.1\r\nHost: " + APP.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + (b"200\r\n" + b"y" * 512 + b"\r\n") * 3
            + b"0\r\n\r\n"))
        assert chunked.startswith(b"HTTP/1.1 413 "), chunked[:200]
        assert b"Connection: close" in chunked
        assert get(charon.port)[0] == 200  # the backend connection was not reused broken
    finally:
        charon.stop()
        backend.stop()
