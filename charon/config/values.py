"""Parsers for single config values: each takes a raw TOML value and returns the typed value,
or raises ValueError with a message that reads well after "[table] key: ".
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import re
from typing import Any

from charon.config.model import IPNetwork, ListenAddress, Upstream

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}  # in the order they must appear
_SIZE = re.compile(r"(\d+)(B|KiB|MiB|GiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_DOMAIN_FORMS = "a DNS name like 'app.example.com', '*.example.com', an IPv4 address or '*'"


def describe(value: Any) -> str:
    """A TOML-ish rendering of a value for messages: true, 5, "text", an array, a table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return f"a date/time ({value.isoformat()})"
    return repr(value)


def quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'


def integer(value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {describe(value)}")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = (
            f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        )
        raise ValueError(f"must be {bounds}, got {value}")
    return value


def string(value: Any, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {what}, got {describe(value)}")
    return value


def string_list(value: Any, what: str) -> list[Any]:
    """An array (elements are checked by the caller)."""
    if not isinstance(value, list):
        raise ValueError(f"expected an array of {what}, got {describe(value)}")
    return value


def duration(value: Any) -> float:
    """ "5s", "250ms", "2m", "1h", "1m30s", or a number of seconds; never negative."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number of seconds, got {describe(value)}")
        if value < 0:
            raise ValueError(f"must not be negative, got {describe(value)}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f'expected a duration like "5s", got {describe(value)}')
    return _duration_text(value)


def _duration_text(text: str) -> float:
    problem = ValueError(
        f'invalid duration {quote(text)}: use e.g. "5s", "250ms", "2m", "1h", "1m30s"'
    )
    units = list(_DURATION_UNITS)
    seconds, pos, last = 0.0, 0, -1
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or units.index(match[2]) <= last:
            raise problem
        last = units.index(match[2])
        seconds += float(match[1]) * _DURATION_UNITS[match[2]]
        pos = match.end()
    if pos == 0:
        raise problem
    return seconds


def positive_duration(value: Any) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError(f"must be greater than 0, got {describe(value)}")
    return seconds


def at_least_1s(value: Any) -> float:
    seconds = duration(value)
    if seconds < 1:
        raise ValueError(f"must be at least 1s, got {describe(value)}")
    return seconds


def location_path(value: Any) -> str:
    path = string(value, 'a path like "/api/"')
    if not path.startswith("/"):
        raise ValueError(f"must start with '/', got {quote(path)}")
    if any(char.isspace() or not char.isprintable() for char in path):
        raise ValueError(f"must not contain spaces or control characters, got {quote(path)}")
    if "?" in path or "#" in path:
        raise ValueError(
            f"must not contain '?' or '#' (locations match the path only), got {quote(path)}"
        )
    return path


def size(value: Any, minimum: int) -> int:
    """A byte count: an integer, or a string like "16MiB", "64KiB", "512B"."""
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None:
            raise ValueError(
                f'invalid size {quote(value)}: use a number of bytes or e.g. "64KiB", "16MiB"'
            )
        value = int(match[1]) * _SIZE_UNITS[match[2]]
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f'expected a size like "16MiB" or a number of bytes, got {describe(value)}'
        )
    if value < minimum:
        raise ValueError(f"must be at least {minimum} bytes, got {value}")
    return value


def listen_address(value: Any) -> ListenAddress:
    """ "IP:PORT" or "[IPv6]:PORT"."""
    text = string(value, 'an "IP:PORT" string')
    host, port_text = _split_host_port(text, text, '"IP:PORT"', '"[::1]:8080"')
    if port_text is None:
        raise ValueError(f'expected "IP:PORT", got {quote(text)} (the port is missing)')
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f'{quote(text)}: use an IP address, not a host name (e.g. "127.0.0.1:8080")'
        ) from None
    return ListenAddress(str(ip), _port(port_text, text))


def _split_host_port(
    hostport: str, shown: str, form: str, v6_example: str
) -> tuple[str, str | None]:
    """Splits "host:port", "[v6]:port", "host" or "[v6]"; the port is None when absent.

    `shown` is the whole value for messages, `form` the expected form, `v6_example` an example
    with an IPv6 address in brackets.
    """
    if hostport.startswith("["):
        inside, bracket, rest = hostport[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"expected {form}, got {quote(shown)}")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise ValueError(f"{quote(shown)}: {quote(inside)} is not an IPv6 address") from None
        return inside, rest[1:] if rest else None
    if hostport.count(":") > 1:
        raise ValueError(f"{quote(shown)}: IPv6 addresses need brackets, like {v6_example}")
    host, colon, port = hostport.partition(":")
    if not host:
        raise ValueError(f"expected {form}, got {quote(shown)}")
    return host, port if colon else None


def _port(port_text: str, shown: str) -> int:
    if not (port_text.isascii() and port_text.isdecimal()) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{quote(shown)}: the port must be a number from 1 to 65535")
    return int(port_text)


def network(value: Any) -> IPNetwork:
    text = string(value, 'a CIDR like "10.0.0.0/8" or an IP address')
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f'{quote(text)} is not a network: use a CIDR like "10.0.0.0/8" or an IP address'
        ) from None


def domain(value: Any) -> str:
    """A lowercase DNS name, "*.name", an IPv4 literal, or the catch-all "*"."""
    text = string(value, "a domain name string").lower()
    if text == "*":
        return text
    if ":" in text and not text.startswith("["):
        raise ValueError(f"{quote(text)}: domains must not include a port")
    if _is_ipv4(text):
        return text
    name = text[2:] if text.startswith("*.") else text
    if "*" in name:
        raise ValueError(
            f"invalid domain {quote(text)}: a wildcard must be the whole first label, "
            "like '*.example.com'"
        )
    if not is_dns_name(name):
        raise ValueError(f"invalid domain {quote(text)}: expected {_DOMAIN_FORMS}")
    return text


def is_dns_name(name: str) -> bool:
    labels = name.split(".")
    return (
        len(name) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdecimal()  # "1.2.3.999" is a broken IP, not a name
    )


def is_ip_address(text: str) -> bool:
    """Whether `text` is an IPv4 or IPv6 literal (without brackets)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


_UPSTREAM_PORTS = {"http": 80, "https": 443}


def upstream(value: Any) -> Upstream:
    """ "http://HOST:PORT" or "http://HOST" (port 80), "https://..." (port 443, TLS toward the
    backend); HOST an IP literal or a DNS name."""
    url = string(value, 'an upstream URL like "http://127.0.0.1:3000"')
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f'expected a URL like "http://127.0.0.1:3000", got {quote(url)}')
    scheme = scheme.lower()
    if scheme not in _UPSTREAM_PORTS:
        raise ValueError(
            f"{quote(url)}: unsupported scheme '{scheme}' (only http:// and https:// are supported)"
        )
    for char, part in (("#", "a fragment"), ("?", "a query")):
        if char in rest:
            raise ValueError(f"{quote(url)}: an upstream must not have {part}")
    authority, _, path = rest.partition("/")
    if path:
        raise ValueError(
            f"{quote(url)}: upstream must not have a path: "
            "Charon forwards the request path unchanged"
        )
    if "@" in authority:
        raise ValueError(f"{quote(url)}: an upstream must not contain user info")
    host, port_text = _split_host_port(authority, url, '"http://HOST:PORT"', '"http://[::1]:3000"')
    port = _UPSTREAM_PORTS[scheme] if port_text is None else _port(port_text, url)
    return Upstream(url, _upstream_host(host, url), port, tls=scheme == "https")


