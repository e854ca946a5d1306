"""ACME HTTP-01 answers (RFC 8555 8.3), served by the proxy itself on any host.

The supervisor's ACME client writes each pending challenge's key authorization to a file under
the state directory (charon/tls/paths.py); a request for its token gets the file's bytes. A
token without a file goes on to the backend as any request does, so a backend that runs its
own ACME client keeps working behind the proxy.
"""

from __future__ import annotations

import os

from charon.tls.paths import HTTP01_PREFIX, http01_path
from charon.worker.http.errors import HttpError

PREFIX = HTTP01_PREFIX.encode("ascii")
MAX_ANSWER = 4096  # a key authorization is token "." thumbprint: well under a few hundred bytes


def challenge_answer(state_dir: str, path: bytes) -> HttpError | None:
    """The proxy's own 200 for `path` (known to start with PREFIX), or None: not one of ours."""
    token = path[len(PREFIX):].split(b"?", 1)[0]
    try:
        where = http01_path(state_dir, token.decode("ascii"))
    except UnicodeDecodeError:
        return None
    if where is None:
        return None
    # A plain small read: the file is written elsewhere and renamed into place whole.
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        body = os.read(fd, MAX_ANSWER)
    except OSError:
        return None
    finally:
        os.close(fd)
    return HttpError(200, close=False, body=body)
