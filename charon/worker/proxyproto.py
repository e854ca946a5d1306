"""The PROXY protocol's header (HAProxy's proxy-protocol.txt, versions 1 and 2): what an L4
balancer sends before the client's first byte to say whose connection it is.

`parse(data)` looks at the bytes a connection sent so far and answers one of:
- a `ProxyHeader`: the header is whole; `consumed` bytes are its own (whatever follows is the
  client's HTTP or TLS), `source` is the client's address, or None when the TCP peer stays the
  address (v1 UNKNOWN, v2 LOCAL, v2 AF_UNSPEC or AF_UNIX);
- None: every byte given is part of a header that is not whole yet (so a reader may consume
  them all and wait for more);
- a raised `ProxyProtocolError` with a short `reason` (a metric label) and a detail.

Nothing else is ever raised, whatever the bytes (tests/test_proxy_protocol_parser.py).
"""

from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length
# A v2 header's address block and TLVs: the spec allows 65535 bytes; balancers send a few
# hundred at most (AWS's VPC endpoint id, Azure's link id, TLS details). A bound keeps the
# bytes held per connection small.
V2_MAX_BODY = 4096
MAX_HEADER = V2_FIXED + V2_MAX_BODY  # the most bytes a header may take

_V2_LENGTH = struct.Struct("!H")
_ADDRESS_BLOCK = {0x1: 12, 0x2: 36, 0x3: 216}  # AF_INET, AF_INET6, AF_UNIX


# Why a connection on a PROXY listener was closed (the metric's `reason` label): the parser's
# reasons, then the reader's (worker/proxydoor.py).
REASONS = ("missing", "malformed", "unsupported", "too_long", "timeout", "closed")


class ProxyHeader(NamedTuple):
    source: str | None  # the client's IP (canonical text); None: keep the TCP peer's
    consumed: int  # bytes of the header, from the connection's first byte


class ProxyProtocolError(ValueError):
    """Not a valid PROXY header. `reason`: missing (the connection did not start with one),
    malformed, unsupported (a valid header this proxy does not take), too_long."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{detail} ({reason})")
        self.reason = reason
        self.detail = detail


def parse(data: bytes) -> ProxyHeader | None:
    """The PROXY header at the start of `data` (see the module's docstring)."""
    if data[:1] == b"P":
        if not V1_PREFIX.startswith(data[: len(V1_PREFIX)]):
            raise ProxyProtocolError("missing", "no PROXY header")
        return _parse_v1(data)
    if data[:1] == b"\r":
        if not V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
            raise ProxyProtocolError("missing", "no PROXY header")
        return _parse_v2(data)
    if not data:
        return None
    raise ProxyProtocolError("missing", "no PROXY header")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("too_long", f"no CRLF within {V1_MAX} bytes of a v1 header")
        if b"\r" in data[:-1]:
            raise ProxyProtocolError("malformed", "a CR not followed by LF in a v1 header")
        return None
    if end == 0 or data[end - 1] != 0x0D:
        raise ProxyProtocolError("malformed", "a v1 header line ends with a bare LF")
    line = data[: end - 1]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("malformed", "a v1 header has non-ASCII bytes") from None
    if not text.isprintable():
        raise ProxyProtocolError("malformed", "a v1 header has control characters")
    fields = text.split(" ")
    consumed = end + 1
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(None, consumed)  # (the rest of the line is ignored: spec 2.1)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError("malformed", "a v1 header is not PROXY TCP4|TCP6|UNKNOWN ...")
    _, family, source, destination, source_port, destination_port = fields
    version = 4 if family == "TCP4" else 6
    source_ip = _v1_address(source, version)
    _v1_address(destination, version)
    _v1_port(source_port)
    _v1_port(destination_port)
    return ProxyHeader(source_ip, consumed)


def _v1_address(text: str, version: int) -> str:
    if "%" in text:  # (ipaddress takes an IPv6 scope; an address on the wire has none)
        raise ProxyProtocolError("malformed", "a v1 header has an invalid address")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError("malformed", "a v1 header has an invalid address") from None
    if address.version != version:
        raise ProxyProtocolError("malformed", "a v1 header's address is not of its family")
    return str(address)


def _v1_port(text: str) -> None:
    if (
        not 0 < len(text) <= 5
        or not text.isascii()
        or not text.isdigit()
        or (len(text) > 1 and text[0] == "0")
        or int(text) > 65535
    ):
        raise ProxyProtocolError("malformed", "a v1 header has an invalid port")


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < V2_FIXED:
        return None
    version_command, family_protocol = data[12], data[13]
    (length,) = _V2_LENGTH.unpack_from(data, 14)
    if version_command >> 4 != 2:
        raise ProxyProtocolError("malformed", f"a v2 header of version {version_command >> 4}")
    command = version_command & 0xF
    if command > 1:
        raise ProxyProtocolError("malformed", f"a v2 header with command {command}")
    if length > V2_MAX_BODY:
        raise ProxyProtocolError(
            "too_long", f"a v2 header of {length} bytes after its first 16 (at most {V2_MAX_BODY})"
        )
    consumed = V2_FIXED + length
    if len(data) < consumed:
        return None
    if command == 0:  # LOCAL (a balancer's health check): the block is ignored (spec 2.2)
        return ProxyHeader(None, consumed)
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family > 3 or protocol > 2:
        raise ProxyProtocolError(
            "malformed", f"a v2 header with family/protocol {family_protocol:#04x}"
        )
    if length < _ADDRESS_BLOCK.get(family, 0):
        raise ProxyProtocolError("malformed", "a v2 header shorter than its address block")
    if protocol == 2:
        raise ProxyProtocolError("unsupported", "a v2 header for a datagram connection")
    if family == 0x1 and protocol == 1:
        return ProxyHeader(str(ipaddress.IPv4Address(data[16:20])), consumed)
    if family == 0x2 and protocol == 1:
        return ProxyHeader(str(ipaddress.IPv6Address(data[16:32])), consumed)
    # AF_UNSPEC, or AF_UNIX (no IP), or an unspecified protocol: the TCP peer stays (spec 2.2).
    return ProxyHeader(None, consumed)
