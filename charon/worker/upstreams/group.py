"""The targets of one route and the worker's state for each (issue 13).

A `TargetGroup` is made per route when the router builds a host's routes (on the host's first
request), from the config's `Backends`. Each target gets a `TargetState`: the worker's pool
for its address, its `TargetHealth` (shared by every route naming the same (backends name,
URL), and kept across reloads), its per-target telemetry totals and `active`, the in-flight
requests and open tunnels it has in this worker (least_conn, max_connections).

`choose` is the group's policy (selection.py), bound once; a group of one target is
`single`, and the request planner takes it without a call while it is up.
"""

from __future__ import annotations

import ipaddress
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from charon.worker.telemetry import TargetTotals
from charon.worker.upstreams.cookie import cookie_value, set_cookie_field
from charon.worker.upstreams.health import HealthBoard, TargetHealth, TargetKey
from charon.worker.upstreams.selection import (
    cycle,
    least_loaded,
    ready,
    rendezvous_rank,
    second_choice,
    smooth_weighted,
    stable_hash,
)

if TYPE_CHECKING:
    from charon.config.model import Backends, Target, Upstream
    from charon.worker.upstreams.pool import UpstreamPool

RANK_CACHE = 4096  # keys whose rendezvous ranking is kept (ip_hash, header_hash)
BUDGET_CAP = 100.0  # retry tokens a quiet group can save up
RETRY_FLOOR = 3  # retries per second allowed whatever the budget says
NO_TARGET_RETRY_AFTER = 10  # Retry-After when every target is drained
RAMP_CHECK = 0.1  # seconds between looks for a target in its slow_start ramp


def is_ip_literal(host: str) -> bool:
    """Whether the engine can dial `host` as it is (inet_pton: no name, no zone id)."""
    try:
        return "%" not in host and ipaddress.ip_address(host) is not None
    except ValueError:
        return False


class TargetState:
    """One target of a group, in this worker."""

    __slots__ = (
        "target", "upstream", "url", "key", "pool", "health", "totals", "active", "weight",
        "cap", "current", "seed", "cookie", "dialable",
    )

    def __init__(
        self,
        target: Target,
        key: TargetKey,
        pool: UpstreamPool,
        health: TargetHealth,
        totals: TargetTotals,
        cookie: bytes,
    ) -> None:
        self.target = target
        self.upstream = target.upstream
        self.url = target.upstream.url
        self.key = key
        self.pool = pool
        self.health = health
        self.totals = totals  # telemetry.py: requests, durations and tunnels for its labels
        self.active = 0  # in-flight requests and open tunnels here, in this worker
        self.weight = target.weight
        self.cap = target.max_connections  # 0: none
        self.current = 0.0  # smooth weighted round robin's running score
        self.seed = stable_hash(self.url.encode())  # rendezvous hashing
        self.cookie = cookie  # the sticky cookie's value naming it
        self.dialable = not self.upstream.tls and is_ip_literal(self.upstream.host)

    def __repr__(self) -> str:
        return f"<TargetState {self.key} active={self.active}>"


