"""How a target is chosen among a group's (issue 13): the algorithms of the `lb_policy`s.

They work on `TargetState`s (group.py) and are called per request, so the common case is kept
short: round robin walks a precomputed weighted cycle and only falls back to the full smooth
weighted round robin when the target it lands on cannot take the request.

- Smooth weighted round robin (nginx's): each ready target's `current` grows by its weight,
  the largest wins and gives back the total. Picks interleave (5:1:1 gives a a b a c a a).
- least_conn: the fewest `active` (in-flight requests + open tunnels) per unit of weight; ties
  by smooth weighted round robin, so an idle group spreads by weight.
- random_two (power of two choices): one candidate from the weighted cycle, one at random by
  weight among the other ready targets; the less loaded wins, a tie goes to the first. Idle,
  it spreads exactly by weight; busy, it avoids the loaded targets like two random choices do.
- ip_hash / header_hash: weighted rendezvous hashing (highest random weight). Each target's
  score for a key is w / -ln(u), u a stable 64-bit hash of (key, target) in (0, 1): a key goes
  to the top ready target of its ranking, and adding a target moves only the keys it now tops
  (its share), removing one moves only its own keys. The hash is blake2b and splitmix64, never
  Python's salted hash(), so every worker and every restart agrees.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from charon.worker.upstreams.group import TargetState

_MASK = (1 << 64) - 1
MIN_RAMP = 0.02  # a target starting its slow_start ramp still gets a little traffic
SCHEDULE_LIMIT = 4096  # a weighted cycle longer than this is not precomputed


def stable_hash(data: bytes) -> int:
    """A 64-bit hash of `data`, the same in every process."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _mix(x: int) -> int:
    """splitmix64's finalizer: spreads (key hash ^ target seed) over 64 bits."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def ready(state: TargetState, now: float) -> bool:
    """May take a new request now: up (the supervisor's verdict and this worker's passive
    checks) and under its max_connections. (Drained targets are never among the candidates.)"""
    health = state.health
    return (
        health.checked_up
        and now >= health.down_until
        and (not state.cap or state.active < state.cap)
    )


def ramp(state: TargetState, now: float, slow_start: float) -> float:
    """The share of its weight a target has during its slow_start ramp (1 after it)."""
    if not slow_start:
        return 1.0
    since = now - state.health.changed_at
    if since >= slow_start:
        return 1.0
    return max(since / slow_start, MIN_RAMP)


def cycle(weights: Sequence[int]) -> list[int]:
    """The indexes smooth weighted round robin picks over one period, all targets up: the
    fast path of round robin walks it. Empty when too long to keep (weights are divided by
    their gcd first)."""
    if not weights:
        return []
    divisor = math.gcd(*weights)
    weights = [w // divisor for w in weights]
    total = sum(weights)
    if total > SCHEDULE_LIMIT:
        return []
    current = [0] * len(weights)
    out = []
    for _ in range(total):
        best = 0
        for i, w in enumerate(weights):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(best)
    return out


def smooth_weighted(
    states: Sequence[TargetState], now: float, slow_start: float,
    skip: Sequence[TargetState] = (),
) -> TargetState | None:
    """nginx's smooth weighted round robin over the ready targets of `states` not in `skip`."""
    best = None
    total = 0.0
    for state in states:
        if not ready(state, now) or (skip and state in skip):
            continue
        weight = state.weight * ramp(state, now, slow_start) if slow_start else state.weight
        state.current += weight
        total += weight
        if best is None or state.current > best.current:
            best = state
    if best is not None:
        best.current -= total
    return best


def least_loaded(
    states: Sequence[TargetState], now: float, slow_start: float,
    skip: Sequence[TargetState] = (),
) -> TargetState | None:
    """The ready target with the fewest active per unit of (ramped) weight; ties by smooth
    weighted round robin."""
    best: TargetState | None = None
    tied: list[TargetState] | None = None
    best_load = 0.0
    for state in states:
        health = state.health
        if (
            not health.checked_up
            or now < health.down_until
            or (state.cap and state.active >= state.cap)
            or (skip and state in skip)
        ):
            continue
        weight = state.weight * ramp(state, now, slow_start) if slow_start else state.weight
        load = state.active / weight
        if best is None or load < best_load:
            best, best_load, tied = state, load, None
        elif load == best_load:
            if tied is None:
                tied = [best, state]
            else:
                tied.append(state)
    if tied is not None:
        return smooth_weighted(tied, now, slow_start)
    return best


def second_choice(
    states: Sequence[TargetState], first: TargetState, now: float, rng: random.Random
) -> TargetState:
    """random_two: of `first` and a target drawn by weight among the other ready ones, the
    less loaded (per unit of weight); `first` on a tie."""
    others = [s for s in states if s is not first and ready(s, now)]
    if not others:
        return first
    if len(others) == 1:
        other = others[0]
    else:
        pick = rng.random() * sum(s.weight for s in others)
        other = others[-1]
        for state in others:
            pick -= state.weight
            if pick < 0:
                other = state
                break
    if other.active * first.weight < first.active * other.weight:
        return other
    return first


def rendezvous_rank(key_hash: int, states: Sequence[TargetState]) -> tuple[TargetState, ...]:
    """`states` in the order the key prefers them (weighted rendezvous hashing)."""
    scored = []
    for state in states:
        u = ((_mix(key_hash ^ state.seed) >> 11) + 0.5) / 9007199254740992.0  # in (0, 1)
        scored.append((state.weight / -math.log(u), state.seed, state))
    scored.sort(key=lambda entry: (-entry[0], entry[1]))
    return tuple(entry[2] for entry in scored)