def _upstream_host(host: str, url: str) -> str:
    host = host.lower()
    if "%" in host:  # ipaddress takes "fe80::1%eth0"; neither the engine's dial nor a Host does
        raise ValueError(f"{quote(url)}: an IPv6 zone id ({quote(host)}) is not supported")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not is_dns_name(host):
        raise ValueError(f"{quote(url)}: {quote(host)} is not an IP address or a DNS name")
    return host


_ORIGIN_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(value: Any) -> str:
    """A browser origin, "http://HOST[:PORT]" or "https://..."; lowercased, default port dropped.

    It is compared with the Origin header of a request as browsers send it.
    """
    text = string(value, 'an origin like "http://localhost:9090"')
    scheme, sep, authority = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _ORIGIN_DEFAULT_PORTS:
        raise ValueError(
            f'expected an origin like "http://localhost:9090" or "https://admin.example.com", '
            f"got {quote(text)}"
        )
    if any(char in authority for char in "/?#"):
        raise ValueError(
            f"{quote(text)}: an origin is only scheme://host[:port], without a path "
            '(e.g. "http://localhost:9090")'
        )
    if "@" in authority:
        raise ValueError(f"{quote(text)}: an origin must not contain user info")
    host, port_text = _split_host_port(authority, text, '"http://HOST:PORT"', '"http://[::1]:9090"')
    host = host.lower()
    if ":" in host:
        host = f"[{ipaddress.IPv6Address(host)}]"  # the form browsers send
    elif not (_is_ipv4(host) or is_dns_name(host)):
        raise ValueError(f"{quote(text)}: {quote(host)} is not an IP address or a DNS name")
    port = _ORIGIN_DEFAULT_PORTS[scheme] if port_text is None else _port(port_text, text)
    if port == _ORIGIN_DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def admin_token(value: Any) -> str:
    """A bearer token: visible ASCII, no spaces (it travels in a header and a URL)."""
    token = string(value, "a token string")
    if not all("!" <= char <= "~" for char in token):
        raise ValueError("must be visible ASCII characters only (no spaces or control characters)")
    return token
