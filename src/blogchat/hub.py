"""The realtime hub: authenticates WebSocket upgrades, owns the connections, reads frames,
routes each client message to the chat service, and keeps track of subscriptions.

It holds no chat rules: those live in `Chats` (chats.py), which the REST API uses too.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
from dataclasses import dataclass

from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from blogchat import protocol as wire
from blogchat.addresses import client_address
from blogchat.chats import ChatError, Chats
from blogchat.connection import (
    CLOSE_FORBIDDEN_ORIGIN,
    CLOSE_GOING_AWAY,
    CLOSE_TOO_MANY,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNAVAILABLE,
    Connection,
    ConnectionState,
)
from blogchat.origins import origin_allowed
from blogchat.quotas import Connections, CountsUnreachable
from blogchat.session import ChatSessions
from blogchat.settings import Settings
from blogchat.visitors import COOKIE_NAME, Visitor, Visitors

log = logging.getLogger(__name__)

# At shutdown, how long connections may take to send the ends of the turns.
DRAIN_SECONDS = 2.0

STILL_ANSWERING = "The answer to your last subscribe to this chat is still on its way."
# What a client refused with 503 is told to wait before it tries again, in seconds.
UNAVAILABLE_RETRY_AFTER = 5
UNAVAILABLE = "the server cannot take connections right now; try again shortly"

# A subscribe answer this large (a history, in characters) is sent at most once at a time
# per connection and chat; smaller ones are not worth holding a repeat off for.
LARGE_ANSWER = 64 * 1024


# Set in a connection's task once its upgrade was refused with an HTTP status.
_DENIED: contextvars.ContextVar[bool] = contextvars.ContextVar("denied", default=False)


class _DeniedHandshakeFilter(logging.Filter):
    """Drops uvicorn's "returned without completing handshake" error after a refusal the hub
    sent: its websockets-sansio protocol never marks a denial response as the handshake's
    end (uvicorn PR #3138), so every 401/403/429/503 would log an ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_DENIED.get() and "without completing handshake" in record.getMessage())


def _quiet_denials() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(each, _DeniedHandshakeFilter) for each in logger.filters):
        logger.addFilter(_DeniedHandshakeFilter())


@dataclass(frozen=True)
class _Refusal:
    status: int
    code: int
    reason: str
    retry_after: int | None = None


