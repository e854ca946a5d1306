"""Why a backend exchange failed, in words an operator can act on.

A 502 or 504 is logged with the backend's address, the phase it failed in and the system's
own error (`connection refused`, `no such host`, `timeout after 5s`): in the worker's log
lines, the access log, the live log (UPSTREAM_ERROR records) and as the `reason` label of
charon_upstream_errors_total. `reason` is one of a fixed set (REASONS) whatever the error, so
the metric's cardinality stays bounded; the error text goes to the logs only.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl

from charon.events.schema import ERR_BAD_RESPONSE, ERR_CLOSED, ERR_CONNECT, ERR_TIMEOUT, ERR_TLS

log = logging.getLogger("charon.worker")

# Phases of an exchange with the backend.
CONNECT = "connect"  # TCP connect (and an https:// backend's TLS handshake)
SEND = "send"  # writing the request (its body still streaming)
FIRST_BYTE = "first_byte"  # the request was sent: waiting for the response head
BODY = "body"  # the response head was relayed: its body is being read
PHASES = (CONNECT, SEND, FIRST_BYTE, BODY)
_PHASE_TEXT = {
    CONNECT: "connecting", SEND: "sending the request", FIRST_BYTE: "waiting for the response",
    BODY: "reading the response body",
}

# Reasons: the `reason` label of charon_upstream_errors_total.
REFUSED = "refused"
RESET = "reset"
TIMEOUT = "timeout"
DNS = "dns"
TLS = "tls"
BAD_RESPONSE = "bad_response"
CLOSED = "closed"
UNREACHABLE = "unreachable"
OTHER = "other"
REASONS = (REFUSED, RESET, TIMEOUT, DNS, TLS, BAD_RESPONSE, CLOSED, UNREACHABLE, OTHER)

_ERRNO_REASONS = {
    errno.ECONNREFUSED: REFUSED,
    errno.ECONNRESET: RESET,
    errno.EPIPE: RESET,
    errno.ECONNABORTED: RESET,
    errno.ETIMEDOUT: TIMEOUT,
    errno.EHOSTUNREACH: UNREACHABLE,
    errno.ENETUNREACH: UNREACHABLE,
    errno.EHOSTDOWN: UNREACHABLE,
    errno.ENETDOWN: UNREACHABLE,
}
# getaddrinfo's "the name does not exist" answers (the rest: the lookup itself failed).
_NO_SUCH_HOST = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class UpstreamFailure:
    """One failed exchange with a backend: `reason` (REASONS), `phase` (PHASES), `error`
    (the system's words) and `address` (host:port as configured; the exchange fills it)."""

    __slots__ = ("reason", "phase", "error", "address")

    def __init__(self, reason: str, phase: str, error: str, address: str = "") -> None:
        self.reason = reason
        self.phase = phase
        self.error = error
        self.address = address

    @property
    def kind(self) -> str:
        """The coarser `kind` label kept from before `reason` (dashboards sum by it)."""
        if self.reason in (TIMEOUT, TLS, BAD_RESPONSE):
            return {TIMEOUT: ERR_TIMEOUT, TLS: ERR_TLS, BAD_RESPONSE: ERR_BAD_RESPONSE}[self.reason]
        return ERR_CONNECT if self.phase == CONNECT else ERR_CLOSED

    def describe(self) -> str:
        """`upstream 127.0.0.1:9 failed connecting: connection refused`."""
        return f"upstream {self.address} failed {_PHASE_TEXT.get(self.phase, self.phase)}: " \
               f"{self.error}"

    def __repr__(self) -> str:
        return f"<UpstreamFailure {self.reason} {self.phase} {self.address} {self.error!r}>"


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def seconds_text(seconds: float) -> str:
    """5.0 -> "5s", 0.5 -> "0.5s", 90 -> "90s": as a config would say it."""
    return f"{seconds:g}s"


def timed_out(phase: str, seconds: float) -> UpstreamFailure:
    return UpstreamFailure(TIMEOUT, phase, f"timeout after {seconds_text(seconds)}")


def bad_response(phase: str, what: str) -> UpstreamFailure:
    return UpstreamFailure(BAD_RESPONSE, phase, what)


def closed(phase: str, exc: BaseException | None) -> UpstreamFailure:
    """The backend's connection ended early: closed (EOF), or reset (the error says)."""
    if exc is None:
        return UpstreamFailure(CLOSED, phase, "connection closed by the backend")
    return from_exception(exc, phase)


def from_exception(exc: BaseException | None, phase: str = CONNECT) -> UpstreamFailure:
    """A failed connect (or a connection lost) as a failure: reason and the system's words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UpstreamFailure(TLS, phase, f"TLS: {exc.verify_message or exc.reason}")
    if isinstance(exc, ssl.SSLError):
        return UpstreamFailure(TLS, phase, f"TLS: {exc.reason or exc}")
    if isinstance(exc, socket.gaierror):
        if exc.errno in _NO_SUCH_HOST:
            return UpstreamFailure(DNS, phase, "no such host")
        return UpstreamFailure(DNS, phase, f"name lookup failed: {_words(exc.strerror)}")
    if isinstance(exc, TimeoutError) and not exc.errno:
        return UpstreamFailure(TIMEOUT, phase, "timed out")
    if isinstance(exc, OSError) and exc.errno:
        reason = _ERRNO_REASONS.get(exc.errno, OTHER)
        return UpstreamFailure(reason, phase, _words(exc.strerror or errno.errorcode[exc.errno]))
    if isinstance(exc, OSError):
        return UpstreamFailure(OTHER, phase, _words(str(exc)) or "connection failed")
    if exc is None:
        return UpstreamFailure(CLOSED, phase, "connection closed by the backend")
    return UpstreamFailure(OTHER, phase, f"{type(exc).__name__}: {exc}")


def response_phase(response_started: bool, sending: bool) -> str:
    """The phase of an exchange whose backend connection is up."""
    if response_started:
        return BODY
    return SEND if sending else FIRST_BYTE


def log_failure(
    failure: UpstreamFailure, outcome: str, method: bytes, host: str, target: bytes
) -> None:
    """The worker's log line: the request, what became of it (`outcome`: "answered 502"),
    and why."""
    what = target[:200].decode("latin-1")
    if not what.isprintable():
        what = what.encode("unicode_escape").decode("ascii")
    log.warning("%s %s%s %s: %s", method.decode("latin-1"), host, what, outcome, failure.describe())


def _words(text: str | None) -> str:
    """The system's message as it would be written mid-sentence: "Connection refused" ->
    "connection refused" (an acronym such as "TLS" keeps its case)."""
    if not text:
        return ""
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text
