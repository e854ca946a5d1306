"""What a TLS client connection negotiated, as the engine's handshake reported it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TlsInfo:
    server_name: str | None  # the SNI name the client sent (lowercase), None without SNI
    alpn: str | None  # the protocol ALPN chose ("http/1.1"), None when not offered
    version: str  # "TLSv1.2", "TLSv1.3"
    cipher: str  # OpenSSL's name of the suite
    resumed: bool  # the session was resumed (ticket or cache)
