"""Properties of the engine's frame walker (engine/walk.c), driven over socketpairs
(tests/enginepair.py) with inputs from hypothesis: whatever the frames and wherever the reads
cut them, the bytes go through unchanged, messages and close codes are counted as the frames
say, a proxy frame lands at a true frame boundary, and the walk stops exactly at the first
frame that breaks a rule. Plus the byte counters: bytes that passed, not declared lengths."""

from __future__ import annotations

import os
import struct

from enginepair import (
    NO_LIMIT,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Pair,
    WsFrame,
    cut,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charon.worker.websocket._engine import BACKEND, CLIENT, REFUSED

# Fewer under the ASan build (test_engine_asan.py), where every allocation is checked.
SETTINGS = settings(max_examples=int(os.environ.get("CHARON_WALK_EXAMPLES", "200")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

OPCODES = [OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG]


@st.composite
def frames(draw: st.DrawFn, masked: bool) -> WsFrame:
    opcode = draw(st.sampled_from(OPCODES))
    size = draw(st.sampled_from([0, 1, 2, 5, 125, 126, 300, 65535, 65536, 70000]))
    payload = draw(st.binary(min_size=0, max_size=8)) + bytes(size)
    if opcode == OP_CLOSE and draw(st.booleans()):
        payload = struct.pack("!H", draw(st.integers(0, 0xFFFF))) + payload[:10]
    return WsFrame(opcode, payload, fin=draw(st.booleans()),
                   mask=draw(st.binary(min_size=4, max_size=4)) if masked else None,
                   wide=draw(st.sampled_from([0, 0, 2, 8])))


def expected_counts(sent: list[WsFrame]) -> tuple[int, int, int | None]:
    """(messages, data payload bytes, last close code) as the walker must count them."""
    messages = sum(1 for f in sent if f.opcode < OP_CLOSE and f.fin)
    data = sum(len(f.payload) for f in sent if f.opcode < OP_CLOSE)
    code = None
    for f in sent:
        if f.opcode == OP_CLOSE:
            code = struct.unpack("!H", f.payload[:2])[0] if len(f.payload) >= 2 else 1005
    return messages, data, code


def boundary_index(sent: list[WsFrame], delivered: int) -> int:
    """Where a frame injected after `delivered` bytes must land: before the first frame not
    begun, or not past its header, at that point."""
    at = 0
    for i, f in enumerate(sent):
        header, end = len(f.header()), at + len(f.wire())
        if delivered <= at or (delivered < at + header):
            return i
        if delivered < end:
            return i + 1
        at = end
    return len(sent)


@SETTINGS
@given(st.data())
def test_client_frames_pass_unchanged_and_counted(data: st.DataObject) -> None:
    sent = data.draw(st.lists(frames(masked=True), min_size=1, max_size=8))
    wire = b"".join(f.wire() for f in sent)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    with Pair() as pair:
        for piece in cut(wire, points):
            pair.deliver(CLIENT, piece)
        assert pair.received(BACKEND) == wire
        messages, payload, code = expected_counts(sent)
        t = pair.tunnel
        assert (t.messages_in, t.bytes_in, t.client_close_code) == (messages, payload, code)
        assert t.pongs_in == sum(1 for f in sent if f.opcode == OP_PONG)
        assert pair.reports == []


@SETTINGS
@given(st.data())
def test_backend_frames_pass_unchanged_and_counted(data: st.DataObject) -> None:
    sent = data.draw(st.lists(frames(masked=False), min_size=1, max_size=8))
    wire = b"".join(f.wire() for f in sent)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    with Pair() as pair:
        for piece in cut(wire, points):
            pair.deliver(BACKEND, piece)
        assert pair.received(CLIENT) == wire
        messages, payload, code = expected_counts(sent)
        t = pair.tunnel
        assert (t.messages_out, t.bytes_out, t.backend_close_code) == (messages, payload, code)


@SETTINGS
@given(st.data())
def test_injected_frame_lands_at_a_frame_boundary(data: st.DataObject) -> None:
    """A proxy frame injected toward the backend at any point of the client's stream (a header
    cut in two, a payload half read) comes out between two whole client frames: the first
    boundary at or after what the engine had read."""
    sent = data.draw(st.lists(frames(masked=True), min_size=1, max_size=6))
    wire = b"".join(f.wire() for f in sent)
    at = data.draw(st.integers(0, len(wire)))
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=6))
    proxy = WsFrame(OP_CLOSE, struct.pack("!H", 1001), mask=b"\x01\x02\x03\x04").wire()
    with Pair() as pair:
        for piece in cut(wire[:at], points):
            pair.deliver(CLIENT, piece)
        pair.tunnel.inject(BACKEND, proxy)
        for piece in cut(wire[at:], [p - at for p in points]):
            pair.deliver(CLIENT, piece)
        got = pair.received(BACKEND)
        k = boundary_index(sent, at)
        before = b"".join(f.wire() for f in sent[:k])
        assert got == before + proxy + wire[len(before):]


@SETTINGS
@given(st.data())
def test_walk_stops_at_the_first_frame_that_breaks_a_rule(data: st.DataObject) -> None:
    """Unmasked client frames (1002) and frames over the limit (1009): the frames before the
    first one go through whole, not a byte of it or after it, and the refusal is reported."""
    sent = data.draw(st.lists(frames(masked=True), min_size=1, max_size=6))
    bad_at = data.draw(st.integers(0, len(sent) - 1))
    limit = data.draw(st.sampled_from([NO_LIMIT, 0, 125, 300, 65536]))
    if data.draw(st.booleans()):
        f = sent[bad_at]
        sent[bad_at] = WsFrame(f.opcode, f.payload, f.fin, None, f.wide)
    wire = b"".join(f.wire() for f in sent)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    first_bad, code = len(sent), 0
    for i, f in enumerate(sent):
        if f.mask is None or len(f.payload) > limit:
            first_bad, code = i, 1002 if f.mask is None else 1009
            break
    with Pair(max_frame_size=limit) as pair:
        for piece in cut(wire, points):
            pair.deliver(CLIENT, piece)
            if pair.reports:
                break
        got = pair.received(BACKEND)
        assert got == b"".join(f.wire() for f in sent[:first_bad])
        assert pair.reports == ([(REFUSED, code)] if code else [])


def test_byte_counters_count_bytes_that_passed_not_declared_lengths() -> None:
    """A client frame declaring 2^40 bytes whose peer sends 10 and closes counts 10 bytes, as
    does a backend frame declaring 70000 that stops after 100 (they used to count 2^40 and
    70000 at the header)."""
    with Pair() as pair:
        head = WsFrame(OP_BINARY, b"", mask=b"abcd").header()
        pair.deliver(CLIENT, head[:1] + bytes([0x80 | 127]) + struct.pack("!Q", 1 << 40) + b"abcd")
        pair.deliver(CLIENT, b"0123456789")
        pair.deliver(BACKEND, struct.pack("!BBQ", 0x82, 127, 70000) + bytes(100))
        pair.received(BACKEND)
        pair.received(CLIENT)
        assert (pair.tunnel.bytes_in, pair.tunnel.bytes_out) == (10, 100)
        assert (pair.tunnel.messages_in, pair.tunnel.messages_out) == (0, 0)


@SETTINGS
@given(st.data())
def test_the_pong_to_a_proxy_ping_is_consumed_wherever_reads_cut_it(data: st.DataObject) -> None:
    """After expect_pong(p), the first client Pong carrying p (FIN, masked, a 7-bit length) is
    consumed and no other frame: Pongs with another payload and everything else pass."""
    payload = data.draw(st.binary(min_size=1, max_size=125))
    sent = data.draw(st.lists(frames(masked=True), max_size=5))
    for _ in range(data.draw(st.integers(1, 2))):
        sent.insert(data.draw(st.integers(0, len(sent))),
                    WsFrame(OP_PONG, payload, mask=data.draw(st.binary(min_size=4, max_size=4))))
    wire = b"".join(f.wire() for f in sent)
    points = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    consumed = next(i for i, f in enumerate(sent)
                    if f.opcode == OP_PONG and f.fin and f.wide == 0 and f.payload == payload)
    with Pair() as pair:
        pair.tunnel.expect_pong(payload)
        for piece in cut(wire, points):
            pair.deliver(CLIENT, piece)
        assert pair.received(BACKEND) == b"".join(
            f.wire() for i, f in enumerate(sent) if i != consumed)
        assert pair.tunnel.pongs_in == sum(1 for f in sent if f.opcode == OP_PONG)