class Hub:
    """Serves `/ws`: one reader loop per connection, dispatching to the chat service."""

    def __init__(
        self,
        *,
        settings: Settings,
        visitors: Visitors,
        chats: Chats,
        sessions: ChatSessions,
        caps: Connections | None = None,
    ) -> None:
        self.settings = settings
        self.visitors = visitors
        self.chats = chats
        self.sessions = sessions
        self.caps = caps or Connections(settings)
        self.connections: dict[str, Connection] = {}
        _quiet_denials()

    # --- the connection ---------------------------------------------------------------

    async def serve(self, websocket: WebSocket) -> None:
        """Run one WebSocket connection from upgrade to close."""
        unavailable = _Refusal(503, CLOSE_UNAVAILABLE, UNAVAILABLE, UNAVAILABLE_RETRY_AFTER)
        address = client_address(websocket.scope)
        try:
            visitor, refusal = await self._authenticate(websocket)
            slot = None if visitor is None else await self.caps.open(visitor.id, address)
        except CountsUnreachable:
            # Logged once by the counts, not once per connection refused.
            await self._refuse(websocket, unavailable)
            return
        except Exception:
            # Never uvicorn's bare 500: the client is told to come back (a database that
            # did not answer the sign-in check, say).
            log.exception("a WebSocket upgrade failed")
            await self._refuse(websocket, unavailable)
            return
        if refusal is not None or visitor is None:
            assert refusal is not None
            await self._refuse(websocket, refusal)
            return
        if slot is None:
            await self._refuse(websocket, _Refusal(429, CLOSE_TOO_MANY, "too many connections"))
            return
        try:
            await self._serve(websocket, visitor, address)
        finally:
            await self.caps.close(slot)

    async def _serve(self, websocket: WebSocket, visitor: Visitor, address: str) -> None:
        await websocket.accept()
        connection = Connection(
            websocket,
            visitor,
            queue_limit=self.settings.send_queue_limit,
            queue_bytes=self.settings.send_queue_bytes,
            address=address,
        )
        self.connections[connection.id] = connection
        writer = asyncio.create_task(connection.write_forever(), name=f"ws-writer-{connection.id}")
        try:
            await self._read_forever(connection)
        finally:
            self._forget(connection)
            connection.close(CLOSE_GOING_AWAY)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 5)
            if not writer.done():
                writer.cancel()

    async def _authenticate(self, websocket: WebSocket) -> tuple[Visitor | None, _Refusal | None]:
        origin = websocket.headers.get("origin")
        if not self._origin_allowed(websocket, origin):
            return None, _Refusal(403, CLOSE_FORBIDDEN_ORIGIN, "origin not allowed")
        visitor = await self.visitors.from_cookie(websocket.cookies.get(COOKIE_NAME))
        if visitor is None:
            return None, _Refusal(401, CLOSE_UNAUTHORIZED, "no valid session cookie")
        return visitor, None

    def _origin_allowed(self, websocket: WebSocket, origin: str | None) -> bool:
        return origin_allowed(
            origin,
            scheme=websocket.url.scheme,
            host=websocket.headers.get("host"),
            allowed=self.settings.allowed_origins,
        )

    async def _refuse(self, websocket: WebSocket, refusal: _Refusal) -> None:
        # Refuse the handshake with a plain HTTP status where the server supports it, so
        # nothing is ever accepted; otherwise close before accepting (HTTP 403).
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            _DENIED.set(True)
            headers = {}
            if refusal.retry_after is not None:
                headers["Retry-After"] = str(refusal.retry_after)
            await websocket.send_denial_response(
                Response(
                    refusal.reason,
                    status_code=refusal.status,
                    media_type="text/plain",
                    headers=headers,
                )
            )
        else:
            await websocket.close(refusal.code, refusal.reason)

    async def _read_forever(self, connection: Connection) -> None:
        websocket = connection.websocket
        limit = self.settings.max_frame_bytes
        while connection.state is ConnectionState.OPEN:
            try:
                frame = await websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if frame["type"] == "websocket.disconnect":
                return
            text = frame.get("text")
            if text is None:
                connection.send(
                    wire.Error(code="bad_request", message="binary frames are not supported")
                )
                continue
            if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
                connection.send(
                    wire.Error(
                        code="too_large",
                        message=f"frames are limited to {limit} bytes",
                    )
                )
                continue
            await self.handle_frame(connection, text)

    async def handle_frame(self, connection: Connection, text: str) -> None:
        """Parse one text frame and dispatch it; every failure becomes an `error` frame."""
        request_id: str | None = None
        try:
            message = wire.parse_client_message(text)
            request_id = message.request_id
            await self._dispatch(connection, message)
        except wire.ProtocolError as exc:
            connection.send(exc.to_error())
        except ChatError as exc:
            wait = None if exc.retry_after is None else max(1, math.ceil(exc.retry_after))
            connection.send(
                wire.Error(
                    code=exc.code,
                    message=exc.message,
                    chat_id=exc.chat_id,
                    retryable=exc.retryable,
                    request_id=request_id,
                    retry_after=wait,
                )
            )
        except Exception:
            log.exception("connection %s: message failed", connection.id)
            connection.send(
                wire.Error(
                    code="internal",
                    message="Something went wrong on our side. Try again.",
                    retryable=True,
                    request_id=request_id,
                )
            )

    async def _dispatch(self, connection: Connection, message: wire.ClientMessage) -> None:
        visitor = connection.visitor
        match message:
            case wire.Subscribe(chat_id=chat_id, after_seq=after_seq, request_id=request_id):
                if connection.answering(chat_id):
                    # The last answer, a large history, is still on its way out: a client
                    # that keeps asking for it without reading costs no more memory.
                    raise ChatError(
                        "rate_limited", STILL_ANSWERING, chat_id, retryable=True, retry_after=1
                    )
                before = connection.delivered_size
                await self.chats.subscribe(
                    visitor, chat_id, connection, after_seq=after_seq, request_id=request_id
                )
                if connection.delivered_size - before >= LARGE_ANSWER:
                    connection.answered(chat_id)
                connection.subscriptions.add(chat_id)
            case wire.Unsubscribe(chat_id=chat_id):
                await self.chats.unsubscribe(visitor, chat_id, connection)
                connection.subscriptions.discard(chat_id)
            case wire.Chat():
                subscribed = await self.chats.send(
                    visitor, message, connection, address=connection.address
                )
                if subscribed is not None:
                    connection.subscriptions.add(subscribed)
            case wire.Stop(chat_id=chat_id):
                await self.chats.stop(visitor, chat_id)
            case wire.Ping(request_id=request_id):
                connection.send(wire.Pong(request_id=request_id))

    def _forget(self, connection: Connection) -> None:
        # Only the subscriptions go: a running turn goes on for the chat's other
        # subscribers, and for this visitor when it reconnects.
        self.connections.pop(connection.id, None)
        for chat_id in connection.subscriptions:
            session = self.sessions.get(chat_id)
            if session is not None:
                session.unsubscribe(connection)
        connection.subscriptions.clear()

    async def drain(self) -> None:
        """At shutdown, once the turns have ended: let each connection send what it has
        queued (the turns' ends), for at most DRAIN_SECONDS, then close them all."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                # Polled: a connection has no "sent everything" event, and this runs once.
                while any(c.backlog for c in self.connections.values()):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        await self.close_all()

    async def close_all(self) -> None:
        """Tell every client the server is going away (at shutdown)."""
        for connection in list(self.connections.values()):
            connection.close(CLOSE_GOING_AWAY)
