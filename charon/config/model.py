"""The validated configuration: plain frozen dataclasses, built only by `charon.config.loader`.

Durations are seconds as floats; 0 means "off" where a setting allows it.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from charon.config.rules import Rules

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
UpstreamKey = tuple[str, int, bool, bool, str | None]


@dataclass(frozen=True)
class ListenAddress:
    host: str  # an IP literal, without brackets
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0  # backend TCP connect
    header: float = 10.0  # client must send a whole request head within this
    first_byte: float = 60.0  # backend's first response byte after the request was sent
    idle: float = 60.0  # keep-alive idle (client and pooled backend connections), body idle
    send: float = 60.0  # a client that takes no byte of a response for this long is cut
    body: float = 0.0  # a whole request body must arrive within this (0: no limit)
    # Bytes per second a request body must average after `idle` seconds of grace, and a
    # client must take of a response after `send` seconds of a full buffer (0: no minimum).
    body_min_rate: int = 256


@dataclass(frozen=True)
class Upstream:
    """One backend address, http:// or https:// (re-encrypted toward the backend).

    The path of the request is never rewritten.
    """

    url: str
    host: str
    port: int
    tls: bool = False  # https://: the backend connection is TLS
    tls_verify: bool = True  # check the backend's certificate (and name) when tls
    tls_ca: str | None = None  # a CA bundle (PEM path) to verify it with; None: the system's

    @property
    def key(self) -> UpstreamKey:
        """What its pool of connections is known by: the address, and how TLS is spoken to
        it, so plain and TLS connections (or ones verified differently) are never mixed."""
        return (self.host, self.port, self.tls, self.tls_verify, self.tls_ca)


@dataclass(frozen=True)
class Target:
    """One backend of a proxy host or location (issue 13)."""

    upstream: Upstream
    weight: int = 1  # share of new requests and tunnels, relative to the other targets
    backup: bool = False  # used only while every primary target is down
    max_connections: int = 0  # per worker: in-flight requests + open tunnels (0: no cap)
    drain: bool = False  # takes no new requests or tunnels; open tunnels stay (drain_timeout)


@dataclass(frozen=True)
class HealthCheck:
    """An active health check, run by the supervisor once per target for all workers."""

    path: str = "/"
    interval: float = 10.0
    timeout: float = 5.0
    expect_status: tuple[int, ...] = ()  # () : any 2xx or 3xx
    healthy_threshold: int = 2  # consecutive passes that bring a down target back
    unhealthy_threshold: int = 3  # consecutive failures that mark a target down
    websocket: bool = False  # complete a WebSocket handshake on `path` instead of a GET
    host: str | None = None  # the Host header sent; None: the proxy host's first domain


LB_POLICIES = ("round_robin", "least_conn", "random_two", "ip_hash", "header_hash", "cookie")


@dataclass(frozen=True)
class Backends:
    """The targets of a proxy host or location and how one is chosen for each request."""

    name: str  # "app.example.com" or "app.example.com/api/": health state and labels key on it
    targets: tuple[Target, ...]  # in config order (consistent hashing depends on it)
    policy: str = "round_robin"  # one of LB_POLICIES
    hash_header: str | None = None  # header_hash: the request header hashed (lowercase)
    cookie_name: str = "charon_target"  # cookie: the sticky cookie's name
    max_fails: int = 1  # passive: failures within fail_timeout that mark a target down ...
    fail_timeout: float = 10.0  # ... for this long (0 with max_fails: passive checks off)
    fail_status: tuple[int, ...] = ()  # response statuses also counted as failures (5xx)
    health_check: HealthCheck | None = None
    slow_start: float = 0.0  # a recovered target's weight ramps up over this long
    max_retries: int = 2  # other targets tried after a failure (decision 11)
    retry_budget: float = 0.2  # retries at most this share of the group's recent requests
    resolve_interval: float = 30.0  # names re-resolved this often (0: at each connect)

    @property
    def upstream(self) -> Upstream:
        """The first target's address: for messages that name one backend."""
        return self.targets[0].upstream


@dataclass(frozen=True)
class WebSocketSettings:
    max_frame_size: int = 16 * 1024 * 1024
    idle_timeout: float = 0.0  # off
    ping_interval: float = 0.0  # off


