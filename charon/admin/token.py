"""The live log's token: how a request shows it, never in a URL.

A URL stays in browser history, in proxies' logs and in Referer headers, so the token travels
in a header: `Authorization: Bearer TOKEN` (charon logs, scripts) or, from the live-log page,
whose browser WebSocket API sets no header but `Sec-WebSocket-Protocol`, as a subprotocol
`charon-token.BASE64URL(TOKEN)` beside the page's own `charon-logs` (Kubernetes' API server
takes bearer tokens from browsers the same way). The page keeps the token in its tab's session
storage and asks for it with a form (page.html).
"""

from __future__ import annotations

import base64
import hmac

from aiohttp import web

LOGS_PROTOCOL = "charon-logs"  # the subprotocol the page asks for, beside its token's
TOKEN_PROTOCOL = "charon-token."  # + the token, base64url without padding


def authorized(request: web.Request, token: str | None) -> bool:
    """True when no token is configured, or the request carries it (header or subprotocol)."""
    if token is None:
        return True
    expected = token.encode()
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected):
        return True
    given = _protocol_token(request.headers.get("Sec-WebSocket-Protocol", ""))
    return given is not None and hmac.compare_digest(given, expected)


def unauthorized() -> web.Response:
    return web.Response(
        status=401,
        text="this admin listener needs a token: Authorization: Bearer TOKEN (the live-log "
             "page asks for it)\n",
        headers={"WWW-Authenticate": 'Bearer realm="charon admin"', "Cache-Control": "no-store"},
    )


def protocols(offered: str) -> tuple[str, ...]:
    """The subprotocols /logs may choose among: its own, and a token's that the client offered
    alone (so aiohttp has one to choose and does not log the offer, token and all)."""
    tokens = tuple(p.strip() for p in offered.split(",") if p.strip().startswith(TOKEN_PROTOCOL))
    return (LOGS_PROTOCOL, *tokens[:1])


def _protocol_token(offered: str) -> bytes | None:
    for item in offered.split(","):
        item = item.strip()
        if item.startswith(TOKEN_PROTOCOL):
            encoded = item[len(TOKEN_PROTOCOL):]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            except (ValueError, TypeError):
                return None
    return None
