"""Host and path routing (protocol notes, decision 7) through a real Charon and real backends."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from harness import Backend, Charon, running_charon
from httpwire import Client, get, request


@dataclass
class Setup:
    charon: Charon
    port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    names = ("exact", "api", "api-v2", "wild", "ip")
    backends = {}
    try:
        for name in names:
            backends[name] = Backend("http_backend.py", "--name", name)
        hosts = f"""
            [[hosts]]
            domains = ["exact.test", "www.exact.test"]
            upstream = "{backends["exact"].url}"

            [[hosts.locations]]
            path = "/api/"
            upstream = "{backends["api"].url}"

            [[hosts.locations]]
            path = "/api/v2/"
            upstream = "{backends["api-v2"].url}"

            [[hosts]]
            domains = ["*.example.org"]
            upstream = "{backends["wild"].url}"

            [[hosts]]
            domains = ["127.0.0.1"]
            upstream = "{backends["ip"].url}"
            """
        with running_charon(tmp_path_factory.mktemp("routing"), hosts) as charon:
            yield Setup(charon, charon.port)
    finally:
        for backend in backends.values():
            backend.stop()


def routed_to(env: Setup, host: str, target: str = "/echo") -> str:
    resp = get(env.port, host, target)
    assert resp.status == 200, resp.head
    return str(resp.json()["backend"])


def test_exact_domain(env: Setup) -> None:
    assert routed_to(env, "exact.test") == "exact"
    assert routed_to(env, "www.exact.test") == "exact"
    assert routed_to(env, "127.0.0.1") == "ip"


def test_wildcard_covers_exactly_one_label(env: Setup) -> None:
    assert routed_to(env, "a.example.org") == "wild"
    assert routed_to(env, "xn--bcher-kva.example.org") == "wild"
    for name in ("a.b.example.org", "example.org", "aexample.org"):
        assert get(env.port, name).status == 404, name


@pytest.mark.parametrize(
    ("target", "backend"),
    [
        ("/api/x", "api"),
        ("/api/", "api"),
        ("/api/v2/x?y=1", "api-v2"),
        ("/api/v2", "api"),  # "/api/v2/" does not match without its slash; "/api/" does
        ("/api", "exact"),
        ("/apix", "exact"),
        ("/", "exact"),
        ("/other/api/v2/", "exact"),
    ],
)
def test_longest_location_prefix_wins(env: Setup, target: str, backend: str) -> None:
    resp = get(env.port, "exact.test", target)
    assert resp.status == 200, resp.head
    assert resp.json()["backend"] == backend
    assert resp.json()["raw_path"] == target


def test_host_with_port(env: Setup) -> None:
    resp = get(env.port, "exact.test:8080")
    assert resp.json()["backend"] == "exact"
    # The Host value is forwarded as the client sent it.
    assert ["Host", "exact.test:8080"] in resp.json()["headers"]
    assert routed_to(env, "a.example.org:1") == "wild"
    assert routed_to(env, f"127.0.0.1:{env.port}") == "ip"


def test_uppercase_host(env: Setup) -> None:
    assert routed_to(env, "EXACT.Test") == "exact"
    assert routed_to(env, "A.EXAMPLE.ORG") == "wild"
    assert routed_to(env, "WWW.Exact.TEST:80") == "exact"


@pytest.mark.parametrize("host", ["unknown.test", "exact.test.evil", "test", "127.0.0.2"])
def test_unknown_host_is_404_plain_text(env: Setup, host: str) -> None:
    resp = get(env.port, host)
    assert resp.status == 404, resp.head
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert len(resp.body) < 200
    # Charon's own answer, not a backend's (the backends answer every path with JSON).
    assert resp.body.startswith(b"404 Not Found")
    assert b"backend" not in resp.body
    assert resp.header("Server") is None


def test_unknown_host_keeps_the_connection_usable(env: Setup) -> None:
    """A 404 for an unknown host is an ordinary answer: the next request still works."""
    with Client(env.port) as client:
        client.send(b"GET /echo HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
        assert client.read_response().status == 404
        client.send(b"GET /echo HTTP/1.1\r\nHost: exact.test\r\n\r\n")
        resp = client.read_response()
        assert resp.status == 200
        assert resp.json()["backend"] == "exact"


def test_unknown_host_with_body_keeps_the_connection_usable(env: Setup) -> None:
    """The body of a request answered 404 is read and dropped, not parsed as a request."""
    with Client(env.port) as client:
        body = b"GET /echo/smuggled HTTP/1.1\r\nHost: exact.test\r\n\r\n"
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        assert client.read_response().status == 404
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: nowhere.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
        assert client.read_response().status == 404
        client.send(b"GET /echo/next HTTP/1.1\r\nHost: exact.test\r\n\r\n")
        resp = client.read_response()
        assert resp.json()["raw_path"] == "/echo/next"


def test_absolute_form_routed_by_its_authority(env: Setup) -> None:
    resp = request(
        env.port,
        b"GET http://a.example.org/echo?q=1 HTTP/1.1\r\nHost: exact.test\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert resp.status == 200, resp.head
    body = resp.json()
    assert body["backend"] == "wild"
    hosts = [v for n, v in body["headers"] if n.lower() == "host"]
    assert hosts == ["a.example.org"]
    assert body["raw_path"].endswith("/echo?q=1")


def test_absolute_form_unknown_authority_is_404(env: Setup) -> None:
    resp = request(
        env.port,
        b"GET http://unknown.test/echo HTTP/1.1\r\nHost: exact.test\r\nConnection: close\r\n\r\n",
    )
    assert resp.status == 404


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET /echo HTTP/1.1\r\n\r\n", id="no-host"),
        pytest.param(b"GET /echo HTTP/1.0\r\n\r\n", id="no-host-http10"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: exact.test\r\nHost: exact.test\r\n\r\n",
                     id="two-host-lines-same"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: exact.test\r\nHost: a.example.org\r\n\r\n",
                     id="two-host-lines"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: \r\n\r\n", id="empty-host"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: exact.test/evil\r\n\r\n", id="slash"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: exact.test:80:80\r\n\r\n", id="two-ports"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: exact.test:http\r\n\r\n", id="port-name"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: user@exact.test\r\n\r\n", id="userinfo"),
        pytest.param(b"GET /echo HTTP/1.1\r\nHost: exact test\r\n\r\n", id="space"),
        pytest.param(b"GET http://user@exact.test/echo HTTP/1.1\r\nHost: exact.test\r\n\r\n",
                     id="absolute-userinfo"),
    ],
)
def test_missing_repeated_or_invalid_host_is_400(env: Setup, head: bytes) -> None:
    resp = request(env.port, head)
    assert resp.status == 400, resp.head
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert b"backend" not in resp.body
