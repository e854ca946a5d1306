"""Basic authentication (RFC 7617) for routes with `rules.basic_auth`.

A credential verified once is remembered (bounded LRU, 10 minutes), keyed by `hash()` of the
whole `Authorization` value: the password itself is never kept, and a repeat costs a hash and a
dict lookup. Python hashes bytes with SipHash-1-3 keyed by a random secret drawn when the
supervisor starts (PEP 456; its workers inherit it). No client sees a hash (even with the
secret fixed by PYTHONHASHSEED, the remembered values are unknown to it), so another value
lands on a remembered key only by guessing online: about 2^54 requests for a full cache of
1,024, and failed logins are budgeted per IP besides. (A keyed BLAKE2b cost 0.6-0.9 µs more
per request, a sixth of the budget of a guarded request: bench/RESULTS.md, issue 14.)

Anything else is verified off the loop in a small thread pool (bcrypt and argon2 release the
GIL) through `plan.waits`. An unknown user is verified against a dummy hash of the same kind and
cost as the route's first user, so the time taken says nothing about which names exist.
Failures are counted per client IP; past the budget a client gets 429 without any verification.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

import argon2
import bcrypt

from charon.worker.access.failures import FailureCounter, failure_counter
from charon.worker.http.errors import HttpError

if TYPE_CHECKING:
    from charon.config.rules import BasicAuth
    from charon.worker.http.headers import Header
    from charon.worker.http.request import RequestPlan

CACHE_SIZE = 1024  # verified credentials remembered per route
CACHE_TTL = 600.0  # seconds a verified credential is trusted without verifying again
THREADS = 2  # verifications at once per worker
MAX_WAITING = 64  # verifications queued or running per worker; more get 503
BCRYPT_MAX = 72  # bytes of a password bcrypt looks at (others truncate: so do we)


class Verifier:
    """The worker's thread pool, made on first use (after the fork), and its queue bound."""

    def __init__(self, threads: int = THREADS, max_waiting: int = MAX_WAITING) -> None:
        self.threads = threads
        self.max_waiting = max_waiting
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.waiting = 0

    def reserve(self) -> bool:
        with self._lock:
            if self.waiting >= self.max_waiting:
                return False
            self.waiting += 1
            return True

    async def check(self, password: bytes, hashed: str | None, like: str) -> bool:
        """Run `verify` in the pool (a slot taken by `reserve` first; given back here);
        `hashed` None: an unknown user, verified against a dummy hash made `like` that one."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="charon-auth")
        future = self._pool.submit(_check, password, hashed, like)
        # (Called once, when it ran or when a client that left cancelled it still queued.)
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def _release(self, _future: object) -> None:
        with self._lock:
            self.waiting -= 1


def _check(password: bytes, hashed: str | None, like: str) -> bool:
    # Made (once) whoever asks: the first attempt takes as long for a known user.
    dummy = dummy_for(like)
    if hashed is None:
        verify(password, dummy)
        return False
    return verify(password, hashed)


_verifier: Verifier | None = None


def verifier() -> Verifier:
    global _verifier
    if _verifier is None:
        _verifier = Verifier()
    return _verifier


def verify(password: bytes, hashed: str) -> bool:
    """`password` matches the bcrypt or argon2 `hashed` (run in a pool thread)."""
    if hashed.startswith("$argon2"):
        try:
            return bool(argon2.PasswordHasher().verify(hashed, password))
        except argon2.exceptions.VerificationError:
            return False
        except argon2.exceptions.InvalidHashError:
            return False
    try:
        return bcrypt.checkpw(password[:BCRYPT_MAX], hashed.encode("ascii"))
    except ValueError:  # (a NUL in the password, a hash bcrypt refuses)
        return False


_dummies: dict[str, str] = {}
_dummy_lock = threading.Lock()


def dummy_for(hashed: str) -> str:
    """A hash of a random password with `hashed`'s kind and cost (made once per kind)."""
    if hashed.startswith("$argon2"):
        params = argon2.extract_parameters(hashed)
        kind = f"argon2:{params}"
    else:
        kind = hashed[:7]  # "$2b$12$": prefix and cost
    dummy = _dummies.get(kind)
    if dummy is not None:
        return dummy
    with _dummy_lock:
        dummy = _dummies.get(kind)
        if dummy is None:
            password = secrets.token_bytes(16)
            if hashed.startswith("$argon2"):
                dummy = argon2.PasswordHasher.from_parameters(params).hash(password)
            else:
                prefix, cost = hashed[1:3], int(hashed[4:6])
                salt = bcrypt.gensalt(cost, prefix.encode() if prefix != "2y" else b"2b")
                dummy = bcrypt.hashpw(password, salt).decode("ascii")
            _dummies[kind] = dummy
    return dummy


