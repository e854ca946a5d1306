"""`charon hash-password`: a bcrypt (cost 12) or argon2id hash for `basic_auth` users."""

from __future__ import annotations

import getpass
import sys
from typing import Any

BCRYPT_COST = 12
BCRYPT_MAX = 72  # bytes bcrypt looks at: a longer password would be cut without a word


def add_parser(commands: Any) -> None:
    """The `hash-password` subcommand, on the subparsers of `charon`."""
    p = commands.add_parser(
        "hash-password", help="print a password hash for basic_auth users",
        description="Read a password (twice from a terminal, else one line from stdin) and "
                    "print its bcrypt hash (cost 12), or with --argon2 its argon2id hash, for "
                    "basic_auth's users or an htpasswd file.",
    )
    p.add_argument("--argon2", action="store_true", help="an argon2id hash instead of bcrypt")


def main(args: Any) -> int:
    try:
        password = _read_password()
    except (EOFError, KeyboardInterrupt):
        return _fail("no password read")
    except ValueError as exc:
        return _fail(str(exc))
    if not password:
        return _fail("the password is empty")
    secret = password.encode("utf-8")
    if args.argon2:
        import argon2

        print(argon2.PasswordHasher().hash(secret))
        return 0
    if len(secret) > BCRYPT_MAX:
        return _fail(f"bcrypt uses only the first {BCRYPT_MAX} bytes of a password: use a "
                     "shorter one or --argon2")
    if "\0" in password:
        return _fail("bcrypt cannot hash a password with a NUL character: use --argon2")
    import bcrypt

    print(bcrypt.hashpw(secret, bcrypt.gensalt(BCRYPT_COST)).decode("ascii"))
    return 0


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise ValueError("the passwords differ")
        return first
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.removesuffix("\n").removesuffix("\r")


def _fail(message: str) -> int:
    print(f"charon hash-password: {message}", file=sys.stderr)
    return 1
