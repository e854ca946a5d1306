"""systemd integration without libsystemd: the notify protocol and socket activation.

Both are small documented protocols (sd_notify(3), sd_listen_fds(3)): a datagram of
`KEY=VALUE` lines to $NOTIFY_SOCKET, and sockets passed from fd 3 on with $LISTEN_FDS.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from charon.config.model import ListenAddress

log = logging.getLogger("charon.supervisor")

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends state changes to systemd when run as a Type=notify service; otherwise does nothing."""

    def __init__(self) -> None:
        address = os.environ.pop("NOTIFY_SOCKET", "")  # not for the workers
        self._address: str | None = None
        self._socket: socket.socket | None = None
        if address:
            # An abstract socket is written with a leading "@".
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, **fields: str | int) -> None:
        if self._socket is None or self._address is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)

    def ready(self, status: str) -> None:
        self.notify(ready=1, status=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd tell this reload from an earlier one (Type=notify-reload).
        self.notify(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.notify(stopping=1)

    def status(self, text: str) -> None:
        self.notify(status=text)


def inherited_listeners() -> dict[tuple[str, int], socket.socket]:
    """Listening sockets passed by systemd socket activation, by (host, port); empty if none."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    found: dict[tuple[str, int], socket.socket] = {}
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            continue
        host, port = sock.getsockname()[:2]
        sock.set_inheritable(True)
        found[(host, port)] = sock
    return found


def take_inherited(
    inherited: dict[tuple[str, int], socket.socket], address: ListenAddress
) -> socket.socket | None:
    """The socket systemd passed for this address, if any (0.0.0.0 and :: match exactly)."""
    return inherited.pop((address.host, address.port), None)
