"""Who may come in (issue 14), config side: `[access.NAME]` lists, and a host's or location's
`access` / `allow` / `deny`, `basic_auth` (users inline or from an htpasswd file) and
`forward_auth`, parsed into the `AccessList`, `BasicAuth` and `ForwardAuth` of rules.py.

Password hashes are only recognised here (bcrypt or argon2, parsed as far as is cheap); the
workers verify them. The supervisor reads htpasswd files when it loads the config.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import argon2

from charon.config import backends, values
from charon.config.model import IPNetwork
from charon.config.rules import AccessList, BasicAuth, ForwardAuth
from charon.config.table import ConfigError, InlineTable, Table, array_of, boolean
from charon.config.tls import ca_file, file_name

KEYS = ("access", "allow", "deny", "basic_auth", "forward_auth")
_BASIC_KEYS = ("realm", "users", "htpasswd", "forward_authorization")
_FORWARD_KEYS = ("url", "copy_headers", "timeout", "tls_ca")
DEFAULT_REALM = "Restricted"
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_ARGON2 = ("$argon2id$", "$argon2i$", "$argon2d$")
_HOW = "make it with `htpasswd -B` or `charon hash-password`"
# Hash kinds htpasswd and crypt(3) write that basic_auth refuses, named in the message.
_OTHER_KINDS = (
    ("$apr1$", "Apache MD5 (apr1)"),
    ("{SHA}", "SHA-1"),
    ("{SSHA}", "salted SHA-1"),
    ("$1$", "MD5-crypt"),
    ("$5$", "SHA-256-crypt"),
    ("$6$", "SHA-512-crypt"),
    ("$y$", "yescrypt"),
)

NamedLists = dict[str, tuple[AccessList, int]]  # name -> (its list, the line of its table)


# -- access lists ------------------------------------------------------------------------------


def named_lists(root: Table) -> NamedLists:
    """The `[access.NAME]` tables."""
    top = root.table("access")
    lists: NamedLists = {}
    for name, data in top.data.items():
        if not isinstance(data, dict):
            raise top.error(
                name, f'expected a table [access.{name}] with allow / deny, got '
                f"{values.describe(data)}"
            )
        table = top.table(name)
        table.check_keys(("allow", "deny"))
        if not table.data:
            raise table.error_at(table.path, f"{table.name} has neither allow nor deny")
        lists[name] = (
            AccessList(_networks(table, "allow"), _networks(table, "deny")), table.line
        )
    return lists


def access_list(
    table: Table, named: NamedLists, inherited: AccessList | None
) -> AccessList | None:
    """The host's or location's list: `access` names merged with inline `allow` / `deny`.

    A location that sets any of the three replaces its host's list (nginx's inheritance); one
    that ends up with no entry at all (`allow = []`) has no list."""
    if not any(key in table.data for key in ("access", "allow", "deny")):
        return inherited
    names = _names(table, named)
    allow: list[IPNetwork] = []
    deny: list[IPNetwork] = []
    for name in names:
        allow += named[name][0].allow
        deny += named[name][0].deny
    allow += _networks(table, "allow")
    deny += _networks(table, "deny")
    if not allow and not deny:
        return None
    return AccessList(tuple(dict.fromkeys(allow)), tuple(dict.fromkeys(deny)), names)


def _names(table: Table, named: NamedLists) -> tuple[str, ...]:
    if "access" not in table.data:
        return ()
    raw = table.data["access"]

    def known(value: Any) -> str:
        name = values.string(value, "an [access.NAME] list name")
        if name not in named:
            defined = ", ".join(sorted(named)) or "none is defined"
            raise ValueError(f"no [access.{name}] table (defined: {defined})")
        return name

    if isinstance(raw, str):
        return (table.parse("access", known),)
    items = table.parse("access", array_of("[access.NAME] list names"))
    return tuple(dict.fromkeys(table.elements("access", items, known)))


def _networks(table: Table, key: str) -> tuple[IPNetwork, ...]:
    if key not in table.data:
        return ()
    raw = table.data[key]
    if isinstance(raw, str):
        return (table.parse(key, values.network),)
    items = table.parse(key, array_of('CIDRs like "10.0.0.0/8" or IP addresses'))
    return tuple(table.elements(key, items, values.network))


# -- basic_auth --------------------------------------------------------------------------------


def basic_auth(table: Table, inherited: BasicAuth | None) -> BasicAuth | None:
    """A table (see _BASIC_KEYS), or false: none (a location opening up its host's auth)."""
    raw = table.table_or_false("basic_auth", '{ users = { alice = "$2b$..." } }')
    if raw is None:
        return inherited
    if raw is False:
        return None
    sub = InlineTable(table, "basic_auth", raw)
    sub.check_keys(_BASIC_KEYS)
    realm = sub.get("realm", _realm, DEFAULT_REALM)
    forward = sub.get("forward_authorization", boolean, False)
    users: dict[str, str] = {}
    if "users" in sub.data:
        raw_users = sub.data["users"]
        if not isinstance(raw_users, dict):
            raise sub.error(
                "users", f'expected a table like {{ alice = "$2b$..." }}, got '
                f"{values.describe(raw_users)}"
            )
        users_table = InlineTable(sub, "users", raw_users)
        for user, hashed in raw_users.items():
            try:
                _user_name(user)
                users[user] = password_hash(values.string(hashed, "a hash string"))
            except ValueError as err:
                raise users_table.error(user, str(err)) from None
    htpasswd = None
    if "htpasswd" in sub.data:
        name = sub.parse("htpasswd", lambda v: values.string(v, "an htpasswd file path"))
        path = sub.resolve(name)
        htpasswd = str(path)
        for user, hashed in _read_htpasswd(sub, htpasswd).items():
            if user in users:
                raise sub.error(
                    "htpasswd", f"user {values.quote(user)} of {htpasswd} is also in users"
                )
            users[user] = hashed
    if not users and (table.source.check_files or htpasswd is None):
        raise sub.error_at(sub.path, f"{sub.name}: no users (set users or htpasswd)")
    return BasicAuth(
        realm=realm,
        users=tuple(users.items()),
        forward_authorization=forward,
        htpasswd=htpasswd,
    )


def _realm(value: Any) -> str:
    realm = values.string(value, "a realm string")
    if not realm or not all(" " <= char <= "~" and char not in '"\\' for char in realm):
        raise ValueError(
            f"{values.quote(realm)}: use printable ASCII without quotes or backslashes "
            "(it goes in a WWW-Authenticate header)"
        )
    return realm


def _user_name(user: str) -> None:
    if not user or ":" in user or not user.isprintable():
        raise ValueError("a user name must not be empty or contain ':' or control characters")


def password_hash(value: str) -> str:
    """`value` if it is a bcrypt or argon2 hash (else ValueError naming its kind)."""
    if value.startswith(("$2a$", "$2b$", "$2y$")):
        match = _BCRYPT.fullmatch(value)
        if match is None or not 4 <= int(match[1]) <= 31:
            raise ValueError("not a valid bcrypt hash ($2b$COST$ and 53 characters)")
        return value
    if value.startswith(_ARGON2):
        try:
            argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            raise ValueError("not a valid argon2 hash") from None
        return value
    kind = next((name for prefix, name in _OTHER_KINDS if value.startswith(prefix)), None)
    if kind is None:
        kind = "crypt(3) DES" if len(value) == 13 and "$" not in value else "not a hash"
    raise ValueError(f"unsupported hash ({kind}): use bcrypt or argon2, {_HOW}")


def _read_htpasswd(table: Table, path: str) -> dict[str, str]:
    """USER:HASH lines (comments and blank lines allowed). With check_files off (a config
    looked at without its files, as the docs tests do) a file that cannot be read or a bad
    line is skipped: its users are refused, nothing else stops."""
    strict = table.source.check_files
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        if not strict:
            return {}
        reason = err.strerror if isinstance(err, OSError) and err.strerror else "not UTF-8 text"
        raise table.error("htpasswd", f"cannot read {values.quote(path)}: {reason}") from None
    users: dict[str, str] = {}
    lines: dict[str, int] = {}
    line_of = table.source.lines.line_of((*table.path, "htpasswd"))
    at = f"(the htpasswd of {table.name} at {table.source.path}:{line_of})"
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        try:
            if not colon:
                raise ValueError("expected USER:HASH")
            _user_name(user)
            if user in users:
                raise ValueError(f"user {values.quote(user)} is already on line {lines[user]}")
            users[user] = password_hash(hashed)
            lines[user] = number
        except ValueError as err:
            if strict:
                raise ConfigError(path, number, f"{err} {at}") from None
    return users


# -- forward_auth ------------------------------------------------------------------------------


def forward_auth(table: Table, inherited: ForwardAuth | None) -> ForwardAuth | None:
    """`{ url, copy_headers, timeout, tls_ca }`, or false: none."""
    raw = table.table_or_false("forward_auth", '{ url = "http://127.0.0.1:9091/api/verify" }')
    if raw is None:
        return inherited
    if raw is False:
        return None
    sub = InlineTable(table, "forward_auth", raw)
    sub.check_keys(_FORWARD_KEYS)
    url, upstream, path = sub.require("url", _auth_url)
    if "tls_ca" in sub.data:  # an auth service with a certificate of a private CA
        if not upstream.tls:
            raise sub.error("tls_ca", "needs an https:// url")
        name = sub.parse("tls_ca", lambda v: file_name(v, "a file path"))
        upstream = dataclasses.replace(upstream, tls_ca=ca_file(sub, "tls_ca", name))
    names: list[Any] = sub.get("copy_headers", array_of("header names"), [])
    copy = sub.elements("copy_headers", names, lambda v: _field_name(v))
    return ForwardAuth(
        url=url,
        upstream=upstream,
        path=path,
        copy_headers=tuple(dict.fromkeys(copy)),
        timeout=sub.get("timeout", values.positive_duration, 5.0),
    )


def _auth_url(value: Any) -> tuple[str, Any, str]:
    url = values.string(value, 'a URL like "http://127.0.0.1:9091/api/verify"')
    if "#" in url:
        raise ValueError(f"{values.quote(url)}: a URL must not have a fragment")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f'expected a URL like "http://127.0.0.1:9091/api/verify", got '
                         f"{values.quote(url)}")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, target = rest[:cut], rest[cut:]
    try:
        upstream = values.upstream(f"{scheme}://{authority}")
    except ValueError as err:
        raise ValueError(str(err).replace(f"{scheme}://{authority}", url)) from None
    if not target.startswith("/"):
        target = "/" + target
    if not all("!" <= char <= "~" for char in target):
        raise ValueError(f"{values.quote(url)}: the path must be visible ASCII without spaces")
    return url, upstream, target


