"""WebSocket frames the proxy writes itself (RFC 6455 section 5), and the close codes it uses.

Frames passing through a tunnel are walked by the engine (`_engine.c`); the proxy only adds
control frames of its own (Close, Ping), and only at a frame boundary of that direction.
"""

from __future__ import annotations

import os
import struct

OP_CLOSE = 0x8
OP_PING = 0x9

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_ABNORMAL = 1006  # never on the wire: the peer vanished without a Close
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

_U16 = struct.Struct("!H")


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
