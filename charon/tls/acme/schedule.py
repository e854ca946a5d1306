"""When each `tls = "auto"` host gets a certificate: one task per host, orders one at a time.

A host without a usable certificate (none, another set of names, expired) orders at once. A
host with one renews at two thirds of its lifetime, or within the window the ACME server
suggests when it offers renewal information (RFC 9773, ARI). A failed order is retried after a
back-off that starts at one minute and doubles up to an hour; the certificate on disk is kept
meanwhile (the workers go on serving it). Stopping cancels the tasks; an ACME request in flight
ends by its own timeout in the client's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from charon.tls.acme import store
from charon.tls.acme.store import CertificateInfo

if TYPE_CHECKING:  # (the client is imported when a schedule starts: see certificates.py)
    from charon.tls.acme.client import AcmeSettings, Publish

log = logging.getLogger("charon.acme")

BACKOFF_BASE = 60.0  # seconds after the first failure; doubling
BACKOFF_STEPS = 6  # up to base * 2**6 = 64 min, capped at BACKOFF_CAP_FACTOR * base
BACKOFF_CAP_FACTOR = 60.0  # one hour for the default base
MAX_SLEEP = 6 * 3600.0  # a long wait is taken in parts: the renewal time is asked again
RENEW_FRACTION = 2 / 3

OBTAINED, RENEWED, FAILED = "obtained", "renewed", "failed"

# (event, host, certificate or None, error or "")
OnEvent = Callable[[str, str, CertificateInfo | None, str], None]


@dataclass(frozen=True)
class AutoHost:
    name: str  # the host's first domain: its folder under the state directory
    domains: tuple[str, ...]


@dataclass
class HostStatus:
    host: AutoHost
    certificate: CertificateInfo | None = None
    renew_at: float | None = None  # Unix time
    failures: int = 0  # in a row
    retry_at: float | None = None  # after a failure
    last_error: str = ""
    ordering: bool = False


def backoff_base() -> float:
    value = os.environ.get("CHARON_ACME_BACKOFF_BASE", "")
    try:
        base = float(value) if value else BACKOFF_BASE
    except ValueError:
        base = BACKOFF_BASE
    return base if base > 0 else BACKOFF_BASE


def backoff_delay(base: float, failures: int) -> float:
    return min(base * 2 ** min(failures - 1, BACKOFF_STEPS), base * BACKOFF_CAP_FACTOR)


def usable(info: CertificateInfo | None, host: AutoHost, now: float) -> bool:
    return info is not None and set(info.domains) == set(host.domains) and info.not_after > now


class Scheduler:
    def __init__(
        self, settings: AcmeSettings, hosts: Sequence[AutoHost], challenge: str,
        publish: Publish, on_event: OnEvent, backoff: float | None = None,
    ) -> None:
        self.settings = settings
        self.challenge = challenge
        self.publish = publish
        self.on_event = on_event
        self.backoff = backoff if backoff is not None else backoff_base()
        from charon.tls.acme.client import AcmeClient

        self.client = AcmeClient(settings)
        self.status = {host.name: HostStatus(host) for host in hosts}
        self._order_lock = asyncio.Lock()  # one order at a time: one account, one thread
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for status in self.status.values():
            task = asyncio.create_task(self._run(status), name=f"acme {status.host.name}")
            self._tasks.append(task)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self.client.close()

    async def _run(self, status: HostStatus) -> None:
        host = status.host
        wildcards = [d for d in host.domains if d.startswith("*.")]
        if wildcards:
            status.last_error = f"{', '.join(wildcards)}: wildcard names need DNS-01"
            self.on_event(FAILED, host.name, None, status.last_error)
            return
        status.certificate = store.load(self.settings.state_dir, host.name)
        if usable(status.certificate, host, time.time()):
            status.renew_at = await self._renew_at(status)
        while True:
            now = time.time()
            due = self._due(status, now)
            if due > now:
                await asyncio.sleep(min(due - now, MAX_SLEEP))
                if status.retry_at is None and usable(status.certificate, host, time.time()):
                    status.renew_at = await self._renew_at(status)
                continue
            await self._order(status)

    def _due(self, status: HostStatus, now: float) -> float:
        if status.retry_at is not None:
            return status.retry_at
        if not usable(status.certificate, status.host, now) or status.renew_at is None:
            return now
        return status.renew_at

    async def _order(self, status: HostStatus) -> None:
        host = status.host
        renewing = status.certificate is not None
        try:
            async with self._order_lock:
                status.ordering = True
                info = await self.client.obtain(
                    host.name, host.domains, self.challenge, self.publish
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.client.forget()
            status.failures += 1
            delay = backoff_delay(self.backoff, status.failures)
            status.retry_at = time.time() + delay
            status.last_error = _reason(exc)
            log.warning(
                "ACME order for %s failed (%d in a row): %s; next try in %.0fs",
                host.name, status.failures, status.last_error, delay,
            )
            self.on_event(FAILED, host.name, status.certificate, status.last_error)
            return
        finally:
            status.ordering = False
        status.certificate = info
        status.failures = 0
        status.retry_at = None
        status.last_error = ""
        status.renew_at = await self._renew_at(status)
        log.info(
            "certificate for %s %s by %s, valid until %s", host.name,
            RENEWED if renewing else OBTAINED, info.issuer, time.ctime(info.not_after),
        )
        self.on_event(RENEWED if renewing else OBTAINED, host.name, info, "")

    async def _renew_at(self, status: HostStatus) -> float:
        info = status.certificate
        assert info is not None
        default = info.not_before + info.lifetime * RENEW_FRACTION
        suggested = await self.client.renewal_time(status.host.name)
        return suggested if suggested is not None else default


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
