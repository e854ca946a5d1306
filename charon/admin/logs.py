"""The live log: a sink of the event hub, a WebSocket stream at /logs and a page at /.

Every log-worthy event (requests, WebSocket tunnels opening and closing, upstream errors, worker
exits, config reloads; not METRICS) becomes a record, a JSON object:

    {"kind": "request", "time": 1732500000.123, "host": "app.example.com", "method": "GET",
     "status": 200, "duration": 0.0042, "response_bytes": 512, "client_ip": "10.0.0.7",
     "path": "/api/items?page=2", "worker": 0}

`kind` is one of request, ws_open, ws_close, upstream_error, worker_exit, reload, certificate,
upstream_health (see `charon/events/schema.py` for each kind's fields); `worker` is the worker id
that sent it, -1 for the supervisor's own events (an upstream_health record also passes a `host`
filter naming its proxy host, for the host's and its locations' targets). An upstream_error's own
error kind (connect, timeout, bad_response, closed, tls) is in `error`. Where records are
missing, a `dropped` record says how many (`count`), who lost them (`by`) and when (`since` to
`time`): a worker the supervisor did not read in time ("by": "worker", with its `worker` and
`pid`, see admin/drops.py), or this subscriber's own queue when it did not take what it asked
for ("by": "stream"). Notices pass every filter.

The sink gets workers' records as packed batches: with no subscriber it only appends the batch's
bytes to the backlog ring (they are decoded, and records built, when someone connects or
listens). Each subscriber has a bounded
queue that the sink fills without waiting (a full one drops and counts), and its own task that
writes to its socket: a slow subscriber never slows the sink or the other subscribers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import WSCloseCode, web

from charon.admin.drops import BY_STREAM, DropNotices
from charon.config.model import AdminConfig
from charon.events.schema import (
    CERTIFICATE,
    CONFIG_RELOAD,
    DROPPED,
    REQUEST,
    UPSTREAM_ERROR,
    UPSTREAM_HEALTH,
    WORKER_EXIT,
    WS_CLOSE,
    WS_OPEN,
    as_dict,
    unpack_records,
)

log = logging.getLogger("charon.admin")

BACKLOG_SIZE = 500  # records kept for new subscribers
QUEUE_SIZE = 1000  # records waiting for one subscriber's socket before it drops some
DEFAULT_BACKLOG = 100  # backlog records sent on connect unless ?backlog= says otherwise
HEARTBEAT = 20.0  # seconds between pings to a subscriber; no pong within half of it: cut
SHUTDOWN_CLOSE_WAIT = 1.0  # seconds a subscriber gets to take the Close at shutdown

# Event kind -> the record's kind (and the name the `kind` filter takes).
LOGGED: dict[str, str] = {
    REQUEST: "request",
    WS_OPEN: "ws_open",
    WS_CLOSE: "ws_close",
    UPSTREAM_ERROR: "upstream_error",
    WORKER_EXIT: "worker_exit",
    CONFIG_RELOAD: "reload",
    CERTIFICATE: "certificate",
    DROPPED: "dropped",
    UPSTREAM_HEALTH: "upstream_health",
}
KINDS = tuple(LOGGED.values())
_KIND_ALIASES = {"req": "request"}
# Kinds that carry a request's host, client, path (and, for some, status).
TRAFFIC = frozenset({"request", "ws_open", "ws_close", "upstream_error"})

_STATUS = re.compile(r"([1-5])xx|([1-5][0-9][0-9])")


def make_record(worker_id: int, event: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    """The JSON-ready record of a log-worthy event."""
    record = as_dict(event)
    kind = event[0]
    record["kind"] = LOGGED.get(kind, kind)
    record["worker"] = worker_id
    return record


def dumps(record: Mapping[str, Any]) -> str | None:
    """One record as compact JSON; None if it cannot be (it is then left out and logged)."""
    try:
        return json.dumps(record, separators=(",", ":"), allow_nan=False, default=_jsonable)
    except (TypeError, ValueError) as exc:
        log.warning("live log: a %s record could not be encoded: %s", record.get("kind"), exc)
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- filters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogFilter:
    """What one subscriber asked for; a record must match every filter that is set."""

    host: str | None = None  # exact (host labels are lowercase)
    status: tuple[int, int] | None = None  # inclusive range: 5xx is (500, 599)
    client: str | None = None  # client IP, exact
    path: str | None = None  # prefix
    kinds: frozenset[str] | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> LogFilter:
        """From the query string of /logs; ValueError with a message for a bad value."""
        host = query.get("host", "").strip().lower() or None
        client = query.get("client", "").strip() or None
        path = query.get("path", "") or None
        return cls(host, _status(query.get("status", "")), client, path, _kinds(query))

    @property
    def traffic_only(self) -> bool:
        return not (self.host is None and self.status is None and self.client is None
                    and self.path is None)

    def matches(self, record: Mapping[str, Any]) -> bool:
        kind = record["kind"]
        if kind == "dropped":
            return True  # a hole in the stream may hide records of any filter
        if self.kinds is not None and kind not in self.kinds:
            return False
        if not self.traffic_only:
            return True
        if kind == "upstream_health":  # a host's targets (its own and its locations')
            group = record.get("host")
            return (self.status is None and self.client is None and self.path is None
                    and isinstance(group, str) and self.host is not None
                    and (group == self.host or group.startswith(self.host + "/")))
        if kind not in TRAFFIC:
            return False  # a worker exit or reload has no host, client or path to match
        if self.host is not None and record.get("host") != self.host:
            return False
        if self.client is not None and record.get("client_ip") != self.client:
            return False
        if self.path is not None:
            path = record.get("path")
            if not isinstance(path, str) or not path.startswith(self.path):
                return False
        if self.status is not None:
            status = record.get("status")
            if not isinstance(status, int) or not self.status[0] <= status <= self.status[1]:
                return False
        return True


def _status(text: str) -> tuple[int, int] | None:
    text = text.strip().lower()
    if not text:
        return None
    match = _STATUS.fullmatch(text)
    if match is None:
        raise ValueError(f"status: expected a class like 5xx or a code like 404, got {text!r}")
    if match[1]:
        low = int(match[1]) * 100
        return (low, low + 99)
    code = int(match[2])
    return (code, code)


def _kinds(query: Mapping[str, str]) -> frozenset[str] | None:
    names = [n.strip().lower() for n in query.get("kind", "").split(",") if n.strip()]
    if not names:
        return None
    kinds = set()
    for name in names:
        name = _KIND_ALIASES.get(name, name)
        if name not in KINDS:
            raise ValueError(f"kind: unknown kind {name!r} (use some of: {', '.join(KINDS)})")
        kinds.add(name)
    return frozenset(kinds)


# -- subscribers -------------------------------------------------------------------------------


class _Gap:
    """Records dropped at this point of a subscriber's queue."""

    __slots__ = ("count", "since", "last")

    def __init__(self) -> None:
        self.count = 1
        self.since = self.last = time.time()


