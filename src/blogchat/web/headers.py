"""Security headers on every HTTP response: CSP, nosniff, referrer policy, HSTS over https.

The headers are built and applied by the `secure` library (its ASGI middleware). It applies
one fixed set to every response, while HSTS belongs only on responses to https requests
(over plain http a browser ignores it, and sending it there advertises a promise the site
may not keep). So there are two sets, and each request is handed to the one its scheme
calls for; the scheme is uvicorn's, after a trusted proxy's `X-Forwarded-Proto`.
"""

from __future__ import annotations

from typing import cast

from secure import (
    ContentSecurityPolicy,
    ReferrerPolicy,
    Secure,
    StrictTransportSecurity,
    XContentTypeOptions,
    XFrameOptions,
)
from secure.middleware import SecureASGIMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

# Everything the pages load comes from the site itself: no inline script or style, no
# third-party origin, no plugins, and no page may frame them. `data:` images are the CSS's
# own icons. `connect-src 'self'` covers the chat's WebSocket on the same host.
CONTENT_SECURITY_POLICY = (
    ContentSecurityPolicy()
    .default_src("'self'")
    .script_src("'self'")
    .style_src("'self'")
    .img_src("'self'", "data:")
    .connect_src("'self'")
    .object_src("'none'")
    .base_uri("'none'")
    .form_action("'self'")
    .frame_ancestors("'none'")
)
HSTS_MAX_AGE = 2 * 365 * 24 * 3600


def _headers(*, https: bool) -> Secure:
    return Secure(
        csp=CONTENT_SECURITY_POLICY,
        hsts=StrictTransportSecurity().max_age(HSTS_MAX_AGE) if https else None,
        referrer=ReferrerPolicy().strict_origin_when_cross_origin(),
        xcto=XContentTypeOptions().nosniff(),
        # For browsers that predate `frame-ancestors`.
        xfo=XFrameOptions().deny(),
    )


class SecurityHeaders:
    """Adds the security headers to every HTTP response; HSTS only to https requests."""

    def __init__(self, app: ASGIApp) -> None:
        # (`secure` types ASGI loosely: its middleware is an ASGI app like any other.)
        self._http = cast(ASGIApp, SecureASGIMiddleware(app, secure=_headers(https=False)))
        self._https = cast(ASGIApp, SecureASGIMiddleware(app, secure=_headers(https=True)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chosen = self._https if scope.get("scheme") == "https" else self._http
        await chosen(scope, receive, send)