def parse(value: bytes) -> tuple[str, bytes] | None:
    """(user, password) of an `Authorization: Basic ...` value; None when malformed."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
        user, colon, password = decoded.partition(b":")
        if not colon:
            return None
        return user.decode("utf-8"), password
    except (binascii.Error, ValueError):  # (UnicodeDecodeError is a ValueError)
        return None


class BasicAuthCheck:
    """The check of one route (worker/access/checks.py): admit a remembered credential at once,
    leave any other to a wait; refuse a request without one."""

    __slots__ = ("users", "dummy_of", "realm", "failures", "cache", "verifying",
                 "_unauthorized")

    def __init__(self, auth: BasicAuth, failures: FailureCounter | None = None) -> None:
        self.users = dict(auth.users)
        self.dummy_of = auth.users[0][1] if auth.users else "$2b$12$"  # (no users: all refused)
        self.realm = auth.realm
        self.failures = failures or failure_counter()
        # hash(Authorization) -> when it expires (per route: one route's credential is not
        # another's)
        self.cache: OrderedDict[int, float] = OrderedDict()
        # The verifications running, by the same key: requests carrying a credential being
        # verified wait for that verification (a browser's parallel connections, a client's
        # first burst cost one bcrypt, not one each). At most MAX_WAITING per worker.
        self.verifying: dict[int, _Verification] = {}
        challenge = f'WWW-Authenticate: Basic realm="{auth.realm}", charset="UTF-8"\r\n'
        self._unauthorized = challenge.encode("ascii")

    def __call__(self, plan: RequestPlan, headers: list[Header]) -> None:
        value = plan.authorization
        if value is None:
            raise self.unauthorized()
        key = hash(value)
        cache = self.cache
        expires = cache.get(key)
        if expires is not None:
            if expires > time.monotonic():
                cache.move_to_end(key)
                return
            del cache[key]
        wait = self.failures.blocked(plan.client_ip)
        if wait:
            raise too_many(wait)
        credentials = parse(value)
        if credentials is None:
            self.failures.take(plan.client_ip)
            raise self.unauthorized()
        user, password = credentials
        hashed = self.users.get(user)

        async def check(plan: RequestPlan) -> HttpError | None:
            verification = self.verifying.get(key)
            if verification is None:
                pool = verifier()
                if not pool.reserve():
                    return HttpError(503, close=False, fields=b"Retry-After: 1\r\n",
                                     body=b"503 Service Unavailable: too many logins at once\n",
                                     denied="auth")
                verification = _Verification(pool.check(password, hashed, self.dummy_of))
                self.verifying[key] = verification
                verification.verdict.add_done_callback(partial(self._verified, key))
            if await verification.wait():
                return None
            self.failures.take(plan.client_ip)
            return self.unauthorized()

        if plan.waits is None:
            plan.waits = [check]
        else:
            plan.waits.append(check)

    def remembers(self, value: bytes | None) -> bool:
        """`value` (an Authorization field) is a credential verified and still remembered."""
        if value is None:
            return False
        expires = self.cache.get(hash(value))
        return expires is not None and expires > time.monotonic()

    def _verified(self, key: int, verdict: asyncio.Future[bool]) -> None:
        running = self.verifying.get(key)
        if running is not None and running.verdict is verdict:
            del self.verifying[key]
        if not verdict.cancelled() and verdict.exception() is None and verdict.result():
            self.remember(key)

    def remember(self, key: int) -> None:
        cache = self.cache
        cache[key] = time.monotonic() + CACHE_TTL
        cache.move_to_end(key)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)

    def unauthorized(self) -> HttpError:
        return HttpError(401, close=False, fields=self._unauthorized,
                         body=b"401 Unauthorized: authentication required\n", denied="auth")


class _Verification:
    """One verification and the requests waiting for it; cancelled (a slot given back if it
    is still queued) when the last of them leaves."""

    __slots__ = ("verdict", "waiters")

    def __init__(self, check: Coroutine[Any, Any, bool]) -> None:
        self.verdict: asyncio.Future[bool] = asyncio.ensure_future(check)
        self.waiters = 0

    async def wait(self) -> bool:
        self.waiters += 1
        try:
            return await asyncio.shield(self.verdict)
        finally:
            self.waiters -= 1
            if not self.waiters and not self.verdict.done():
                self.verdict.cancel()


def too_many(wait: float) -> HttpError:
    seconds = max(1, math.ceil(wait))
    return HttpError(429, close=False, fields=b"Retry-After: %d\r\n" % seconds,
                     body=b"429 Too Many Requests: too many failed logins\n", denied="auth")
