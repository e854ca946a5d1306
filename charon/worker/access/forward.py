"""Forward authentication: ask an auth service (Authelia, Authentik, oauth2-proxy style) about
each request before it is proxied, as a `plan.waits` entry.

The question is a GET to the configured URL on a connection kept alive for the next question to
the same service (authconns.py; never shared with the data path), carrying the client's head fields
except hop-by-hop and framing ones, its Host replaced by the auth server's, and
X-Forwarded-Method/Proto/Host/Uri/For. The answer is parsed by llhttp (httptools). A 2xx lets
the request through, each `copy_headers` field of the answer replacing any of that name the
client sent (also when the answer lacks it: a client cannot claim Remote-User); any other answer
is relayed to the client. No connection: 502; no answer within `timeout`: 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from http import HTTPStatus
from typing import TYPE_CHECKING

import httptools

from charon.worker.access.authconns import Connection, auth_connections
from charon.worker.http.errors import HttpError
from charon.worker.upstreams.tls import client_context

if TYPE_CHECKING:
    from charon.config.rules import ForwardAuth
    from charon.worker.http.headers import Header
    from charon.worker.http.request import RequestPlan

MAX_BODY = 64 * 1024  # of a relayed answer; a bigger one is 502
MAX_HEAD = 64 * 1024

# Not sent to the auth service: hop-by-hop (decision 5), framing (a GET without a body), Host
# (the auth server's own), and the forwarded fields the proxy sets itself.
_NOT_SENT = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"content-length", b"host",
    b"expect", b"x-forwarded-method", b"x-forwarded-proto", b"x-forwarded-host",
    b"x-forwarded-uri", b"x-forwarded-for", b"x-real-ip", b"forwarded",
})
# Not relayed from a refusing answer (the proxy frames the body itself).
_NOT_RELAYED = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"content-length",
})

class ForwardAuthCheck:
    """The check of one route: leaves the question to the auth service in `plan.waits`."""

    __slots__ = ("auth", "copy", "_host", "_line", "_not_sent")

    def __init__(self, auth: ForwardAuth, keeps_authorization: bool = True) -> None:
        """`keeps_authorization` False: the route's basic auth used up the client's
        Authorization (its password goes to no one else)."""
        self.auth = auth
        self._not_sent = _NOT_SENT if keeps_authorization else _NOT_SENT | {b"authorization"}
        self.copy = tuple(dict.fromkeys(name.lower().encode("ascii") for name in auth.copy_headers))
        upstream = auth.upstream
        host = upstream.host if ":" not in upstream.host else f"[{upstream.host}]"
        if upstream.port != (443 if upstream.tls else 80):
            host += f":{upstream.port}"
        self._host = host.encode("ascii")
        self._line = b"GET " + auth.path.encode("ascii") + b" HTTP/1.1\r\n"

    def __call__(self, plan: RequestPlan, headers: list[Header]) -> None:
        question = self.question(plan, headers)

        async def ask(plan: RequestPlan) -> HttpError | None:
            return await self.ask(plan, question)

        if plan.waits is None:
            plan.waits = [ask]
        else:
            plan.waits.append(ask)

    def question(self, plan: RequestPlan, headers: list[Header]) -> bytes:
        """The auth request's head (the client's fields read now: the plan keeps no list)."""
        dropped = set(self._not_sent)
        host = b""
        for name, value in headers:
            lname = name.lower()
            if lname == b"connection":
                dropped.update(t.strip().lower() for t in value.split(b","))
            elif lname == b"host":
                host = value.strip()
        out = [self._line, b"Host: ", self._host, b"\r\n"]
        for name, value in headers:
            if name.lower() not in dropped:
                out += (name, b": ", value, b"\r\n")
        out += (
            b"X-Forwarded-Method: ", plan.method,
            b"\r\nX-Forwarded-Proto: ", b"https" if plan.tls else b"http",
            b"\r\nX-Forwarded-Host: ", host,
            b"\r\nX-Forwarded-Uri: ", plan.path,
            b"\r\nX-Forwarded-For: ", plan.client_ip.encode("latin-1"),
            b"\r\n\r\n",  # (kept alive: authconns.py)
        )
        return b"".join(out)

    async def ask(self, plan: RequestPlan, question: bytes) -> HttpError | None:
        try:
            async with asyncio.timeout(self.auth.timeout):
                answer = await _exchange(self.auth, question)
        except TimeoutError:
            return HttpError(504, "the auth service did not answer in time", close=False)
        except (OSError, ssl.SSLError):
            return HttpError(502, "cannot connect to the auth service", close=False)
        except _BadAnswer as exc:
            return HttpError(502, str(exc), close=False)
        if 200 <= answer.status < 300:
            plan.head = with_fields(plan.head, self.copy, answer.fields)
            return None
        return answer.refusal()


class _BadAnswer(Exception):
    pass


class _Answer:
    """llhttp's callbacks, collecting one response (1xx answers skipped)."""

    def __init__(self) -> None:
        self.status = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.size = 0
        self.head_size = 0
        self.head_done = False
        self.done = False
        self.keep_alive = False  # the connection may carry another question
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value)
        if self.head_size > MAX_HEAD:
            raise _BadAnswer("the auth service's answer head is too large")
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.fields = []
            return
        self.status = status
        self.head_done = True

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_BODY:
            raise _BadAnswer("the auth service's answer is too large")
        self.body.append(data)

    def on_message_begin(self) -> None:
        if self.done:  # (a second answer to one question: the connection is not trusted)
            raise _BadAnswer("the auth service sent more than one answer")

    def on_message_complete(self) -> None:
        if self.head_done:
            self.done = True
            # (Asked here: once the message is complete llhttp starts afresh and says False.)
            self.keep_alive = self.parser.should_keep_alive()

    def delimited(self) -> bool:
        """The body has its own end (else it runs until the connection closes)."""
        return any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.fields)

    def refusal(self) -> HttpError:
        """The answer relayed to the client (status, fields but hop-by-hop, body)."""
        try:
            HTTPStatus(self.status)
        except ValueError:
            return HttpError(502, "the auth service answered an unknown status", close=False)
        fields = b"".join(
            b"%s: %s\r\n" % (n, v) for n, v in self.fields if n.lower() not in _NOT_RELAYED
        )
        return HttpError(self.status, close=False, fields=fields, body=b"".join(self.body),
                         denied="auth")