def _field_name(value: Any) -> str:
    return backends._token(value, "a header name")


def describe(rules_access: AccessList | None) -> str:
    """For `charon check`: "allow 10.0.0.0/8 (office); deny 10.0.0.66"."""
    if rules_access is None:
        return ""
    parts = []
    if rules_access.allow:
        parts.append("allow " + ", ".join(map(_network, rules_access.allow)))
    if rules_access.deny:
        parts.append("deny " + ", ".join(map(_network, rules_access.deny)))
    names = f" ({', '.join(rules_access.names)})" if rules_access.names else ""
    return "; ".join(parts) + names


def _network(network: IPNetwork) -> str:
    """ "10.0.0.0/8", or "10.0.0.66" for one address."""
    whole = network.prefixlen == network.max_prefixlen
    return str(network.network_address) if whole else str(network)


def describe_basic(auth: BasicAuth) -> str:
    """For `charon check`: "2 users (bcrypt, argon2id) from /etc/app.htpasswd, realm "App""."""
    kinds = dict.fromkeys(_kind(hashed) for _, hashed in auth.users)
    count = len(auth.users)
    where = f" from {auth.htpasswd}" if auth.htpasswd else ""
    forward = ", Authorization forwarded" if auth.forward_authorization else ""
    return (
        f"{count} user{'s' if count != 1 else ''} ({', '.join(kinds)}){where}, "
        f"realm {values.quote(auth.realm)}{forward}"
    )


def _kind(hashed: str) -> str:
    return "bcrypt" if hashed.startswith("$2") else hashed.split("$")[1]
