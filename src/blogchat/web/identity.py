"""The session cookie on every page and API request: read it, or issue one."""

from __future__ import annotations

from http.cookies import SimpleCookie

from starlette.datastructures import MutableHeaders
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blogchat.visitors import COOKIE_MAX_AGE, COOKIE_NAME, Visitor, Visitors

# Static files and health checks neither need a visitor nor set a cookie.
_SKIP_PREFIXES = ("/static/", "/healthz", "/favicon")


def set_visitor_cookie(
    response: Response, connection: HTTPConnection, visitors: Visitors, visitor: Visitor
) -> None:
    """Point the browser's session cookie at this visitor."""
    response.set_cookie(
        COOKIE_NAME,
        visitors.cookie_value(visitor),
        max_age=COOKIE_MAX_AGE,
        httponly=True,
        samesite="lax",
        secure=connection.url.scheme == "https",
        path="/",
    )


class VisitorMiddleware:
    """Puts `request.state.visitor` on every HTTP request; new visitors get a cookie.

    A route that signs a visitor in or out sets the cookie itself; this middleware then
    leaves that Set-Cookie alone.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_SKIP_PREFIXES):
            await self.app(scope, receive, send)
            return
        # The lifespan creates the Visitors service, after middleware is built.
        visitors: Visitors = scope["app"].state.visitors
        connection = HTTPConnection(scope)
        visitor = await visitors.from_cookie(connection.cookies.get(COOKIE_NAME))
        issue = visitor is None
        if visitor is None:
            visitor = visitors.new_anonymous()
        scope.setdefault("state", {})["visitor"] = visitor

        async def send_with_cookie(message: Message) -> None:
            if issue and message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if not _sets_session_cookie(headers):
                    cookie = Response()
                    set_visitor_cookie(cookie, connection, visitors, visitor)
                    headers.append("set-cookie", cookie.headers["set-cookie"])
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _sets_session_cookie(headers: MutableHeaders) -> bool:
    return any(COOKIE_NAME in SimpleCookie(value) for value in headers.getlist("set-cookie"))