class Subscriber:
    """One /logs connection: its filter and the records waiting for its socket."""

    __slots__ = ("filter", "limit", "items", "wakeup", "dropped")

    def __init__(self, log_filter: LogFilter, limit: int) -> None:
        self.filter = log_filter
        self.limit = limit
        self.items: deque[str | _Gap] = deque()
        self.wakeup = asyncio.Event()
        self.dropped = 0  # in all, since it connected

    def offer(self, text: str) -> None:
        """Queue a record without waiting; when the queue is full, count it as dropped."""
        items = self.items
        if len(items) < self.limit:
            items.append(text)
        else:
            # A full queue may hold one extra entry: the gap marker, at the place of the loss.
            tail = items[-1]
            if isinstance(tail, _Gap):
                tail.count += 1
                tail.last = time.time()
            else:
                items.append(_Gap())
            self.dropped += 1
        self.wakeup.set()

    async def next(self) -> str | _Gap:
        """The oldest entry, when there is one."""
        while not self.items:
            self.wakeup.clear()
            await self.wakeup.wait()
        return self.items.popleft()


@dataclass(frozen=True)
class _Stream:
    """An open /logs WebSocket."""

    ws: web.WebSocketResponse
    pump: asyncio.Task[None]
    transport: asyncio.Transport | None


