"""Request targets the proxy refuses rather than forward (issue #10; decision 8 forbids
rewriting them).

A path with a dot-segment is routed by its raw location prefix and then resolved by the
backend: `/public/../admin` matches the `/public/` location and reaches `/admin` behind it, so
a location's rules would be bypassed. Such paths get 400, as do targets with a fragment (a
client never sends one, RFC 9112 3.2). Encoded dots (`%2e`, any case) count as dots, and
encoded slashes and backslashes (`%2f`, `%5c`, `\\`) count as separators for this check only:
many backends decode or normalise them before resolving the path, and `/public%2f..%2fadmin`
must not get past a location that `/public/../admin` cannot. They are still allowed (and
forwarded untouched) in paths without dot-segments, e.g. `/api/projects/group%2Fname`.
"""

from __future__ import annotations

from charon.worker.http.errors import HttpError


def check_target(path: bytes) -> None:
    """Raise HttpError(400) for a path the backend could resolve outside its location."""
    # The common path has none of these, and then costs four finds (`in` costs five times as
    # much on bytes: it tries the needle as an int first).
    if path.find(b"#") != -1:
        raise HttpError(400, "a request target cannot carry a fragment", close=False)
    if (
        path.find(b"/.") != -1
        or path.find(b"%") != -1
        or path.find(b"\\") != -1
    ) and has_dot_segment(path):
        raise HttpError(400, "the path has a dot-segment", close=False)


def has_dot_segment(path: bytes) -> bool:
    """Whether the path (up to `?`) has a `.` or `..` segment (`;` parameters aside), once
    `%2e` is read as a dot and `%2f`, `%5c` and `\\` as slashes."""
    end = path.find(b"?")
    if end != -1:
        path = path[:end]
    p = (
        path.lower()
        .replace(b"%2e", b".")
        .replace(b"%2f", b"/")
        .replace(b"%5c", b"/")
        .replace(b"\\", b"/")
    )
    for segment in p.split(b"/"):
        # `..;x` too: Tomcat and others drop a segment's `;` parameters before resolving.
        segment = segment.partition(b";")[0]
        if segment == b"." or segment == b"..":
            return True
    return False
