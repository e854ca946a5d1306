"""Header rules shared by both directions: hop-by-hop removal and the forwarded headers.

Protocol notes, decisions 5 and 6. Names are compared lowercased; values are raw bytes.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from charon.config.model import IPNetwork
from charon.config.values import is_ip_address

Header = tuple[bytes, bytes]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Naming these in `Connection` must not remove them: the proxy writes them itself.
NEVER_DROPPED = frozenset(
    {
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
        b"via",
    }
)

# Tokens of `Connection` that name nothing beyond the standard hop-by-hop set.
_PLAIN_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade"})

_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

# RFC 9110 uri-host [":" port]: reg-name (unreserved / pct-encoded / sub-delims), IPv4, or [IPv6].
# The port, when there is a colon, is 1-65535 (split_host): RFC 3986 would let it be empty, but
# an empty, zero or overflowing port is read differently by different servers.
_HOST = re.compile(
    rb"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::([0-9]{1,5}))?$"
)


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The lowercased tokens named by one or more `Connection` header values."""
    tokens: set[bytes] = set()
    for value in values:
        for part in value.split(b","):
            token = part.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


CACHE_LIMIT = 1024  # entries of each cache below; a full cache starts over

# A request's Connection value (b"Upgrade", b"keep-alive", ...) is one of a few: parsing each
# once saves splitting and lowercasing it per request.
_connection_cache: dict[bytes, tuple[frozenset[bytes], frozenset[bytes]]] = {}


def parse_connection(values: list[bytes]) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """(tokens, droppable_by_connection(tokens)) of one or more `Connection` values."""
    if len(values) != 1:
        tokens = connection_tokens(values)
        return tokens, droppable_by_connection(tokens)
    value = values[0]
    parsed = _connection_cache.get(value)
    if parsed is None:
        tokens = connection_tokens(values)
        parsed = (tokens, droppable_by_connection(tokens))
        if len(_connection_cache) >= CACHE_LIMIT:
            _connection_cache.clear()
        _connection_cache[value] = parsed
    return parsed


def droppable_by_connection(tokens: frozenset[bytes]) -> frozenset[bytes]:
    """The extra header names a `Connection` header removes, minus the ones it may not."""
    if tokens <= _PLAIN_CONNECTION_TOKENS:
        return frozenset()
    return frozenset(t for t in tokens if t not in NEVER_DROPPED and _TOKEN.match(t))


_host_cache: dict[bytes, bytes | None] = {}
_UNKNOWN = b"\0"  # not a host name split_host can return


def host_name(value: bytes) -> bytes | None:
    """split_host(value), remembered: most requests name one of a few hosts."""
    name = _host_cache.get(value, _UNKNOWN)
    if name is not _UNKNOWN:
        return name
    name = split_host(value)
    if len(_host_cache) >= CACHE_LIMIT:
        _host_cache.clear()
    _host_cache[value] = name
    return name


def split_host(value: bytes) -> bytes | None:
    """The lowercased host name of a Host value ("Example.com:8080" -> b"example.com").

    None when the value is not a valid `uri-host [":" port]`.
    """
    match = _HOST.match(value)
    if match is None:
        return None
    port = match.group(1)
    if port is not None and not 0 < int(port) < 65536:
        return None
    if value.startswith(b"["):
        return value[: value.index(b"]") + 1].lower()
    name, _, _ = value.partition(b":")
    if not name:
        return None
    return name.lower()


class ForwardedPolicy:
    """Builds X-Forwarded-For/-Proto/-Host from the peer and, for trusted peers, what they sent."""

    def __init__(self, trusted: tuple[IPNetwork, ...], allow_underscores: bool = False) -> None:
        self._trusted = trusted
        # Forward header names with `_` (server.underscores_in_headers); else they are dropped.
        self.allow_underscores = allow_underscores
        self.trusts_anyone = bool(trusted)  # else is_trusted need not be asked
        self._cache: dict[str, bool] = {}

    def is_trusted(self, ip: str) -> bool:
        if not self._trusted:
            return False
        known = self._cache.get(ip)
        if known is None:
            known = _in_networks(ip, self._trusted)
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[ip] = known
        return known

    def client_ip(self, peer_ip: str, xff: bytes | None) -> str:
        """The rightmost untrusted address of the chain (decision 6), for logs and access rules."""
        if xff is None or not self.is_trusted(peer_ip):
            return peer_ip
        for hop in reversed(xff.split(b",")):
            candidate = hop.strip().decode("latin-1")
            if not candidate:
                continue
            if not is_ip_address(candidate) or not self.is_trusted(candidate):
                return candidate
        return peer_ip



def _in_networks(ip: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in networks)
