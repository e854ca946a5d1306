"""The admin listener, served by the supervisor: /healthz here, more routes from its sections."""

from __future__ import annotations

import os
from typing import Protocol

from aiohttp import web, web_response

from charon.config.model import ListenAddress
from charon.supervisor.sockets import ListenError

# aiohttp's Server header names its version and Python's (a gift to whoever scans for known
# bugs). Every response it writes takes that default, the 400s of its own parser included,
# which no handler, middleware or signal sees: the default itself is replaced.
SERVER_HEADER = "charon"
web_response.SERVER_SOFTWARE = SERVER_HEADER


class WorkerStatus(Protocol):
    def ready_workers(self) -> int: ...

    def worker_pids(self) -> list[int]: ...

    def reload_status(self) -> dict[str, object]: ...


class AdminSection(Protocol):
    """A part of the admin listener (metrics, live logs) that brings its own routes."""

    def add_routes(self, app: web.Application) -> None: ...


class AdminServer:
    def __init__(
        self, address: ListenAddress, status: WorkerStatus, sections: list[AdminSection]
    ) -> None:
        self.address = address
        self.status = status
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        for section in sections:
            section.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address.host, self.address.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenError(f"cannot listen on {self.address} (admin): {reason}") from exc

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        ready = self.status.ready_workers()
        body = {
            "status": "ok" if ready else "starting",
            "workers_ready": ready,
            "worker_pids": self.status.worker_pids(),
            "reloads": self.status.reload_status(),
        }
        return web.json_response(body, status=200 if ready else 503)
