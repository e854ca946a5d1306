"""The lb policies of a worker's target groups (issue 13), without processes: groups made from
hand-built `Backends` on a clock the test moves, picks counted.

Round robin and least_conn are deterministic; random_two runs on a seeded generator; the
hash policies on fixed keys (their hash is blake2b: the same in every process, checked in a
subprocess with another PYTHONHASHSEED).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from charon.config.model import (
    Backends,
    HealthCheck,
    ProxyHost,
    Target,
    Timeouts,
    Upstream,
    WebSocketSettings,
)
from charon.worker.http.errors import HttpError
from charon.worker.http.headers import ForwardedPolicy
from charon.worker.http.request import plan_request
from charon.worker.routing import Router
from charon.worker.telemetry import TargetTotals
from charon.worker.tlsinfo import TlsInfo
from charon.worker.upstreams.cookie import cookie_key, cookie_value, find_cookie
from charon.worker.upstreams.group import GroupMaker, TargetGroup, TargetState
from charon.worker.upstreams.health import HealthBoard
from charon.worker.upstreams.selection import stable_hash

REPO = Path(__file__).resolve().parent.parent


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def target(port: int, **kwargs: object) -> Target:
    url = f"http://10.0.0.{port % 250 + 1}:{port}"
    return Target(Upstream(url, f"10.0.0.{port % 250 + 1}", port), **kwargs)  # type: ignore[arg-type]


def make_group(
    targets: list[Target], clock: Clock | None = None, policy: str = "round_robin",
    **settings: object,
) -> TargetGroup:
    backends = Backends("app.test", tuple(targets), policy, **settings)  # type: ignore[arg-type]
    maker = GroupMaker(lambda upstream: None, clock=clock or Clock(), cookie_key=b"k" * 32)  # type: ignore[arg-type,return-value]
    return maker.group(backends, "app.test")


def picks(group: TargetGroup, n: int, key: bytes | None = None) -> Counter[int]:
    """How often each target (by config index) was chosen in n picks."""
    index = {state: i for i, state in enumerate(group.states)}
    counts: Counter[int] = Counter()
    for _ in range(n):
        state = group.choose(key)
        assert state is not None
        counts[index[state]] += 1
    return counts


def within(counts: Counter[int], weights: list[int], n: int, tolerance: float = 0.10) -> None:
    total = sum(weights)
    for i, weight in enumerate(weights):
        ideal = n * weight / total
        assert abs(counts[i] - ideal) <= tolerance * ideal, (counts, weights)


WEIGHTS = [1, 2, 3, 4]


def test_round_robin_spreads_by_weight_and_interleaves() -> None:
    group = make_group([target(3000 + i, weight=w) for i, w in enumerate(WEIGHTS)])
    within(picks(group, 1000), WEIGHTS, 1000, tolerance=0.01)
    # Smooth: a heavy target's picks are spread over the cycle, not bunched.
    group = make_group([target(1, weight=5), target(2), target(3)])
    order = [group.states.index(group.choose(None)) for _ in range(7)]  # type: ignore[arg-type]
    assert order == [0, 0, 1, 0, 2, 0, 0]


def test_round_robin_skips_a_target_that_is_down() -> None:
    clock = Clock()
    group = make_group([target(3000 + i, weight=w) for i, w in enumerate(WEIGHTS)], clock)
    group.states[3].health.checked_up = False  # the supervisor's verdict
    group.states[1].health.down_until = clock.now + 10  # this worker's passive mark
    counts = picks(group, 1000)
    assert counts[1] == counts[3] == 0
    within(counts, [1, 0, 3, 0], 1000)
    clock.now += 10  # the passive mark ends
    within(picks(group, 1000), [1, 2, 3, 0], 1000)


def test_least_conn_takes_the_least_loaded_per_weight() -> None:
    group = make_group([target(3000 + i, weight=w) for i, w in enumerate(WEIGHTS)],
                       policy="least_conn")
    within(picks(group, 1000), WEIGHTS, 1000)  # idle: ties go by weighted round robin
    a, b, c, d = group.states
    a.active, b.active, c.active, d.active = 1, 1, 3, 3  # per weight: 1, 0.5, 1, 0.75
    assert group.choose(None) is b
    b.active = 4  # 2.0
    assert group.choose(None) is d


def test_least_conn_keeps_loading_the_least_loaded() -> None:
    """Tunnels stay: each new one goes where the fewest are (per weight)."""
    group = make_group([target(1), target(2, weight=2), target(3)], policy="least_conn")
    for _ in range(400):
        state = group.choose(None)
        assert state is not None
        state.active += 1
    assert [s.active for s in group.states] == [100, 200, 100]


def test_random_two_spreads_by_weight_idle_and_avoids_the_loaded() -> None:
    group = make_group([target(3000 + i, weight=w) for i, w in enumerate(WEIGHTS)],
                       policy="random_two")
    group._rng.seed(7)  # noqa: SLF001 - reproducible draws
    within(picks(group, 1000), WEIGHTS, 1000)
    loaded = group.states[3]
    loaded.active = 100
    counts = picks(group, 1000)
    assert counts[3] < 50, counts  # only when both candidates were it (never: distinct)


def test_hashing_spreads_keys_by_weight_and_is_sticky() -> None:
    weights = [1, 1, 2]
    for policy in ("ip_hash", "header_hash"):
        settings = {"hash_header": "x-user"} if policy == "header_hash" else {}
        group = make_group([target(1), target(2), target(3, weight=2)], policy=policy,
                           **settings)
        index = {s: i for i, s in enumerate(group.states)}
        keys = [b"user-%d" % i for i in range(1000)]
        first = {key: group.choose(key) for key in keys}
        within(Counter(index[s] for s in first.values() if s is not None), weights, 1000)
        assert all(group.choose(key) is first[key] for key in keys)


def _assignments(targets: list[Target], keys: list[bytes]) -> dict[bytes, str]:
    group = make_group(targets, policy="ip_hash")
    return {key: group.choose(key).url for key in keys}  # type: ignore[union-attr]


def test_consistent_hashing_moves_only_the_new_targets_share() -> None:
    keys = [b"10.1.%d.%d" % (i // 250, i % 250) for i in range(2000)]
    four = [target(4000 + i) for i in range(4)]
    before = _assignments(four, keys)
    fifth = target(4004)
    after = _assignments([*four, fifth], keys)
    moved = [key for key in keys if before[key] != after[key]]
    assert all(after[key] == fifth.upstream.url for key in moved)  # only to the new one
    assert 0.15 <= len(moved) / len(keys) <= 0.25  # ~1/5
    # Removing one moves only its own keys.
    three = _assignments(four[1:], keys)
    assert all(three[k] == before[k] for k in keys if before[k] != four[0].upstream.url)


def test_the_choice_is_the_same_in_another_process() -> None:
    """Every worker agrees: the hash is no salted hash() (another PYTHONHASHSEED here)."""
    code = (
        "from charon.worker.upstreams.selection import stable_hash;"
        "print(stable_hash(b'10.9.8.7'), stable_hash(b'http://10.0.0.1:3000'))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    assert [int(x) for x in out] == [stable_hash(b"10.9.8.7"),
                                     stable_hash(b"http://10.0.0.1:3000")]


def test_header_hash_without_the_header_goes_round_robin() -> None:
    group = make_group([target(1), target(2)], policy="header_hash", hash_header="x-user")
    within(picks(group, 100, None), [1, 1], 100)


def test_backups_only_when_every_primary_is_down() -> None:
    clock = Clock()
    group = make_group([target(1), target(2), target(3, backup=True)], clock)
    assert picks(group, 100)[2] == 0
    group.states[0].health.checked_up = False
    assert picks(group, 100) == Counter({1: 100})
    group.states[1].health.down_until = clock.now + 5
    assert picks(group, 100) == Counter({2: 100})
    group.states[2].health.checked_up = False
    assert group.choose(None) is None
    assert group.retry_after() == 5  # the passive mark ends first
    clock.now += 5
    assert picks(group, 10) == Counter({1: 10})


def test_drained_targets_take_nothing_new() -> None:
    group = make_group([target(1), target(2, drain=True)])
    assert picks(group, 100) == Counter({0: 100})
    group = make_group([target(1, drain=True)])
    assert group.single is None
    assert group.choose(None) is None
    assert group.retry_after() == 10


def test_max_connections_caps_a_target_per_worker() -> None:
    group = make_group([target(1, max_connections=2), target(2, max_connections=1)],
                       policy="least_conn")
    taken = []
    for _ in range(3):
        state = group.choose(None)
        assert state is not None
        state.active += 1
        taken.append(state)
    assert [s.active for s in group.states] == [2, 1]
    assert group.choose(None) is None  # every target full: 503
    assert group.retry_after() == 1
    taken[0].active -= 1
    assert group.choose(None) is taken[0]


def test_slow_start_ramps_a_recovered_target_up() -> None:
    clock = Clock()
    group = make_group([target(1), target(2)], clock, slow_start=30.0)
    back = group.states[1].health
    back.changed_at = clock.now  # came back up now
    group.states[0].health.changed_at = clock.now - 100
    shares = []
    for _ in range(4):
        shares.append(picks(group, 1000)[1] / 1000)
        clock.now += 10
    # weight ~0, 1/3, 2/3, then full: share w/(1+w) = ~0, .25, .4, .5
    assert shares[0] < 0.05
    assert 0.2 <= shares[1] <= 0.3
    assert 0.35 <= shares[2] <= 0.45
    assert shares[3] == 0.5


def test_slow_start_does_not_ramp_targets_a_worker_sees_first() -> None:
    """A fresh worker (or one a reload gave a new target) sends every target its full share at
    once; a verdict saying a target came back 10 s ago ramps it from then, on every worker."""
    clock = Clock()
    group = make_group([target(1), target(2)], clock, slow_start=30.0)
    assert picks(group, 1000) == Counter({0: 500, 1: 500})
    board = group.states[0].health  # the TargetHealth objects come from the maker's board
    assert board.changed_at == float("-inf")

    fresh = HealthBoard(clock)
    fresh.apply([["app.test", "http://10.0.0.3:2", True, 10.0, 0.0]])
    assert fresh.health(("app.test", "http://10.0.0.3:2")).changed_at == clock.now - 10.0
    fresh.apply([["app.test", "http://10.0.0.3:2", True, 50.0, 0.0]])  # known: unchanged
    assert fresh.health(("app.test", "http://10.0.0.3:2")).changed_at == clock.now - 10.0


def test_retry_goes_to_another_target_and_follows_the_hash_ranking() -> None:
    group = make_group([target(1), target(2), target(3)])
    first = group.choose(None)
    assert first is not None
    second = group.retry((first,), None)
    assert second is not None and second is not first
    assert group.retry(group.states, None) is None
    hashed = make_group([target(1), target(2), target(3)], policy="ip_hash")
    key = b"192.0.2.1"
    top = hashed.choose(key)
    assert top is not None
    following = hashed.retry((top,), key)
    top.health.checked_up = False
    assert hashed.choose(key) is following  # the same next choice as when it fails


def test_retry_budget() -> None:
    clock = Clock()
    group = make_group([target(1), target(2)], clock, retry_budget=0.2)
    # Quiet: the floor of 3 a second.
    assert [group.may_retry() for _ in range(4)] == [True, True, True, False]
    clock.now += 1
    for _ in range(100):
        group.choose(None)
    allowed = sum(group.may_retry() for _ in range(100))
    assert allowed == 20 + 3
    clock.now += 1
    assert [group.may_retry() for _ in range(4)] == [True, True, True, False]


def test_a_lone_target_is_taken_without_a_choice() -> None:
    group = make_group([target(1)])
    assert group.single is group.states[0]
    assert not group.passive  # nginx: a lone server is never marked down by failures
    capped = make_group([target(1, max_connections=5)])
    assert capped.single is None


def test_sticky_cookie() -> None:
    key = cookie_key(b"s" * 32)
    assert key != cookie_key(b"t" * 32)
    value = cookie_value(key, "app.test", "http://10.0.0.1:3000")
    assert value == cookie_value(key, "app.test", "http://10.0.0.1:3000")
    assert value != cookie_value(key, "app.test/api/", "http://10.0.0.1:3000")
    assert len(value) == 22 and b"=" not in value  # 16 bytes, base64url without padding
    assert find_cookie([b"a=1; charon_target=" + value + b"; b=2"], b"charon_target") == value
    assert find_cookie([b"xcharon_target=1"], b"charon_target") is None
    assert find_cookie([b"a=1", b"charon_target=\"v\""], b"charon_target") == b"v"


def test_cookie_policy_sticks_while_the_target_is_up() -> None:
    group = make_group([target(1), target(2), target(3)], policy="cookie")
    second = group.states[1]
    assert all(group.choose(second.cookie) is second for _ in range(10))
    assert picks(group, 300, b"forged") == Counter({0: 100, 1: 100, 2: 100})
    second.health.checked_up = False
    assert group.choose(second.cookie) is not second


# -- planning: the policy's key from the one pass over the headers, 503, Set-Cookie ----------

def _router(policy: str, **settings: object) -> Router:
    backends = Backends("app.test", (target(1), target(2), target(3)), policy, **settings)  # type: ignore[arg-type]
    host = ProxyHost(("app.test",), backends, (), Timeouts(), WebSocketSettings())
    groups = GroupMaker(lambda upstream: None, cookie_key=b"k" * 32)  # type: ignore[arg-type,return-value]
    return Router((host,), lambda upstream: None, groups=groups)  # type: ignore[arg-type,return-value]


def _plan(router: Router, *fields: tuple[bytes, bytes], tls: TlsInfo | None = None,
          peer: str = "192.0.2.9"):  # type: ignore[no-untyped-def]
    headers = [(b"Host", b"app.test"), *fields]
    return plan_request(b"GET", b"/", "1.1", headers, peer, tls, router, ForwardedPolicy(()))


def test_header_hash_reads_the_header_of_the_one_pass() -> None:
    router = _router("header_hash", hash_header="X-User-Id")
    first = _plan(router, (b"X-User-Id", b"alice"))  # the group's first request: found once
    assert first.lb_key == b"alice"
    for _ in range(5):
        plan = _plan(router, (b"x-user-id", b" alice "), (b"Accept", b"*/*"))
        assert plan.lb_key == b"alice" and plan.target is first.target
        assert b"x-user-id:  alice \r\n" in plan.head  # still forwarded as it came
    other = _plan(router, (b"X-User-Id", b"bob"))
    assert other.lb_key == b"bob"


def test_ip_hash_keys_on_the_client_ip() -> None:
    router = _router("ip_hash")
    plans = [_plan(router, peer="198.51.100.4") for _ in range(5)]
    assert {p.lb_key for p in plans} == {b"198.51.100.4"}
    assert len({id(p.target) for p in plans}) == 1


def test_cookie_policy_sets_the_cookie_once() -> None:
    router = _router("cookie", cookie_name="sticky")
    plan = _plan(router, (b"Cookie", b"a=b"))
    assert plan.target is not None and plan.set_cookie is not None
    name, value = plan.set_cookie
    assert name == b"Set-Cookie"
    assert value == b"sticky=" + plan.target.cookie + b"; Path=/; HttpOnly; SameSite=Lax"
    again = _plan(router, (b"Cookie", b"a=b; sticky=" + plan.target.cookie))
    assert again.target is plan.target and again.set_cookie is None
    secure = _plan(router, tls=TlsInfo("app.test", "http/1.1", "TLSv1.3", "x", False))
    assert secure.set_cookie is not None and secure.set_cookie[1].endswith(b"; Secure")


def test_no_target_available_is_503_with_retry_after() -> None:
    router = _router("round_robin", health_check=HealthCheck(interval=7.0))
    plan = _plan(router)
    assert plan.target is not None
    for state in plan.route.group.states:
        state.health.checked_up = False
    with pytest.raises(HttpError) as caught:
        _plan(router)
    assert caught.value.status == 503 and not caught.value.close
    assert caught.value.fields == b"Retry-After: 7\r\n"


def test_target_state_has_its_totals() -> None:
    state = make_group([target(1)]).states[0]
    assert isinstance(state, TargetState) and isinstance(state.totals, TargetTotals)
    state.totals.request(200, 0.003)
    state.totals.request(502, 0.2)
    assert state.totals.codes == {200: 1, 502: 1}
    assert sum(state.totals.buckets) == 2


def test_a_name_is_resolved_in_the_worker_and_its_addresses_taken_in_turn() -> None:
    import asyncio

    import uvloop

    from charon.worker.upstreams.pool import UpstreamPool
    from charon.worker.upstreams.resolver import Resolver

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pool = UpstreamPool(loop, Upstream("http://localhost:9", "localhost", 9), 60.0)
        resolver = Resolver(loop)
        assert pool.next_host() == "localhost"  # not resolved yet: by name
        resolver.watch(pool, 30.0)
        for _ in range(200):
            if pool.addresses:
                break
            await asyncio.sleep(0.01)
        assert pool.addresses == ("127.0.0.1",)
        assert pool.set_addresses(("10.0.0.2", "10.0.0.1")) is True
        assert [pool.next_host() for _ in range(4)] == ["10.0.0.2", "10.0.0.1"] * 2
        ip_pool = UpstreamPool(loop, Upstream("http://127.0.0.1:9", "127.0.0.1", 9), 60.0)
        resolver.watch(ip_pool, 30.0)  # an address: nothing to resolve
        assert ip_pool not in resolver._interval  # noqa: SLF001
        pool.retire()
        resolver.tick()
        assert pool not in resolver._interval  # noqa: SLF001
        resolver.close()

    uvloop.run(asyncio.wait_for(scenario(), 10))
