"""Who may come in, how often, how big, with which headers (issue 14): the validated rules of a
proxy host or location, as plain frozen dataclasses built only by `charon.config.loader`.

A location takes every rule it does not set from its host (like timeouts). The worker turns
them into per-route checks (`charon.worker.access`) run where `plan_request` plans the
request, for the HTTP path and the front door alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (model.py imports this module)
    from charon.config.model import IPNetwork, Upstream

DEFAULT_MAX_BODY_SIZE = 1 << 30  # 1 GiB: a Content-Length of 2^63 is refused (413), not forwarded


@dataclass(frozen=True)
class AccessList:
    """`allow` / `deny` CIDRs, inline and from the named `[access.NAME]` lists (merged).

    The longest prefix matching the client IP decides (deny wins a tie); an address no entry
    matches is allowed only when there is no `allow` entry at all."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    names: tuple[str, ...] = ()  # the [access.NAME] lists merged in (for `charon check`)


@dataclass(frozen=True)
class BasicAuth:
    realm: str
    # (user, hash): bcrypt ($2a$/$2b$/$2y$) or argon2 ($argon2id$/$argon2i$/$argon2d$)
    users: tuple[tuple[str, str], ...]
    forward_authorization: bool = False  # send the client's Authorization on to the backend
    htpasswd: str | None = None  # the file the users were read from (for messages and check)


@dataclass(frozen=True)
class ForwardAuth:
    """Ask `url` (GET, the client's head fields plus X-Forwarded-*) before proxying: 2xx lets
    the request through with `copy_headers` taken from its answer; anything else is relayed."""

    url: str
    upstream: Upstream  # where `url` points (scheme, host, port)
    path: str  # `url`'s path and query: the target of the auth request
    copy_headers: tuple[str, ...] = ()  # as written in the config (compared lowercase)
    timeout: float = 5.0


@dataclass(frozen=True)
class RateLimit:
    """A token bucket of `burst` tokens refilled at `requests` per `per` seconds, shared by all
    workers; `by` = "ip" (one bucket per client IP) or "host" (one for all clients)."""

    requests: int
    per: float
    burst: int  # default: requests
    by: str = "ip"
    zone: str = ""  # where it was configured (a host's name or "host/path"): buckets key on it


@dataclass(frozen=True)
class HeaderOps:
    """Field rules for one direction, applied in this order: remove, set (replaces every field
    of that name), add (appends), default (added only when no field of that name is there:
    the security_headers preset, so a backend's own value wins)."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()  # lowercase names
    default: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove or self.default)


@dataclass(frozen=True)
class Rules:
    """Everything decided about a request before a byte of it goes to the backend."""

    access: AccessList | None = None
    basic_auth: BasicAuth | None = None
    forward_auth: ForwardAuth | None = None
    rate_limits: tuple[RateLimit, ...] = ()  # plain requests (not WebSocket handshakes)
    websocket_rate_limits: tuple[RateLimit, ...] = ()  # WebSocket handshakes only
    websocket_max_messages_per_second: int = 0  # per tunnel, client to backend (0: no cap)
    # Counted over all workers, by the host (a location shares its host's counts):
    max_connections: int = 0  # requests in progress + open WebSockets of the host
    max_connections_per_ip: int = 0  # the same, per client IP (decision 6)
    max_websockets: int = 0  # open WebSocket tunnels of the host
    max_websockets_per_ip: int = 0
    max_body_size: int = DEFAULT_MAX_BODY_SIZE  # request body bytes (0: no limit)
    request_headers: HeaderOps = HeaderOps()
    response_headers: HeaderOps = HeaderOps()  # security_headers already folded in
    # None: the client's Host; "upstream": the chosen target's host[:port]; else this value.
    host_header: str | None = None
    # The preset is on: its fields are in response_headers, its Strict-Transport-Security in
    # the host's `hsts` (sent over TLS only) unless `hsts` was set.
    security_headers: bool = False

    @property
    def bare(self) -> bool:
        """Nothing to check or change but the body size (which plan_request compares itself):
        the route's plan skips the rules entirely."""
        return self == Rules(max_body_size=self.max_body_size)
