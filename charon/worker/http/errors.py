"""Responses the proxy writes itself: short plain text, never echoing input (decision 10)."""

from __future__ import annotations

from http import HTTPStatus

# nginx's code for a request whose client left before its response was sent: it goes to the
# access log, the live log and the request metric, never on the wire.
CLIENT_CLOSED = 499


class HttpError(Exception):
    """A request the proxy answers itself with `status`; `close`: end the connection after it.

    `fields` (whole header lines) and `body` replace the usual plain-text answer's extras and
    body: a redirect's Location, an ACME challenge's key authorization."""

    def __init__(
        self,
        status: int,
        detail: str = "",
        close: bool = True,
        fields: bytes = b"",
        body: bytes | None = None,
        denied: str | None = None,
    ) -> None:
        super().__init__(f"{status} {detail}")
        self.status = status
        self.detail = detail
        self.close = close
        self.fields = fields
        self.body = body
        # Why a rule refused the request (issue 14): acl, auth, rate, connections, body_size.
        # It labels charon_requests_denied_total and the live log's record.
        self.denied = denied
        # Who was refused, for the record: set when the request got as far as its route.
        self.host: str | None = None
        self.client_ip: str | None = None

    # More header lines for the answer, set where the route is known (its HSTS and the
    # security_headers preset's fields: http/headerrules.py's own_fields).
    extra = b""

    def closing(self) -> HttpError:
        """The same answer, ending the connection."""
        if self.close:
            return self
        error = HttpError(self.status, self.detail, True, self.fields, self.body, self.denied)
        error.host, error.client_ip, error.extra = self.host, self.client_ip, self.extra
        return error


_cache: dict[tuple[int, str, bool, bool], bytes] = {}

# What the proxy forwards (no TRACE, no CONNECT): 405 must say it (RFC 9110 15.5.6).
_ALLOW = b"Allow: GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH\r\n"
_EXTRA = {426: b"Sec-WebSocket-Version: 13\r\n", 405: _ALLOW, 200: _ALLOW}


def error_response(
    status: int, detail: str = "", close: bool = True, head_only: bool = False
) -> bytes:
    """A complete response for `status`; `detail` must be a fixed string, not client input."""
    key = (status, detail, close, head_only)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}{': ' + detail if detail else ''}\n".encode()
    if status == 200:  # the answer to OPTIONS with Max-Forwards: 0 has nothing but Allow to say
        body = b""
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n"
        f"{'Connection: close' if close else 'Connection: keep-alive'}\r\n"
    ).encode()
    extra = _EXTRA.get(status, b"")
    response = head + extra + b"\r\n" + (b"" if head_only else body)
    if len(_cache) < 256:
        _cache[key] = response
    return response


def local_response(
    error: HttpError, close: bool, head_only: bool = False, extra: bytes = b""
) -> bytes:
    """The answer to `error`: error_response's, or one with its own fields and body; `extra`:
    more header lines (Strict-Transport-Security)."""
    if not error.fields and error.body is None:
        response = error_response(error.status, error.detail, close, head_only)
        if extra:
            cut = response.index(b"\r\n\r\n") + 2
            response = response[:cut] + extra + response[cut:]
        return response
    body = error.body or b""
    fields = b"\n" + error.fields.lower()
    head = b"".join((
        b"HTTP/1.1 %d %s\r\n" % (error.status, HTTPStatus(error.status).phrase.encode()),
        # (A relayed forward-auth answer brings its own.)
        b"Content-Type: text/plain\r\n" if body and b"\ncontent-type:" not in fields else b"",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
        b"Connection: close\r\n" if close else b"Connection: keep-alive\r\n",
        error.fields,
        extra,
        b"\r\n",
    ))
    return head if head_only else head + body
