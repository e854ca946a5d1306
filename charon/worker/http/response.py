"""From a backend response head to what the client gets (decisions 4, 5, 9).

The proxy writes the framing itself: Content-Length is kept when the backend sent one, chunked
or read-until-close bodies are re-chunked for HTTP/1.1 clients and close-delimited for HTTP/1.0.
"""

from __future__ import annotations

from http import HTTPStatus

from charon.worker.http.headers import (
    HOP_BY_HOP,
    Header,
    connection_tokens,
    droppable_by_connection,
)

# How the body goes to the client.
OUT_NONE = 0  # no body (HEAD, 1xx, 204, 304)
OUT_RAW = 1  # Content-Length framed: bytes pass as they are
OUT_CHUNKED = 2  # re-chunked for an HTTP/1.1 client
OUT_UNTIL_CLOSE = 3  # HTTP/1.0 client: the body ends when the connection closes

_STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus
}


def status_line(status: int, reason: bytes) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is not None and (not reason or line[13:-2] == reason):
        return line
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


def has_no_body(status: int, request_method: bytes) -> bool:
    return request_method == b"HEAD" or status in (204, 304) or status < 200


def interim_head(status: int, reason: bytes, headers: list[Header]) -> bytes:
    """A 1xx response (100 Continue, 103 Early Hints) for an HTTP/1.1 client."""
    out = [status_line(status, reason)]
    for name, value in _end_to_end(headers):
        out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def final_head(
    status: int,
    reason: bytes,
    headers: list[Header],
    no_body: bool,
    client_http11: bool,
    keep_alive: bool,
    hsts: bytes | None = None,
) -> tuple[bytes, int, bool, bool]:
    """(response head, OUT_* framing, keep the client connection open?, body self-delimited?)

    Self-delimited: the body's end is marked (Content-Length, or a last coding `chunked`)
    rather than by the backend closing the connection (RFC 9112 6.3). `hsts`: a
    Strict-Transport-Security value added unless the backend sent its own.
    """
    out = [status_line(status, reason)]
    length: bytes | None = None
    codings: list[bytes] = []
    connection: list[bytes] = []
    for name, value in headers:  # one pass, one lower() per field: this runs per response
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"transfer-encoding":
                codings += (c.strip() for c in value.split(b",") if c.strip())
            elif lname == b"connection":
                connection.append(value)
        elif lname == b"content-length":
            length = value
        else:
            out += (name, b": ", value, b"\r\n")
    if connection and droppable_by_connection(connection_tokens(connection)):
        # Rare: headers named in Connection are hop-by-hop too; filter again, thoroughly.
        out = [out[0]] + [
            part
            for name, value in _end_to_end(headers)
            if name.lower() != b"content-length"
            for part in (name, b": ", value, b"\r\n")
        ]
    if hsts is not None and not any(n.lower() == b"strict-transport-security" for n, _ in headers):
        out += (b"Strict-Transport-Security: ", hsts, b"\r\n")
    delimited = no_body or length is not None or (
        bool(codings) and codings[-1].lower() == b"chunked"
    )

    if no_body:
        framing = OUT_NONE
        # HEAD and 304 describe the representation's size; 1xx and 204 never carry one.
        if length is not None and status >= 200 and status != 204:
            out += (b"Content-Length: ", length, b"\r\n")
    elif length is not None:
        framing = OUT_RAW
        out += (b"Content-Length: ", length, b"\r\n")
    elif client_http11:
        framing = OUT_CHUNKED
        # llhttp removes only the chunked coding: other codings (gzip, ...) stay on the body
        # and must stay declared, or the client takes the coded bytes for the content.
        others = [c for c in codings if c.lower() != b"chunked"]
        if others:
            out += (b"Transfer-Encoding: ", b", ".join(others), b", chunked\r\n")
        else:
            out.append(b"Transfer-Encoding: chunked\r\n")
    else:
        framing = OUT_UNTIL_CLOSE
        keep_alive = False

    if not keep_alive:
        out.append(b"Connection: close\r\n")
    elif not client_http11:
        out.append(b"Connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), framing, keep_alive, delimited


def _end_to_end(headers: list[Header]) -> list[Header]:
    conn = [value for name, value in headers if name.lower() == b"connection"]
    dropped = droppable_by_connection(connection_tokens(conn)) if conn else frozenset()
    return [
        (name, value)
        for name, value in headers
        if (lname := name.lower()) not in HOP_BY_HOP and lname not in dropped
    ]
