"""The supervisor's ACME schedule: started once workers serve (HTTP-01 and
TLS-ALPN-01 need a listener that answers), started anew when a reload changes the `tls =
"auto"` hosts or the ACME settings, stopped at shutdown. Its `publish()` pushes the current
config to every worker in place (inplace.push_tls_state), which makes them load the challenge
and certificate files from the state directory.

The challenge type follows the listeners: HTTP-01 when there is a plain listener, else
TLS-ALPN-01. CHARON_ACME_CHALLENGE (http-01 or tls-alpn-01) forces one, for tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from charon.admin.certificates import CertificateSection
from charon.config import Config
from charon.supervisor.inplace import push_tls_state

if TYPE_CHECKING:
    # (imported when a host asks for ACME: the acme library pulls in urllib3, which binds a
    # probe socket to [::1]:0 when imported, before a config is even checked)
    from charon.supervisor.arbiter import Arbiter
    from charon.tls.acme.client import AcmeSettings
    from charon.tls.acme.schedule import AutoHost, HostStatus, Scheduler

    Plan = tuple[AcmeSettings, tuple[AutoHost, ...], str]

log = logging.getLogger("charon.supervisor")


def plan(config: Config) -> Plan | None:
    """What the schedule depends on; None when no host asks for ACME."""
    auto = [h for h in config.hosts if h.tls is not None and h.tls.auto]
    if not auto:
        return None
    from charon.tls.acme.challenges import HTTP01, TLS_ALPN01
    from charon.tls.acme.client import AcmeSettings
    from charon.tls.acme.schedule import AutoHost

    hosts = tuple(AutoHost(h.name, h.domains) for h in auto)
    tls = config.tls
    settings = AcmeSettings(tls.acme_directory, tls.state_dir, tls.email, tls.acme_ca_bundle)
    forced = os.environ.get("CHARON_ACME_CHALLENGE", "")
    if forced in (HTTP01, TLS_ALPN01):
        challenge = forced
    else:
        challenge = HTTP01 if config.server.listen else TLS_ALPN01
    return settings, hosts, challenge


class CertificateManager:
    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter
        self.section = CertificateSection(arbiter.hub, arbiter.config)
        self.section.schedule = self.status
        arbiter.sections.append(self.section)
        arbiter.metrics.extra.append(self.section.collector)
        self.scheduler: Scheduler | None = None
        self._plan: Plan | None = None
        self._started = False

    def status(self) -> Mapping[str, HostStatus]:
        return self.scheduler.status if self.scheduler is not None else {}

    def tick(self) -> None:
        """Each turn of the supervisor's loop: start once a worker serves (one that keeps
        failing to start must not hold the certificates back)."""
        arbiter = self.arbiter
        if self._started or arbiter.stopping or arbiter.ready_workers() == 0:
            return
        self._started = True
        self._start(arbiter.config)

    def _start(self, config: Config) -> None:
        self._plan = plan(config)
        if self._plan is None:
            return
        settings, hosts, challenge = self._plan
        from charon.tls.acme.schedule import Scheduler

        self.scheduler = Scheduler(
            settings, hosts, challenge, self._publish, self.section.record
        )
        log.info(
            "ACME for %s at %s (%s)", ", ".join(h.name for h in hosts), settings.directory,
            challenge,
        )
        self.scheduler.start()

    async def _publish(self) -> None:
        await push_tls_state(self.arbiter)

    async def config_changed(self, config: Config) -> None:
        """A reload was accepted: restart the schedule if what it depends on changed."""
        self.section.config = config
        if not self._started or plan(config) == self._plan:
            return
        await self.stop()
        self._start(config)

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
