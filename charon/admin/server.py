"""The admin listener, served by the supervisor: GET /healthz (metrics and live logs come later)."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

from charon.config.model import ListenAddress


class WorkerStatus(Protocol):
    def ready_workers(self) -> int: ...

    def worker_pids(self) -> list[int]: ...


class AdminServer:
    def __init__(self, address: ListenAddress, status: WorkerStatus) -> None:
        self.address = address
        self.status = status
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.address.host, self.address.port, reuse_address=True)
        await site.start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        ready = self.status.ready_workers()
        body = {"status": "ok" if ready else "starting", "workers_ready": ready,
                "worker_pids": self.status.worker_pids()}
        return web.json_response(body, status=200 if ready else 503)