class TargetGroup:
    """A route's targets and its `lb_policy`."""

    __slots__ = (
        "backends", "states", "single", "choose", "passive", "slow_start", "key_ip",
        "key_field", "key_special", "cookie_name", "set_cookie", "by_url", "dialable",
        "requests", "_primaries", "_backups", "_cycle", "_cursor", "_clock", "_rng",
        "_ranks", "_by_cookie", "_hashed", "_tokens", "_seen", "_floor_at", "_floor_used",
        "_ramp", "_ramp_checked",
    )

    def __init__(
        self,
        backends: Backends,
        states: tuple[TargetState, ...],
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.backends = backends
        self.states = states
        several = len(states) > 1
        # Drained targets take nothing new: never candidates (open tunnels keep their state).
        self._primaries = tuple(s for s in states if not s.target.backup and not s.target.drain)
        self._backups = tuple(s for s in states if s.target.backup and not s.target.drain)
        only = states[0] if len(states) == 1 else None
        # One target: taken without a choice while the supervisor says it is up. As nginx does
        # for a lone server, its passive failures never take it out (it would only turn 502s
        # into 503s); an active check still can.
        self.single = only if only is not None and not only.target.drain and not only.cap else None
        self.passive = several and backends.max_fails > 0 and backends.fail_timeout > 0
        self.slow_start = backends.slow_start if several else 0.0
        self._cycle = tuple(self._primaries[i] for i in cycle([s.weight for s in self._primaries]))
        self._cursor = 0
        self._ramp = False
        self._ramp_checked = -RAMP_CHECK
        self._clock = clock
        self._rng = rng or random.Random()
        self._ranks: dict[bytes, tuple[TargetState, ...]] = {}
        self.by_url = {s.url: s for s in states}
        self._by_cookie = {s.cookie: s for s in self._primaries + self._backups}
        self.dialable = all(s.dialable for s in states)  # the front door may dial any of them
        # What the policy needs from the request (request.py finds it in its one header pass).
        policy = backends.policy
        self.key_ip = policy == "ip_hash"
        self.key_field: bytes | None = None  # a request field's lowercase name
        self.key_special = 0  # that field's kind in request.py, once it registered it
        self.cookie_name = backends.cookie_name.encode("latin-1")
        self.set_cookie = policy == "cookie"
        if policy == "header_hash" and backends.hash_header:
            self.key_field = backends.hash_header.lower().encode("latin-1")
        elif policy == "cookie":
            self.key_field = b"cookie"
        self._hashed = policy in ("ip_hash", "header_hash")
        self.choose: Callable[[bytes | None], TargetState | None] = {
            "least_conn": self._least_conn,
            "random_two": self._random_two,
            "ip_hash": self._hash,
            "header_hash": self._hash,
            "cookie": self._cookie,
        }.get(policy, self._round_robin)
        # Retry budget (decision 11): tokens earned per request, one spent per retry.
        self.requests = 0
        self._tokens = 0.0
        self._seen = 0
        self._floor_at = -1.0
        self._floor_used = 0

    # -- policies: the target for a new request, or None when no target can take it ---------

    def _round_robin(self, key: bytes | None) -> TargetState | None:
        self.requests += 1
        now = self._clock()
        schedule = self._cycle
        if self.slow_start and self._ramping(now):
            schedule = ()  # weights differ from the cycle's while a target ramps up
        if schedule:
            at = self._cursor
            state = schedule[at]
            at += 1
            self._cursor = at if at < len(schedule) else 0
            health = state.health
            if (
                health.checked_up
                and now >= health.down_until
                and (not state.cap or state.active < state.cap)
            ):
                return state
        # The cycle's target cannot take it (or one ramps up): a full pick over those that can.
        return self._weighted(now, ())

    def _ramping(self, now: float) -> bool:
        """Whether a target is within its slow_start ramp (looked at every RAMP_CHECK s)."""
        if now >= self._ramp_checked + RAMP_CHECK:
            self._ramp_checked = now
            slow = self.slow_start
            self._ramp = any(
                0 <= now - s.health.changed_at < slow for s in self._primaries + self._backups
            )
        return self._ramp

    def _weighted(self, now: float, skip: Sequence[TargetState]) -> TargetState | None:
        slow = self.slow_start
        return smooth_weighted(self._primaries, now, slow, skip) or smooth_weighted(
            self._backups, now, slow, skip
        )

    def _least_conn(self, key: bytes | None) -> TargetState | None:
        self.requests += 1
        now = self._clock()
        slow = self.slow_start
        return least_loaded(self._primaries, now, slow) or least_loaded(self._backups, now, slow)

    def _random_two(self, key: bytes | None) -> TargetState | None:
        first = self._round_robin(key)
        if first is None:
            return None
        tier = self._backups if first.target.backup else self._primaries
        return second_choice(tier, first, self._clock(), self._rng)

    def _hash(self, key: bytes | None) -> TargetState | None:
        if key is None:  # (header_hash without the header) spread like round robin
            return self._round_robin(key)
        self.requests += 1
        now = self._clock()
        for state in self._ranks.get(key) or self._rank(key):
            if ready(state, now):
                return state
        return None

    def _rank(self, key: bytes) -> tuple[TargetState, ...]:
        key_hash = stable_hash(key)
        ranks = rendezvous_rank(key_hash, self._primaries) + rendezvous_rank(
            key_hash, self._backups
        )
        if len(self._ranks) >= RANK_CACHE:
            self._ranks.clear()
        self._ranks[key] = ranks
        return ranks

    def _cookie(self, key: bytes | None) -> TargetState | None:
        if key is not None:
            state = self._by_cookie.get(key)
            if state is not None and ready(state, self._clock()):
                self.requests += 1
                return state
        return self._round_robin(key)

    def cookie_field(self, state: TargetState, secure: bool) -> tuple[bytes, bytes]:
        return set_cookie_field(self.backends.cookie_name, state.cookie, secure)

    # -- retries ---------------------------------------------------------------------------

    def retry(self, tried: Sequence[TargetState], key: bytes | None) -> TargetState | None:
        """Another target for a request whose attempts on `tried` failed: the next of the
        key's ranking for the hash policies, else a weighted pick among the others."""
        now = self._clock()
        if self._hashed and key is not None:
            for state in self._ranks.get(key) or self._rank(key):
                if state not in tried and ready(state, now):
                    return state
            return None
        if self.choose == self._least_conn:
            slow = self.slow_start
            return least_loaded(self._primaries, now, slow, tried) or least_loaded(
                self._backups, now, slow, tried
            )
        return self._weighted(now, tried)

    def may_retry(self) -> bool:
        """The retry budget: retries stay within `retry_budget` of the group's requests (saved
        up to BUDGET_CAP), plus RETRY_FLOOR a second, so a failing target cannot make every
        request two."""
        fresh = self.requests - self._seen
        self._seen = self.requests
        self._tokens = min(self._tokens + fresh * self.backends.retry_budget, BUDGET_CAP)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        now = self._clock()
        if now - self._floor_at >= 1.0:
            self._floor_at, self._floor_used = now, 0
        if self._floor_used < RETRY_FLOOR:
            self._floor_used += 1
            return True
        return False

    # -- no target ---------------------------------------------------------------------------

    def retry_after(self) -> int:
        """Seconds until a target may take requests again: a passive mark's end, the active
        check's interval, 1 for targets only full (max_connections)."""
        now = self._clock()
        waits = []
        check = self.backends.health_check
        for state in self._primaries + self._backups:
            health = state.health
            if not health.checked_up:
                waits.append(check.interval if check is not None else self.backends.fail_timeout)
            elif now < health.down_until:
                waits.append(health.down_until - now)
            else:
                waits.append(1.0)
        if not waits:
            return NO_TARGET_RETRY_AFTER
        return min(max(math.ceil(min(waits)), 1), 60)


class GroupMaker:
    """What building a group needs from the worker: its pools, health board, telemetry and
    sticky-cookie key."""

    def __init__(
        self,
        pool_for: Callable[[Upstream], UpstreamPool],
        board: HealthBoard | None = None,
        totals_for: Callable[[str, str], TargetTotals] | None = None,
        cookie_key: bytes = b"",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool_for = pool_for
        self.board = board or HealthBoard(clock)
        self.totals_for = totals_for or (lambda host, url: TargetTotals())
        self.cookie_key = cookie_key
        self.clock = clock

    def group(self, backends: Backends, host_name: str) -> TargetGroup:
        states = []
        for target in backends.targets:
            url = target.upstream.url
            key = (backends.name, url)
            states.append(
                TargetState(
                    target,
                    key,
                    self.pool_for(target.upstream),
                    self.board.health(key),
                    self.totals_for(host_name, url),
                    cookie_value(self.cookie_key, backends.name, url),
                )
            )
        return TargetGroup(backends, tuple(states), self.clock)
