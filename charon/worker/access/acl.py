"""Access lists: `allow` / `deny` CIDRs decided on the client IP (decision 6).

The longest prefix that matches the address decides, deny winning a tie; an address no entry
matches is allowed only when the list has no `allow` entry at all. An IPv4-mapped IPv6 address
(`::ffff:10.1.2.3`, what a dual-stack listener reports for an IPv4 client) is its IPv4 address,
for entries and clients alike.

Each route's check keeps its recent answers per client IP string (bounded, cleared when full):
a client's repeat request costs one dict lookup. The first one parses the address once and
looks up one integer per distinct prefix length of its family (a few for most lists).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from charon.worker.http.errors import HttpError

if TYPE_CHECKING:
    from charon.config.model import IPNetwork
    from charon.config.rules import AccessList
    from charon.worker.http.headers import Header
    from charon.worker.http.request import RequestPlan

CACHE_SIZE = 4096  # client addresses remembered per route (an address-spraying flood: cleared)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

ALLOW = True
DENY = False


def refusal() -> HttpError:
    """403 for a client the list refuses (a new one each time: a raised exception keeps its
    traceback, a shared one would grow it)."""
    return HttpError(403, "access denied", close=False, denied="acl")


class _Family:
    """One address family's entries: {prefix length: {network >> (bits - length): allow}},
    longest prefix first."""

    __slots__ = ("bits", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: list[tuple[int, dict[int, bool]]] = []

    def add(self, network: int, length: int, allow: bool) -> None:
        table = next((t for known, t in self.tables if known == length), None)
        if table is None:
            table = {}
            self.tables.append((length, table))
            self.tables.sort(key=lambda entry: -entry[0])
        key = network >> (self.bits - length)
        # Deny wins a tie: an entry in both lists denies.
        table[key] = table.get(key, allow) and allow

    def match(self, address: int) -> bool | None:
        bits = self.bits
        for length, table in self.tables:
            found = table.get(address >> (bits - length))
            if found is not None:
                return found
        return None


class AclCheck:
    """A route's access list, as a check (worker/access/checks.py)."""

    __slots__ = ("_cache", "_v4", "_v6", "_unmatched")

    def __init__(self, access: AccessList) -> None:
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        for networks, action in ((access.allow, ALLOW), (access.deny, DENY)):
            for network in networks:
                self._add(network, action)
        # No entry matched: allowed unless there is an allow entry (the list is then a
        # list of who may come in).
        self._unmatched = not access.allow
        self._cache: dict[str, bool] = {}

    def _add(self, network: IPNetwork, action: bool) -> None:
        if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
            length = network.prefixlen - 96
            self._v4.add(int(network.network_address) & 0xFFFFFFFF, length, action)
        elif network.version == 4:
            self._v4.add(int(network.network_address), network.prefixlen, action)
        else:
            self._v6.add(int(network.network_address), network.prefixlen, action)

    def allows(self, client_ip: str) -> bool:
        allowed = self._cache.get(client_ip)
        if allowed is None:
            allowed = self._decide(client_ip)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[client_ip] = allowed
        return allowed

    def __call__(self, plan: RequestPlan, headers: list[Header]) -> None:
        allowed = self._cache.get(plan.client_ip)
        if allowed is None:
            allowed = self.allows(plan.client_ip)
        if not allowed:
            raise refusal()

    def _decide(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:  # (a trusted proxy's X-Forwarded-For entry that is no address)
            return self._unmatched
        if address.version == 6:
            mapped = address.ipv4_mapped  # type: ignore[union-attr]
            if mapped is not None:
                found = self._v4.match(int(mapped))
            else:
                found = self._v6.match(int(address))
        else:
            found = self._v4.match(int(address))
        return self._unmatched if found is None else found