@dataclass(frozen=True)
class Location:
    path: str  # a path prefix, starting with "/"
    backends: Backends
    timeouts: Timeouts
    websocket: WebSocketSettings
    rules: Rules = Rules()  # the host's, with what the location sets itself

    @property
    def upstream(self) -> Upstream:
        return self.backends.upstream


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate chain and its private key, PEM files (absolute paths)."""

    cert: str
    key: str
    line: int = 0  # where they were configured, for messages


@dataclass(frozen=True)
class HostTls:
    """How a proxy host gets its certificate: from files, or over ACME (`tls = "auto"`)."""

    files: CertificateFiles | None = None
    auto: bool = False


@dataclass(frozen=True)
class ProxyHost:
    domains: tuple[str, ...]  # lowercase; exact names or "*.suffix" wildcards
    backends: Backends
    locations: tuple[Location, ...]  # longest path first
    timeouts: Timeouts
    websocket: WebSocketSettings
    line: int = 0  # where the [[hosts]] table starts, for messages
    tls: HostTls | None = None  # None: served over TLS only with [tls] default_certificate
    force_https: bool = False  # plain http requests get 308 to https (ACME paths exempt)
    hsts: str | None = None  # Strict-Transport-Security value added over TLS
    rules: Rules = Rules()  # access, auth, limits, header rules (issue 14)

    @property
    def name(self) -> str:
        """The label used in logs and metrics: the first domain."""
        return self.domains[0]

    @property
    def upstream(self) -> Upstream:
        return self.backends.upstream


@dataclass(frozen=True)
class Limits:
    max_request_target: int = 8192  # bytes; longer gets 414
    max_header_bytes: int = 32768  # whole header section; larger gets 431
    max_header_count: int = 100  # more fields gets 431


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[ListenAddress, ...]
    workers: int
    trusted_proxies: tuple[IPNetwork, ...] = ()
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may finish
    # After a reload, how long old workers keep their WebSocket tunnels (0: close them at once).
    drain_timeout: float = 300.0
    pidfile: str | None = None  # where the supervisor writes its PID, for `charon reload`
    access_log: str | None = None  # a file for one line per request (USR1 reopens it)
    heartbeat_timeout: float = 10.0  # a worker silent this long is killed and replaced
    # Old generations draining at once; past it the oldest closes its tunnels (1001) and exits.
    max_retiring_generations: int = 2
    # Forward request header names with `_`; by default they are dropped (as nginx does).
    underscores_in_headers: bool = False
    limits: Limits = field(default_factory=Limits)
    tls_listen: tuple[ListenAddress, ...] = ()  # TLS listeners (bound like listen)
    # Listeners (plain or TLS) whose connections must begin with a PROXY protocol v1/v2
    # header; a reload may change this without rebinding them.
    proxy_protocol: tuple[ListenAddress, ...] = ()
    # Client TCP connections open at once over all workers (0: no cap), and per connection
    # address (the TCP peer, or the PROXY header's source). Past them: see docs/limits.md.
    max_connections: int = 0
    max_connections_per_ip: int = 0

    @property
    def all_listen(self) -> tuple[ListenAddress, ...]:
        """Every listening address, plain then TLS: what the supervisor binds."""
        return self.listen + self.tls_listen


@dataclass(frozen=True)
class AdminConfig:
    listen: ListenAddress | None  # None: no admin listener
    # Bearer token required by the live log (/logs and its page); None: no token asked.
    token: str | None = field(default=None, repr=False)
    # Browser origins ("http://host:port", lowercase) besides the admin listener's own that may
    # open the /logs WebSocket.
    allowed_origins: tuple[str, ...] = ()
    # Workers report each request and tunnel (metrics, live log); false saves that CPU, and
    # /metrics and /logs then show no traffic.
    events: bool = True


# Mozilla's "intermediate" TLS 1.2 cipher list (TLS 1.3 suites are OpenSSL's defaults).
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(frozen=True)
class TlsConfig:
    default_certificate: CertificateFiles | None = None  # for unknown or missing SNI
    acme_directory: str = LETS_ENCRYPT
    email: str | None = None  # the ACME account's contact
    state_dir: str = "/var/lib/charon"  # ACME account, keys and certificates (0600)
    acme_ca_bundle: str | None = None  # PEM CAs to trust the ACME server with (Pebble)
    handshake_timeout: float = 10.0  # a TLS handshake must end within this
    ciphers: str = INTERMEDIATE_CIPHERS
    min_version: str = "1.2"  # "1.2" or "1.3"
    ticket_key_lifetime: float = 3600.0  # session ticket keys rotate this often (0: no tickets)


@dataclass(frozen=True)
class Config:
    path: str  # where it was read from ("<default>" for the embedded one)
    server: ServerConfig
    admin: AdminConfig
    timeouts: Timeouts
    hosts: tuple[ProxyHost, ...]
    tls: TlsConfig = field(default_factory=TlsConfig)
