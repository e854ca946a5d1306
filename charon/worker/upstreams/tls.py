"""TLS toward https:// backends: one client context per way of verifying, made once.

A context holds the CA store it verifies with, so building one per connection would read the
system's (or tls_ca's) certificates each time; a worker needs only a few.
"""

from __future__ import annotations

import ssl

_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}


def client_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """A context that checks the backend's chain and name against `ca_file` (the system's
    store when None), or checks nothing when `verify` is false (tls_verify = false)."""
    key = (verify, ca_file if verify else None)
    context = _contexts.get(key)
    if context is None:
        if verify:
            context = ssl.create_default_context(cafile=ca_file)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The proxy speaks HTTP/1.1 to backends; a backend that also does h2 must not pick it.
        context.set_alpn_protocols(["http/1.1"])
        _contexts[key] = context
    return context
