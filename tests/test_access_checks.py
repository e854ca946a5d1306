"""The access-list semantics and the rules seam, on hand-built rules: what `plan_request`
decides for a route with checks (no processes: the end-to-end tests are test_access_lists.py)."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from charon.config.loader import load_config_text
from charon.config.rules import AccessList, BasicAuth, Rules
from charon.worker.access import acl
from charon.worker.access.acl import AclCheck
from charon.worker.access.checks import RouteChecks
from charon.worker.access.maker import AccessMaker
from charon.worker.http.errors import HttpError
from charon.worker.http.headers import ForwardedPolicy
from charon.worker.http.request import RequestPlan, plan_request
from charon.worker.routing import Router

CONFIG = """
[[hosts]]
domains = ["a.test"]
upstream = "http://127.0.0.1:9"
"""


def access(allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> AccessList:
    return AccessList(
        tuple(ipaddress.ip_network(n) for n in allow),
        tuple(ipaddress.ip_network(n) for n in deny),
    )


def allows(check: AclCheck, ip: str) -> bool:
    return check.allows(ip)


def test_longest_prefix_wins_and_deny_wins_a_tie() -> None:
    check = AclCheck(access(allow=("10.0.0.0/8", "10.1.2.0/24", "192.0.2.1/32"),
                            deny=("10.1.0.0/16", "192.0.2.1/32")))
    assert allows(check, "10.9.9.9")  # /8 allow
    assert not allows(check, "10.1.9.9")  # /16 deny beats /8 allow
    assert allows(check, "10.1.2.3")  # /24 allow beats /16 deny
    assert not allows(check, "192.0.2.1")  # the same /32 in both: deny
    assert not allows(check, "203.0.113.1")  # no match, and there are allow entries


def test_no_allow_entry_lets_the_unmatched_in() -> None:
    check = AclCheck(access(deny=("203.0.113.9", "2001:db8::/32")))
    assert allows(check, "203.0.113.8")
    assert not allows(check, "203.0.113.9")
    assert not allows(check, "2001:db8::1")
    assert allows(check, "2001:db9::1")
    assert allows(check, "not an address")


def test_an_allow_list_refuses_what_it_does_not_name() -> None:
    check = AclCheck(access(allow=("127.0.0.0/8",)))
    assert allows(check, "127.0.0.1")
    assert not allows(check, "::1")  # an IPv4-only list: IPv6 clients are not on it
    assert not allows(check, "garbage")


def test_ipv4_mapped_ipv6_is_ipv4() -> None:
    check = AclCheck(access(allow=("10.0.0.0/8", "::ffff:192.168.0.0/112"), deny=("::1",)))
    assert allows(check, "::ffff:10.1.2.3")
    assert allows(check, "192.168.7.7")
    assert allows(check, "::ffff:192.168.7.7")
    assert not allows(check, "::ffff:11.0.0.1")
    assert not allows(check, "::1")


def test_the_zero_prefix_matches_everything() -> None:
    check = AclCheck(access(allow=("0.0.0.0/0", "::/0"), deny=("10.0.0.0/8",)))
    assert allows(check, "8.8.8.8") and allows(check, "2001:db8::5")
    assert not allows(check, "10.0.0.1")


def test_the_cache_is_bounded() -> None:
    check = AclCheck(access(allow=("10.0.0.0/8",)))
    for i in range(acl.CACHE_SIZE + 10):
        check.allows(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(check._cache) <= acl.CACHE_SIZE
    assert allows(check, "10.0.0.1") and not allows(check, "11.0.0.1")


def router(rules: Rules, location_rules: Rules | None = None) -> Router:
    text = CONFIG
    if location_rules is not None:
        text += '[[hosts.locations]]\npath = "/loc/"\nupstream = "http://127.0.0.1:9"\n'
    host = load_config_text(text, "t.toml").hosts[0]
    locations = tuple(
        dataclasses.replace(loc, rules=location_rules or Rules()) for loc in host.locations
    )
    host = dataclasses.replace(host, rules=rules, locations=locations)
    return Router((host,), lambda upstream: None, rules=AccessMaker())  # type: ignore[arg-type,return-value]


def plan(
    r: Router, peer: str = "127.0.0.1", path: bytes = b"/",
    extra: list[tuple[bytes, bytes]] | None = None, trusted: tuple[str, ...] = (),
    admit: bool = True,
) -> RequestPlan:
    headers = [(b"Host", b"a.test"), *(extra or [])]
    policy = ForwardedPolicy(tuple(ipaddress.ip_network(n) for n in trusted))
    return plan_request(b"GET", path, "1.1", headers, peer, None, r, policy, False, admit)


def refused(r: Router, **kwargs: object) -> HttpError:
    with pytest.raises(HttpError) as info:
        plan(r, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_a_bare_route_has_no_rules() -> None:
    r = router(Rules())
    assert plan(r).route.rules is None


def test_a_refused_request_is_403_with_its_host_and_client() -> None:
    r = router(Rules(access=access(allow=("10.0.0.0/8",))))
    error = refused(r, peer="192.0.2.5")
    assert (error.status, error.denied, error.close) == (403, "acl", False)
    assert (error.host, error.client_ip) == ("a.test", "192.0.2.5")
    assert plan(r, peer="10.2.3.4").route.rules is not None


def test_the_trusted_proxies_client_ip_decides() -> None:
    r = router(Rules(access=access(allow=("198.51.100.0/24",))))
    xff = [(b"X-Forwarded-For", b"198.51.100.7")]
    through = plan(r, peer="127.0.0.1", extra=xff, trusted=("127.0.0.1/32",))
    assert through.client_ip == "198.51.100.7"
    error = refused(r, peer="127.0.0.1", extra=[(b"X-Forwarded-For", b"192.0.2.1")],
                    trusted=("127.0.0.1/32",))
    assert error.client_ip == "192.0.2.1"
    # From an untrusted peer the field is not believed.
    refused(r, peer="127.0.0.2", extra=xff, trusted=("127.0.0.1/32",))


def test_a_location_list_replaces_the_hosts() -> None:
    r = router(Rules(access=access(deny=("127.0.0.0/8",))),
               Rules(access=access(allow=("127.0.0.0/8",))))
    refused(r, path=b"/")
    assert plan(r, path=b"/loc/x").path == b"/loc/x"


def test_authorization_is_forwarded_unless_basic_auth_consumes_it() -> None:
    field = [(b"Authorization", b"Basic YTpi")]
    bare = plan(router(Rules()), extra=field)
    assert b"\r\nAuthorization: Basic YTpi\r\n" in bare.head
    users = (("a", "$2b$04$" + "x" * 53),)
    # (Not admitted: only what plan_request makes of the field is looked at.)
    consumed = plan(router(Rules(basic_auth=BasicAuth("r", users))), extra=field, admit=False)
    assert b"Authorization" not in consumed.head
    assert consumed.authorization == b"Basic YTpi"
    kept = plan(router(Rules(basic_auth=BasicAuth("r", users, forward_authorization=True))),
                extra=field, admit=False)
    assert b"\r\nAuthorization: Basic YTpi\r\n" in kept.head
    assert kept.authorization == b"Basic YTpi"


def test_several_authorization_fields_on_a_route_with_rules_are_refused() -> None:
    r = router(Rules(access=access(allow=("127.0.0.0/8",))))
    error = refused(r, extra=[(b"Authorization", b"Basic a"), (b"Authorization", b"Basic b")])
    assert error.status == 400


def test_a_refusal_gives_back_what_earlier_checks_took() -> None:
    given_back: list[str] = []

    def counts(plan: RequestPlan, headers: list[tuple[bytes, bytes]]) -> None:
        plan.leases = [*(plan.leases or ()), lambda: given_back.append("count")]

    def rate(plan: RequestPlan, headers: list[tuple[bytes, bytes]]) -> None:
        raise HttpError(429, "too many requests", close=False, denied="rate")

    checks = RouteChecks(Rules(), [counts, rate])
    p = plan(router(Rules()))
    with pytest.raises(HttpError):
        checks.admit(p, [])
    assert given_back == ["count"]
    assert p.leases is None
