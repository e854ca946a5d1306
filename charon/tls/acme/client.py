"""The ACME client: an account, then orders for a proxy host's domains (RFC 8555).

The `acme` library's calls block (requests), so each step runs in one thread of its own
executor while the supervisor's loop goes on; between the steps the loop publishes the
challenge files to the workers (`publish()`, which returns once every worker confirmed). Every
network call has a timeout and every poll a deadline.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import josepy as jose
from acme import client as acme_client
from acme import crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import charon
from charon.tls.acme import challenges, store
from charon.tls.acme.store import CertificateInfo
from charon.tls.paths import account_dir, certificate_dir

log = logging.getLogger("charon.acme")

NETWORK_TIMEOUT = 10  # seconds, each request to the ACME server
ORDER_DEADLINE = 90.0  # seconds from answering the challenges to holding the certificate
POLL_INTERVAL = 0.5  # seconds between two looks at a pending authorization
POLL_STEP = 3  # seconds the library polls a finalizing order before the loop looks again
USER_AGENT = f"charon/{charon.__version__}"

Publish = Callable[[], Awaitable[None]]
T = TypeVar("T")


@dataclass(frozen=True)
class AcmeSettings:
    directory: str
    state_dir: str
    email: str | None = None
    ca_bundle: str | None = None  # PEM CAs for the ACME server's HTTPS (a private one)


class AcmeError(Exception):
    """An order that did not end with a certificate, with a short reason."""


def new_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


class AcmeClient:
    """One ACME account at one directory; `obtain()` gets a certificate for a host."""

    def __init__(self, settings: AcmeSettings) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="charon-acme")
        self._client: acme_client.ClientV2 | None = None
        self._key: jose.JWKEC | None = None

    def close(self) -> None:
        # A request in flight ends by its own timeout; nobody waits for it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, step: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, step, *args)

    # -- the account (blocking) --------------------------------------------------------------

    def _account_key(self) -> jose.JWKEC:
        if self._key is None:
            path = account_dir(self.settings.state_dir, self.settings.directory) / "key.pem"
            try:
                pem = path.read_bytes()
            except FileNotFoundError:
                pem = new_key_pem()
                store.write_atomic(path, pem, 0o600)
            key = serialization.load_pem_private_key(pem, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise AcmeError(f"{path}: the account key is not an EC key")
            self._key = jose.JWKEC(key=key)
        return self._key

    def _connect(self) -> acme_client.ClientV2:
        """The client with its account: registering finds the existing account of this key
        (the server answers with its URL), so a server that forgot it gets it anew."""
        if self._client is not None:
            return self._client
        key = self._account_key()
        net = acme_client.ClientNetwork(
            key, alg=jose.ES256, user_agent=USER_AGENT, timeout=NETWORK_TIMEOUT
        )
        if self.settings.ca_bundle:
            net.verify_ssl = self.settings.ca_bundle  # type: ignore[assignment]  # requests' verify= takes a CA file
        directory = acme_client.ClientV2.get_directory(self.settings.directory, net)
        client = acme_client.ClientV2(directory, net)
        contact = (f"mailto:{self.settings.email}",) if self.settings.email else ()
        registration = messages.NewRegistration.from_data(
            email=self.settings.email, terms_of_service_agreed=True
        )
        try:
            regr = client.new_account(registration)
        except errors.ConflictError as conflict:
            regr = messages.RegistrationResource(
                uri=conflict.location, body=messages.Registration()
            )
            net.account = regr
        folder = account_dir(self.settings.state_dir, self.settings.directory)
        store.write_atomic(
            folder / "account.json",
            json.dumps({"uri": regr.uri, "directory": self.settings.directory,
                        "contact": list(contact)}).encode("utf-8"),
            0o600,
        )
        self._client = client
        return client

    def forget(self) -> None:
        """After a failure: the next order starts with a fresh directory, nonce and account
        lookup (the server may have restarted and lost them)."""
        self._client = None

    def has_renewal_info(self) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            client.directory["renewalInfo"]
        except KeyError:
            return False
        return True

    # -- an order ----------------------------------------------------------------------------

    async def obtain(
        self, host: str, domains: Sequence[str], challenge: str, publish: Publish
    ) -> CertificateInfo:
        """A new certificate for `domains`, stored under the host's folder; AcmeError (or an
        error of the acme library or the network) when the order fails."""
        key_pem = new_key_pem()
        csr = crypto_util.make_csr(key_pem, list(domains))
        client = await self._run(self._connect)
        order = await self._run(client.new_order, csr)
        written: list[Any] = []
        answers: list[tuple[messages.ChallengeBody, Any]] = []
        account_key = self._account_key()
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # an authorization the server still holds from an earlier order
                body = _pick(authz, challenge)
                chall = body.chall
                assert isinstance(chall, challenges.challenges.KeyAuthorizationChallenge)
                key_authorization = chall.key_authorization(account_key)
                written += challenges.write(
                    self.settings.state_dir, challenge, authz.body.identifier.value,
                    chall.encode("token"), key_authorization,
                )
                answers.append((body, chall.response(account_key)))
            if written:
                await publish()
            for body, response in answers:
                await self._run(client.answer_challenge, body, response)
            deadline = time.monotonic() + ORDER_DEADLINE
            order = await self._authorized(client, order, deadline)
            order = await self._finalized(client, order, deadline)
        finally:
            challenges.remove_all(written)
        meta: dict[str, object] = {"directory": self.settings.directory, "challenge": challenge,
                "obtained_at": datetime.datetime.now(datetime.UTC).isoformat()}
        info = store.save(
            self.settings.state_dir, host, order.fullchain_pem.encode("ascii"), key_pem, meta
        )
        if written:
            await publish()  # the workers drop the challenge certificates they loaded
        return info

    # The library's own polling loops sleep in the thread until their deadline; these poll
    # one request at a time and wait on the loop, so stopping the schedule ends them at once.

    async def _authorized(
        self, client: acme_client.ClientV2, order: messages.OrderResource, deadline: float
    ) -> messages.OrderResource:
        done = []
        for authz in order.authorizations:
            while authz.body.status == messages.STATUS_PENDING:
                if time.monotonic() > deadline:
                    raise AcmeError(f"no validation within {ORDER_DEADLINE:.0f}s")
                await asyncio.sleep(POLL_INTERVAL)
                authz, _ = await self._run(client.poll, authz)
            if authz.body.status != messages.STATUS_VALID:
                raise AcmeError(f"validation failed: {_validation_reason(authz)}")
            done.append(authz)
        return order.update(authorizations=done)

    async def _finalized(
        self, client: acme_client.ClientV2, order: messages.OrderResource, deadline: float
    ) -> messages.OrderResource:
        order = await self._run(client.begin_finalization, order)
        while True:
            step = datetime.datetime.now() + datetime.timedelta(seconds=POLL_STEP)
            try:
                return await self._run(client.poll_finalization, order, step)
            except errors.TimeoutError:
                if time.monotonic() > deadline:
                    raise AcmeError(f"no certificate within {ORDER_DEADLINE:.0f}s") from None

    async def renewal_time(self, host: str) -> float | None:
        """ARI's suggested renewal time (RFC 9773) for the host's certificate, Unix time; None
        when the server offers no renewal information or asking it failed."""
        try:
            client = await self._run(self._connect)
            if not self.has_renewal_info():
                return None
            pem = (certificate_dir(self.settings.state_dir, host) / store.CERT_FILE).read_bytes()
            when, _ = await self._run(client.renewal_time, pem)
        except Exception as exc:  # ARI is advice: without it the 2/3 rule applies
            log.info("renewal information for %s not available: %s", host, exc)
            return None
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.astimezone()
        return float(when.timestamp())


def _pick(authz: messages.AuthorizationResource, kind: str) -> messages.ChallengeBody:
    for body in authz.body.challenges:
        if body.chall.typ == kind:
            return body
    offered = ", ".join(str(b.chall.typ) for b in authz.body.challenges)
    raise AcmeError(
        f"the ACME server offers no {kind} challenge for {authz.body.identifier.value} "
        f"(offered: {offered or 'none'})"
    )


def _validation_reason(authz: messages.AuthorizationResource) -> str:
    name = authz.body.identifier.value
    for body in authz.body.challenges:
        if body.error is not None:
            return f"{name}: {body.error.detail or body.error.typ}"
    return f"{name}: {authz.body.status}"
