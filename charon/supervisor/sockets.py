"""Listening sockets: bound once by the supervisor, inherited by every worker (decision 1)."""

from __future__ import annotations

import socket

from charon.config.model import ListenAddress

BACKLOG = 4096


class ListenError(Exception):
    pass


def bind_listener(address: ListenAddress) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, inheritable by the workers' exec."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # So that a successor supervisor can bind beside this one during an upgrade.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock
