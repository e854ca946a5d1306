"""Events a worker reports about its traffic.

They are logged at DEBUG level for now; the ZeroMQ event bus to the supervisor (metrics, live
logs) will publish the same records.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from charon.worker.websocket.tunnel import TunnelInfo

log = logging.getLogger("charon.events")


class EventSink:
    def __init__(self) -> None:
        self.websockets_opened = 0
        self.websockets_closed = 0

    def websocket_open(self, info: TunnelInfo) -> None:
        self.websockets_opened += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("websocket open host=%s client=%s path=%s subprotocol=%s",
                      info.host, info.client_ip, info.path, info.subprotocol)

    def websocket_close(self, info: TunnelInfo, summary: dict[str, object]) -> None:
        self.websockets_closed += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("websocket close host=%s client=%s path=%s %s",
                      info.host, info.client_ip, info.path,
                      " ".join(f"{k}={v}" for k, v in summary.items()))
