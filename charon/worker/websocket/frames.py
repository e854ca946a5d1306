"""Walking the frame headers of one direction of a tunnel (RFC 6455 section 5.2).

The tunnel forwards bytes as they come; the walker reads only frame headers on the way (opcode,
FIN, mask bit, length) and skips payloads, except the first two bytes of a Close frame for its
code. It knows where frame boundaries are, so the proxy can add a frame of its own (a Close, a
Ping) without breaking the stream, and it stops at a frame that breaks the proxy's rules.
"""

from __future__ import annotations

import os
import struct

OP_CONTINUATION = 0x0
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006  # never on the wire: the peer vanished without a Close
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class FrameWalker:
    """The frame state of one direction; `masked` says whether its frames must be masked."""

    __slots__ = (
        "masked",
        "max_size",
        "remaining",
        "partial",
        "opcode",
        "fin",
        "mask",
        "close_payload",
        "messages",
        "payload_bytes",
        "close_code",
        "pongs",
        "error",
    )

    def __init__(self, masked: bool, max_size: int) -> None:
        self.masked = masked
        self.max_size = max_size
        self.remaining = 0  # payload bytes of the current frame still to come
        self.partial = b""  # the start of a frame header cut by the end of a read
        self.opcode = 0
        self.fin = True
        self.mask = b""
        self.close_payload = b""
        self.messages = 0
        self.payload_bytes = 0
        self.close_code: int | None = None  # set once a Close frame has passed
        self.pongs = 0
        self.error = 0  # the close code of a rule broken by the frame the walk stopped at

    @property
    def at_boundary(self) -> bool:
        return self.remaining == 0 and not self.partial

    def walk(self, data: bytes, pos: int = 0, stop_at_boundary: bool = False) -> int:
        """Walk data[pos:]; return where the walk stopped.

        That is len(data), or with `stop_at_boundary` the first frame boundary after pos, or the
        start of a frame that breaks the rules (then `error` holds the close code to send).
        """
        end = len(data)
        while pos < end:
            remaining = self.remaining
            if remaining:
                take = end - pos
                if take >= remaining:
                    take = remaining
                if self.opcode == OP_CLOSE and len(self.close_payload) < 2:
                    self.close_payload += data[pos : pos + min(take, 2 - len(self.close_payload))]
                self.remaining = remaining - take
                pos += take
                if not self.remaining:
                    self._frame_end()
                    if stop_at_boundary:
                        return pos
                continue
            start = pos
            pos = self._header(data, pos)
            if pos < 0:  # the rest of the read is the start of a header: kept for the next one
                return end
            if self.error:
                return start
            if not self.remaining:
                self._frame_end()
                if stop_at_boundary:
                    return pos
        return pos

    def _header(self, data: bytes, pos: int) -> int:
        """Parse the header at pos; the position after it, or -1 if it is incomplete."""
        carried = len(self.partial)
        if carried:
            head, at = self.partial + data[pos : pos + 14], 0
        else:
            head, at = data, pos  # read in place: no copy on the common path
        size = len(head) - at
        if size < 2:
            self.partial = head[at:]
            return -1
        b0, b1 = head[at], head[at + 1]
        length = b1 & 0x7F
        masked = b1 & 0x80
        need = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if masked else 0)
        if size < need:
            self.partial = head[at : at + size]
            return -1
        if length == 126:
            length = _U16.unpack_from(head, at + 2)[0]
        elif length == 127:
            length = _U64.unpack_from(head, at + 2)[0]
        self.partial = b""
        if length >> 63 or self.masked and not masked:
            self.error = CLOSE_PROTOCOL_ERROR
        elif length > self.max_size:
            self.error = CLOSE_TOO_BIG
        if self.error:
            return pos
        self.fin = bool(b0 & 0x80)
        self.opcode = b0 & 0x0F
        self.mask = head[at + need - 4 : at + need] if masked else b""
        self.remaining = length
        if self.opcode < OP_CLOSE:  # message bytes: control frames are not counted
            self.payload_bytes += length
        if self.opcode == OP_CLOSE:
            self.close_payload = b""
        return pos + need - carried

    def _frame_end(self) -> None:
        opcode = self.opcode
        if opcode < OP_CLOSE:
            if self.fin:
                self.messages += 1
        elif opcode == OP_CLOSE:
            self.close_code = self._close_code()
        elif opcode == OP_PONG:
            self.pongs += 1

    def _close_code(self) -> int:
        payload = self.close_payload
        if len(payload) < 2:
            return CLOSE_NO_STATUS
        if self.mask:
            payload = bytes(b ^ m for b, m in zip(payload, self.mask, strict=False))
        return int(_U16.unpack(payload)[0])


def matching_pong_size(data: bytes, pos: int, payload: bytes) -> int | None:
    """The size of the masked Pong frame at data[pos] if it carries `payload`, else None.

    Only a Pong wholly inside `data` is recognised; any other is forwarded like other frames.
    """
    if len(data) - pos < 6 or data[pos] != 0x80 | OP_PONG or data[pos + 1] & 0x80 == 0:
        return None
    length = data[pos + 1] & 0x7F
    size = 6 + length
    if length != len(payload) or len(data) - pos < size:
        return None
    key = data[pos + 2 : pos + 6]
    body = data[pos + 6 : pos + size]
    if bytes(b ^ key[i & 3] for i, b in enumerate(body)) != payload:
        return None
    return size


def close_frame(code: int, reason: bytes = b"", masked: bool = False) -> bytes:
    return _control_frame(OP_CLOSE, _U16.pack(code) + reason[:123], masked)


def ping_frame(payload: bytes, masked: bool = False) -> bytes:
    return _control_frame(OP_PING, payload[:125], masked)


def _control_frame(opcode: int, payload: bytes, masked: bool) -> bytes:
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + body