# -- the section -------------------------------------------------------------------------------


class LiveLogSection:
    """The live log: an event sink (`on_event`) and an admin section (`add_routes`)."""

    def __init__(
        self,
        token: str | None = None,
        allowed_origins: tuple[str, ...] = (),
        backlog_size: int = BACKLOG_SIZE,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.token = token or None
        self.allowed_origins = frozenset(o.lower() for o in allowed_origins)
        self.backlog_size = backlog_size
        self.queue_size = queue_size
        self.dropped = 0  # records dropped for all subscribers that have left
        # The backlog: whole batches as they came (worker id, event count, the events or, while
        # nobody listened, their msgpack bytes), trimmed to about backlog_size events.
        self._ring: deque[tuple[int, int, list[Any] | bytes]] = deque()
        self._ring_events = 0
        self._backlog_size = backlog_size
        self._subscribers: list[Subscriber] = []
        self._open: set[_Stream] = set()
        self._page: tuple[bytes, str] | None = None
        self._drops = DropNotices()

    @classmethod
    def from_config(cls, admin: AdminConfig) -> LiveLogSection:
        return cls(admin.token, admin.allowed_origins)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # -- the sink --------------------------------------------------------------------------

    def on_batch(self, worker_id: int, pid: int, batch: list[list[Any]]) -> None:
        notices = self._drops.notices(pid, batch)
        if notices:
            batch = batch + notices
        self._keep(worker_id, len(batch), batch)
        if self._subscribers:
            self._fan_out_batch(worker_id, batch)

    def on_records(self, worker_id: int, pid: int, count: int, packed: bytes) -> None:
        if not self._subscribers:
            self._keep(worker_id, count, packed)  # decoded only if someone asks for a backlog
            return
        batch = unpack_records(packed)
        self._keep(worker_id, count, batch)
        self._fan_out_batch(worker_id, batch)

    def _keep(self, worker_id: int, count: int, batch: list[Any] | bytes) -> None:
        ring = self._ring
        ring.append((worker_id, count, batch))
        self._ring_events += count
        while ring and self._ring_events - ring[0][1] >= self._backlog_size:
            self._ring_events -= ring.popleft()[1]

    def _fan_out_batch(self, worker_id: int, batch: list[list[Any]]) -> None:
        for event in batch:
            if event and event[0] in LOGGED:
                self._fan_out(worker_id, event)

    def on_event(self, worker_id: int, pid: int, event: list[Any]) -> None:
        self.on_batch(worker_id, pid, [event])

    def _fan_out(self, worker_id: int, event: list[Any]) -> None:
        try:
            record = make_record(worker_id, event)
            text: str | None = None
            for subscriber in self._subscribers:
                if subscriber.filter.matches(record):
                    if text is None:
                        text = dumps(record)
                        if text is None:
                            return
                    subscriber.offer(text)
        except Exception:  # a bad event must not stop the hub's other sinks
            log.exception("live log: event %r dropped", event[:1])

    def _backlog(self, log_filter: LogFilter, wanted: int) -> list[str]:
        """The last `wanted` kept records that match, oldest first."""
        texts: list[str] = []
        seen = 0
        for worker_id, _, kept in reversed(self._ring):
            batch = unpack_records(kept) if isinstance(kept, bytes) else kept
            for event in reversed(batch):
                if not event or event[0] not in LOGGED:
                    continue
                seen += 1
                if seen > self._backlog_size:
                    return texts[::-1]
                record = make_record(worker_id, event)
                if log_filter.matches(record):
                    text = dumps(record)
                    if text is not None:
                        texts.append(text)
                        if len(texts) >= wanted:
                            return texts[::-1]
        return texts[::-1]

    def subscribe(self, log_filter: LogFilter, backlog: int) -> tuple[Subscriber, list[str]]:
        """A new subscriber, and the last `backlog` records that match its filter.

        Both in one step of the loop: no record is missed or sent twice between them.
        """
        subscriber = Subscriber(log_filter, self.queue_size)
        self._subscribers.append(subscriber)
        texts: list[str] = []
        if backlog > 0:
            texts = self._backlog(log_filter, backlog)
        return subscriber, texts

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(subscriber)
            self.dropped += subscriber.dropped

    # -- routes ----------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._page_handler)
        app.router.add_get("/logs", self._logs_handler)
        app.on_shutdown.append(self._on_shutdown)

    async def _page_handler(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _unauthorized_page()
        body, csp = self._load_page()
        return web.Response(
            body=body,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": csp,
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
            },
        )

    def _load_page(self) -> tuple[bytes, str]:
        if self._page is None:
            html = resources.files("charon.admin").joinpath("page.html").read_text("utf-8")
            self._page = (html.encode("utf-8"), _content_security_policy(html))
        return self._page

    async def _logs_handler(self, request: web.Request) -> web.StreamResponse:
        refusal = self._check_origin(request)
        if refusal is not None:
            return web.Response(status=403, text=refusal + "\n")
        if not self._authorized(request):
            return _unauthorized()
        try:
            log_filter = LogFilter.from_query(request.query)
            backlog = self._backlog_count(request.query.get("backlog"))
        except ValueError as exc:
            return web.Response(status=400, text=f"{exc}\n")
        ws = web.WebSocketResponse(heartbeat=HEARTBEAT, compress=False, max_msg_size=4096)
        # Subscribed before the handshake answer: once a client has it, it gets every record.
        subscriber, first = self.subscribe(log_filter, backlog)
        stream: _Stream | None = None
        try:
            await ws.prepare(request)
            pump = asyncio.get_running_loop().create_task(self._pump(ws, subscriber, first))
            stream = _Stream(ws, pump, request.transport)
            self._open.add(stream)
            async for _message in ws:  # clients send nothing; reading answers pings and Close
                pass
        finally:
            self.unsubscribe(subscriber)
            if stream is not None:
                self._open.discard(stream)
                stream.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream.pump
        return ws

    async def _pump(self, ws: web.WebSocketResponse, subscriber: Subscriber,
                    first: list[str]) -> None:
        """Write the backlog, then whatever the sink queues, until the socket goes."""
        try:
            for text in first:
                await ws.send_str(text)
            while True:
                item = await subscriber.next()
                if isinstance(item, _Gap):
                    await ws.send_str(json.dumps({
                        "kind": "dropped", "count": item.count, "by": BY_STREAM,
                        "since": item.since, "time": item.last,
                    }))
                else:
                    await ws.send_str(item)
        except (ConnectionError, RuntimeError):
            pass  # the socket closed under us; the handler cleans up
        except Exception:
            log.exception("live log: a subscriber's stream failed")
            await ws.close(code=WSCloseCode.INTERNAL_ERROR)

    async def _on_shutdown(self, app: web.Application) -> None:
        """Close every stream, so the admin listener's shutdown does not wait for them."""
        async def close(stream: _Stream) -> None:
            stream.pump.cancel()
            try:
                await asyncio.wait_for(
                    stream.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown"),
                    SHUTDOWN_CLOSE_WAIT,
                )
            except Exception:  # a subscriber that takes nothing: cut it
                if stream.transport is not None:
                    stream.transport.abort()

        await asyncio.gather(*(close(s) for s in list(self._open)), return_exceptions=True)

    # -- access ----------------------------------------------------------------------------

    def _backlog_count(self, text: str | None) -> int:
        if text is None or not text.strip():
            return min(DEFAULT_BACKLOG, self.backlog_size)
        try:
            count = int(text)
        except ValueError:
            raise ValueError(f"backlog: expected a number of records, got {text!r}") from None
        if count < 0:
            raise ValueError(f"backlog: must not be negative, got {count}")
        return min(count, self.backlog_size)

    def _authorized(self, request: web.Request) -> bool:
        """True when no token is configured, or the request carries it (header or ?token=)."""
        if self.token is None:
            return True
        expected = self.token.encode()
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected):
            return True
        given = request.query.get("token")
        return given is not None and hmac.compare_digest(given.encode(), expected)

    def _check_origin(self, request: web.Request) -> str | None:
        """None if the WebSocket may be opened from where it comes from, else why not.

        Allowed: no Origin (not a browser: the CLI, scripts), an origin listed in
        allowed_origins, or the admin listener's own origin (Origin host:port equals the Host
        header) when the Host names this machine by an IP address or as localhost. A Host name
        that resolves here could be a DNS-rebinding page of another site: list its origin.
        """
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        origin = origin.strip().lower()
        if origin in self.allowed_origins:
            return None
        scheme, sep, netloc = origin.partition("://")
        host_header = request.headers.get("Host", "").strip().lower()
        if sep and scheme in ("http", "https") and host_header and _same_authority(
            netloc, host_header, 443 if scheme == "https" else 80
        ):
            if _names_this_machine(host_header):
                return None
            return (f"Origin {origin} is not allowed: a page served under a host name must be "
                    "listed in [admin] allowed_origins")
        return f"Origin {origin} is not allowed (see [admin] allowed_origins)"


