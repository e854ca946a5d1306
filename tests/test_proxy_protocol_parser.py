"""The PROXY header parser (worker/proxyproto.py) on headers built from the spec's layouts by
hypothesis: a valid header parses to its source address whatever follows it, every strict
prefix of it is "need more" (so a reader may consume a partial header and wait), and any bytes
at all give a header, None or ProxyProtocolError, never another exception."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charon.worker.proxyproto import (
    MAX_HEADER,
    V1_MAX,
    V2_MAX_BODY,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    parse,
)

SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
ports = st.integers(0, 65535)
tlvs = st.lists(
    st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4
).map(lambda items: b"".join(bytes([t]) + struct.pack("!H", len(v)) + v for t, v in items))
# What a client sends after the header: HTTP, a ClientHello's start, or anything.
after = st.one_of(
    st.just(b""),
    st.just(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    st.just(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    st.binary(max_size=64),
)


def v1(source: ipaddress.IPv4Address | ipaddress.IPv6Address,
       dest: ipaddress.IPv4Address | ipaddress.IPv6Address, sport: int, dport: int) -> bytes:
    family = "TCP4" if source.version == 4 else "TCP6"
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode()


def v2(command: int, family: int, body: bytes, protocol: int = 1) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family << 4 | protocol]) + struct.pack(
        "!H", len(body)) + body


def v2_inet(source: ipaddress.IPv4Address | ipaddress.IPv6Address,
            dest: ipaddress.IPv4Address | ipaddress.IPv6Address,
            sport: int, dport: int, extra: bytes = b"") -> bytes:
    family = 1 if source.version == 4 else 2
    if dest.version != source.version:
        dest = ipaddress.ip_address(0) if source.version == 4 else ipaddress.IPv6Address(0)
    body = source.packed + dest.packed + struct.pack("!HH", sport, dport) + extra
    return v2(1, family, body)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A valid header and the source it names (None: the TCP peer stays)."""
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-local", "v2-unspec"]))
    if kind == "v1":
        source = draw(st.one_of(ipv4, ipv6))
        dest = draw(ipv4 if source.version == 4 else ipv6)
        return v1(source, dest, draw(ports), draw(ports)), str(source)
    if kind == "v1-unknown":
        tail = draw(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80))
        return f"PROXY UNKNOWN{' ' + tail if tail else ''}\r\n".encode(), None
    if kind == "v2":
        source = draw(st.one_of(ipv4, ipv6))
        dest = draw(ipv4 if source.version == 4 else ipv6)
        return v2_inet(source, dest, draw(ports), draw(ports), draw(tlvs)), str(source)
    if kind == "v2-local":
        return v2(0, draw(st.integers(0, 2)), draw(st.binary(max_size=40)) * 1, 0), None
    return v2(1, 0, draw(tlvs), 0), None


@SETTINGS
@given(valid_headers(), after)
def test_a_valid_header_parses_to_its_source_whatever_follows(
    header: tuple[bytes, str | None], tail: bytes
) -> None:
    data, source = header
    assert parse(data + tail) == ProxyHeader(source, len(data))


@SETTINGS
@given(valid_headers(), after, st.data())
def test_any_split_parses_the_same(
    header: tuple[bytes, str | None], tail: bytes, data: st.DataObject
) -> None:
    """A reader that consumes what a "need more" answer covered and reads on (as the worker's
    does) ends with the same header at the same length, however the bytes were cut."""
    raw, source = header
    stream = raw + tail
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    got = b""
    result = None
    for end in [*cuts, len(stream)]:
        got = stream[:max(end, len(got))]
        result = parse(got)
        if result is not None:
            break
        assert len(got) < len(raw)  # "need more" only while the header is not whole
    assert result == ProxyHeader(source, len(raw))


@SETTINGS
@given(valid_headers())
def test_every_strict_prefix_needs_more(header: tuple[bytes, str | None]) -> None:
    raw, _ = header
    for end in range(len(raw)):
        assert parse(raw[:end]) is None


@SETTINGS
@given(st.binary(max_size=300))
def test_garbage_raises_only_the_parsers_error(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyProtocolError as exc:
        assert exc.reason in ("missing", "malformed", "unsupported", "too_long")
    else:
        assert result is None or 0 < result.consumed <= min(len(data), MAX_HEADER)


@SETTINGS
@given(valid_headers(), st.data())
def test_mutated_headers_raise_only_the_parsers_error(
    header: tuple[bytes, str | None], data: st.DataObject
) -> None:
    raw = bytearray(header[0])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    try:
        result = parse(bytes(raw))
    except ProxyProtocolError:
        return
    if result is not None:
        assert 0 < result.consumed <= len(raw)
        if result.source is not None:
            ipaddress.ip_address(result.source)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "missing"),
        (b"\x16\x03\x01\x02\x00", "missing"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "malformed"),  # bare LF
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "malformed"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "malformed"),
        (b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n", "too_long"),
        (b"PROXY " + b"1" * V1_MAX, "too_long"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "malformed"),  # version 3
        (V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "malformed"),  # command 2
        (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), "malformed"),  # short address block
        (V2_SIGNATURE + b"\x21\x41\x00\x00", "malformed"),  # family 4
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "unsupported"),  # datagram
        (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_BODY + 1), "too_long"),
        (V2_SIGNATURE[:5] + b"X", "missing"),
    ],
)
def test_invalid_headers_and_their_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse(data)
    assert info.value.reason == reason


def test_the_longest_v1_lines_are_taken() -> None:
    top = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {top} {top} 65535 65535\r\n".encode()
    assert parse(line + b"GET") == ProxyHeader(top, len(line))
    longest = line.replace(b"TCP6", b"UNKNOWN")  # the spec's worst case
    assert len(longest) == V1_MAX
    assert parse(longest + b"GET") == ProxyHeader(None, V1_MAX)


def test_addresses_come_out_canonical() -> None:
    v6 = ipaddress.IPv6Address("2001:db8::1")
    assert parse(v2_inet(v6, v6, 1, 2)) == ProxyHeader("2001:db8::1", 16 + 36)
    line = b"PROXY TCP6 2001:DB8:0:0::1 ::1 1 2\r\n"
    assert parse(line) == ProxyHeader("2001:db8::1", len(line))
    assert parse(v2(1, 3, bytes(216))) == ProxyHeader(None, 16 + 216)  # AF_UNIX: the peer