class _Stale(Exception):
    """A reused connection failed before any byte of its answer: ask on a new one."""


async def _exchange(auth: ForwardAuth, question: bytes) -> _Answer:
    pool = auth_connections()
    upstream = auth.upstream
    connection = pool.take(upstream)
    if connection is not None:
        try:
            return await _ask_on(auth, connection, question, reused=True)
        except _Stale:
            pass
    if upstream.tls:
        connection = await asyncio.open_connection(
            upstream.host, upstream.port, ssl=client_context(upstream.tls_verify, upstream.tls_ca),
            server_hostname=upstream.host,
        )
    else:
        connection = await asyncio.open_connection(upstream.host, upstream.port)
    return await _ask_on(auth, connection, question, reused=False)


async def _ask_on(
    auth: ForwardAuth, connection: Connection, question: bytes, reused: bool
) -> _Answer:
    """The answer to `question` on `connection`, which goes back to the pool if the answer
    was complete and kept alive (else it is aborted)."""
    reader, writer = connection
    kept = False
    try:
        answer = _Answer()
        try:
            writer.write(question)
            data = await reader.read(65536)
        except (ConnectionError, OSError):
            if reused:
                raise _Stale from None
            raise
        if not data and reused:
            raise _Stale
        while True:
            if not data:
                if answer.head_done and not answer.delimited():
                    break  # a body that ends with the connection
                raise _BadAnswer("the auth service closed the connection early")
            try:
                answer.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                raise _BadAnswer("the auth service switched protocols") from None
            except httptools.HttpParserError as exc:
                if isinstance(exc.__context__, _BadAnswer):
                    raise exc.__context__ from None
                raise _BadAnswer("the auth service sent an invalid answer") from None
            if answer.done:
                break
            data = await reader.read(65536)
        kept = answer.done and answer.keep_alive
        return answer
    finally:
        if kept:
            auth_connections().give_back(auth.upstream, connection)
        else:
            writer.transport.abort()  # (no orderly close to wait for: the answer is read)
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def with_fields(head: bytes, names: tuple[bytes, ...], fields: list[tuple[bytes, bytes]]) -> bytes:
    """`head` (request line, Host line, fields, CRLF) without any field named in `names`, and
    with the `fields` of those names from the auth answer added (before the final CRLF)."""
    if not names:
        return head
    lines = head[:-4].split(b"\r\n")
    kept = lines[:2]  # (the request line and Host stay first: header rules find Host there)
    for line in lines[2:]:
        if line.partition(b":")[0].strip().lower() not in names:
            kept.append(line)
    for name, value in fields:
        if name.lower() in names and not any(c in value for c in (b"\r", b"\n", b"\0")):
            kept.append(name + b": " + value.strip())
    return b"\r\n".join(kept) + b"\r\n\r\n"