def _split_authority(authority: str, default_port: int) -> tuple[str, int] | None:
    """ "host[:port]" or "[v6]:port" as (host, port); None if it is neither."""
    if authority.startswith("["):
        host, bracket, rest = authority[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        host, _, port = authority.partition(":")
    if not port:
        return host, default_port
    if not (port.isascii() and port.isdigit()):
        return None
    return host, int(port)


def _same_authority(origin_netloc: str, host_header: str, default_port: int) -> bool:
    origin = _split_authority(origin_netloc, default_port)
    host = _split_authority(host_header, default_port)
    return origin is not None and origin == host


def _names_this_machine(host_header: str) -> bool:
    parsed = _split_authority(host_header, 0)
    if parsed is None:
        return False
    name = parsed[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _unauthorized() -> web.Response:
    return web.Response(
        status=401,
        text="this admin listener needs a token: Authorization: Bearer TOKEN, or ?token=TOKEN\n",
        headers={"WWW-Authenticate": 'Bearer realm="charon admin"'},
    )


_TOKEN_FORM = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Charon live log: token needed</title></head>
<body style="font-family: system-ui, sans-serif; margin: 2em">
<h1>Charon live log</h1>
<p>This admin listener needs a token ([admin] token in the config).</p>
<form method="get" action="/"><label>Token <input type="password" name="token" autofocus>
</label> <button type="submit">Open</button></form>
</body></html>
"""


def _unauthorized_page() -> web.Response:
    return web.Response(
        status=401,
        body=_TOKEN_FORM,
        content_type="text/html",
        charset="utf-8",
        headers={
            "WWW-Authenticate": 'Bearer realm="charon admin"',
            "Content-Security-Policy": "default-src 'none'; form-action 'self'; "
                                       "frame-ancestors 'none'",
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",
        },
    )


def _content_security_policy(html: str) -> str:
    """Only the page's own inline script and style (by hash), and WebSockets to this listener."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
            for b in blocks
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
