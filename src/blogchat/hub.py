"""The realtime hub: authenticates WebSocket upgrades, owns the connections, routes each
client message to the right chat session, and keeps track of subscriptions.

It holds no agent logic: everything about a chat's transcript lives in ChatSession.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from blogchat import policy
from blogchat import protocol as wire
from blogchat.content import Blog
from blogchat.eventlog import MAX_LOG_EVENTS
from blogchat.origins import origin_allowed
from blogchat.personas import Personas
from blogchat.session import ChatSession, ChatSessions, SessionClosed, user_message_event
from blogchat.settings import Settings
from blogchat.store import ChatRecord, DuplicateClientMessage, MessageRecord, Store
from blogchat.visitors import COOKIE_NAME, Visitor, Visitors

log = logging.getLogger(__name__)

# Close codes (4000-4999 are ours to define).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403
CLOSE_SLOW_CONSUMER = 4008
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009


class ConnectionState(enum.Enum):
    """Where a connection is in its life."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Connection:
    """One open WebSocket: a bounded send queue drained by its own writer task.

    Delivering never waits on the network, so one slow reader cannot hold up a chat's
    other subscribers; a reader that falls too far behind is disconnected instead.
    Frames replayed on resume are already held by the chat's log, so they do not count
    towards that limit: a resume after a long absence must not look like falling behind.
    """

    def __init__(self, websocket: WebSocket, visitor: Visitor, *, queue_limit: int) -> None:
        self.id = uuid.uuid4().hex
        self.websocket = websocket
        self.visitor = visitor
        self.state = ConnectionState.OPEN
        self.subscriptions: set[str] = set()
        self._queue: deque[str] = deque()
        self._queue_limit = queue_limit
        # Replayed frames still queued, and the span of each replay counted in frames ever
        # queued: the queue is FIFO, so a frame's number tells whether it was replayed.
        self._replaying = 0
        self._replays: deque[tuple[int, int]] = deque()
        self._queued = 0
        self._sent = 0
        self._wake = asyncio.Event()
        self._close_code: int | None = None

    def deliver(self, frame: str) -> None:
        """Queue a frame (a chat event, or an answer to this connection)."""
        if self.state is not ConnectionState.OPEN:
            return
        if self.backlog >= self._queue_limit:
            log.warning("connection %s fell %d frames behind; closing", self.id, self.backlog)
            self.close(CLOSE_SLOW_CONSUMER)
            return
        self._queue.append(frame)
        self._queued += 1
        self._wake.set()

    def replay(self, frames: Sequence[str]) -> None:
        """Queue the frames a resume replays from a chat's log."""
        if self.state is not ConnectionState.OPEN or not frames:
            return
        if self._replaying + len(frames) > MAX_LOG_EVENTS:
            # Re-subscribing again and again without reading is falling behind too.
            log.warning("connection %s asked for too long a replay; closing", self.id)
            self.close(CLOSE_SLOW_CONSUMER)
            return
        self._queue.extend(frames)
        self._replays.append((self._queued, self._queued + len(frames)))
        self._queued += len(frames)
        self._replaying += len(frames)
        self._wake.set()

    def send(self, message: wire.WireModel) -> None:
        """Queue a protocol message for this connection only."""
        self.deliver(message.to_json())

    def close(self, code: int) -> None:
        """Close after the frames already sent (the queue is dropped)."""
        if self.state is ConnectionState.OPEN:
            self.state = ConnectionState.CLOSING
            self._close_code = code
            self._drop_queue()
            self._wake.set()

    @property
    def backlog(self) -> int:
        """Live frames waiting to be sent (replayed ones not counted)."""
        return len(self._queue) - self._replaying

    def _next_frame(self) -> str:
        number = self._sent
        self._sent += 1
        if self._replays and self._replays[0][0] <= number:
            self._replaying -= 1
            if number + 1 == self._replays[0][1]:
                self._replays.popleft()
        return self._queue.popleft()

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._replays.clear()
        self._replaying = 0
        self._queued = self._sent = 0

    async def write_forever(self) -> None:
        """Send queued frames in order until the connection closes."""
        websocket = self.websocket
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    await websocket.send_text(self._next_frame())
                if self.state is ConnectionState.CLOSING:
                    with contextlib.suppress(Exception):
                        await websocket.close(self._close_code or CLOSE_GOING_AWAY)
                    return
        except (WebSocketDisconnect, RuntimeError, OSError):
            # The peer went away while we were writing; the reader notices too.
            return
        finally:
            self.state = ConnectionState.CLOSED
            self._drop_queue()


@dataclass(frozen=True)
class _Refusal:
    status: int
    code: int
    reason: str


class Hub:
    """Serves `/ws`: one reader loop per connection, dispatching to chat sessions."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        visitors: Visitors,
        sessions: ChatSessions,
        personas: Personas,
        blog: Blog,
    ) -> None:
        self.blog = blog
        self.settings = settings
        self.store = store
        self.visitors = visitors
        self.sessions = sessions
        self.personas = personas
        self.connections: dict[str, Connection] = {}
        # One lock per visitor serializes idempotency checks of `chat` messages, so a
        # message resent on two connections at once still starts only one turn.
        self._visitor_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._handlers: dict[str, Callable[[Connection, wire.WireModel], Awaitable[None]]] = {
            "subscribe": self._subscribe,  # type: ignore[dict-item]
            "unsubscribe": self._unsubscribe,  # type: ignore[dict-item]
            "chat": self._chat,  # type: ignore[dict-item]
            "stop": self._stop,  # type: ignore[dict-item]
            "ping": self._ping,  # type: ignore[dict-item]
        }

    # --- the connection ---------------------------------------------------------------

    async def serve(self, websocket: WebSocket) -> None:
        """Run one WebSocket connection from upgrade to close."""
        visitor, refusal = await self._authenticate(websocket)
        if refusal is not None or visitor is None:
            assert refusal is not None
            await self._refuse(websocket, refusal)
            return
        await websocket.accept()
        connection = Connection(websocket, visitor, queue_limit=self.settings.send_queue_limit)
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
            await websocket.send_denial_response(
                Response(refusal.reason, status_code=refusal.status, media_type="text/plain")
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
            await self._handlers[message.type](connection, message)
        except wire.ProtocolError as exc:
            connection.send(exc.to_error())
        except _Rejected as exc:
            connection.send(
                wire.Error(
                    code=exc.code,
                    message=exc.message,
                    chat_id=exc.chat_id,
                    retryable=exc.retryable,
                    request_id=request_id,
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

    def _forget(self, connection: Connection) -> None:
        # Only the subscriptions go: a running turn goes on for the chat's other
        # subscribers, and for this visitor when it reconnects.
        self.connections.pop(connection.id, None)
        for chat_id in connection.subscriptions:
            session = self.sessions.get(chat_id)
            if session is not None:
                session.unsubscribe(connection)
        connection.subscriptions.clear()

    async def close_all(self) -> None:
        """Tell every client the server is going away (at shutdown)."""
        for connection in list(self.connections.values()):
            connection.close(CLOSE_GOING_AWAY)

    def chat_deleted(self, chat_id: str) -> None:
        """Tell a deleted chat's subscribers, and forget their subscriptions."""
        for connection in self.connections.values():
            if chat_id in connection.subscriptions:
                connection.subscriptions.discard(chat_id)
                connection.send(
                    wire.Error(code="not_found", message="This chat was deleted.", chat_id=chat_id)
                )

    # --- handlers ---------------------------------------------------------------------

    async def _subscribe(self, connection: Connection, message: wire.Subscribe) -> None:
        session = await self._own_session(connection.visitor, message.chat_id)
        try:
            session.subscribe(
                connection, after_seq=message.after_seq, request_id=message.request_id
            )
        except SessionClosed:
            raise _Rejected("not_found", "This chat no longer exists.", message.chat_id) from None
        connection.subscriptions.add(message.chat_id)
        model = self._model_for(session.chat, connection)
        session.prepare(policy.model_id(self.settings, model))

    async def _unsubscribe(self, connection: Connection, message: wire.Unsubscribe) -> None:
        await self._own_chat(connection.visitor, message.chat_id)
        session = self.sessions.get(message.chat_id)
        if session is not None:
            session.unsubscribe(connection)
        connection.subscriptions.discard(message.chat_id)

    async def _stop(self, connection: Connection, message: wire.Stop) -> None:
        await self._own_chat(connection.visitor, message.chat_id)
        session = self.sessions.get(message.chat_id)
        if session is not None:
            session.stop()

    async def _ping(self, connection: Connection, message: wire.Ping) -> None:
        connection.send(wire.Pong(request_id=message.request_id))

    async def _chat(self, connection: Connection, message: wire.Chat) -> None:
        visitor = connection.visitor
        text = message.text.strip()
        if not text:
            raise _Rejected("bad_request", "The message is empty.", message.chat_id)
        if len(text) > self.settings.max_message_chars:
            raise _Rejected(
                "too_large",
                f"Messages are limited to {self.settings.max_message_chars} characters.",
                message.chat_id,
            )
        if message.model is not None and not policy.allowed(
            message.model, anonymous=visitor.anonymous
        ):
            raise _Rejected(
                "model_not_allowed",
                f"Sign in to use {policy.LABELS[message.model]}. Anonymous chats use Haiku.",
                message.chat_id,
            )
        lock = self._visitor_locks.setdefault(visitor.id, asyncio.Lock())
        async with lock:
            previous = await self.store.chats.find_client_message(
                visitor.id, message.client_message_id
            )
            if previous is not None:
                await self._resend(connection, message, previous.chat_id, previous)
                return
            if message.chat_id is None:
                await self._new_chat(connection, message, text)
            else:
                await self._existing_chat(connection, message, text)

    async def _new_chat(self, connection: Connection, message: wire.Chat, text: str) -> None:
        visitor = connection.visitor
        persona = self.personas.default
        if message.persona is not None:
            if message.persona not in self.personas:
                raise _Rejected("persona_unknown", f"There is no persona {message.persona!r}.")
            persona = self.personas[message.persona]
        if message.post is not None and self.blog.post(message.post) is None:
            raise _Rejected("bad_request", f"There is no post {message.post!r}.")
        model = message.model or policy.default_for(persona, anonymous=visitor.anonymous)
        # The engine may have an agent process started ahead for such a chat: its id.
        chat_id = self.sessions.engine.new_chat_id(persona, policy.model_id(self.settings, model))
        try:
            chat = await self.store.chats.create_chat(
                ChatRecord(
                    id=chat_id,
                    owner_id=visitor.id,
                    title=title_for(text),
                    persona=persona.id,
                    model=model,
                    created_by=message.client_message_id,
                    post_slug=message.post,
                )
            )
        except BaseException:
            # The chat does not exist: nothing the engine prepared for it may linger.
            await self.sessions.engine.release(chat_id)
            raise
        session = await self.sessions.open(chat)
        connection.send(
            wire.ChatCreated(
                chat_id=chat.id,
                client_message_id=message.client_message_id,
                model=model,
                persona=persona.id,
                request_id=message.request_id,
            )
        )
        session.subscribe(connection, after_seq=session.last_seq, request_id=None, announce=False)
        connection.subscriptions.add(chat.id)
        await self._accept(session, message, text, model, visitor)

    async def _existing_chat(self, connection: Connection, message: wire.Chat, text: str) -> None:
        assert message.chat_id is not None
        visitor = connection.visitor
        session = await self._own_session(visitor, message.chat_id)
        chat = session.chat
        if message.persona is not None and message.persona != chat.persona:
            raise _Rejected(
                "persona_locked",
                "A chat keeps the persona it started with. Start a new chat to switch.",
                chat.id,
            )
        if message.post is not None and message.post != chat.post_slug:
            raise _Rejected(
                "bad_request", "A chat's post is set when the chat is created.", chat.id
            )
        model = message.model or self._model_for(chat, connection)
        if model != chat.model:
            await self.store.chats.update_chat(chat.id, model=model)
            session.set_chat(replace(chat, model=model))
        if chat.id not in connection.subscriptions:
            # The sender always hears about its own message, as with a new chat.
            session.subscribe(
                connection, after_seq=session.last_seq, request_id=None, announce=False
            )
            connection.subscriptions.add(chat.id)
        await self._accept(session, message, text, model, visitor)

    @staticmethod
    def _model_for(chat: ChatRecord, connection: Connection) -> wire.ModelAlias:
        """The chat's model, if its visitor may use it (a chat that was on another model while
        its owner was signed in goes on with the default)."""
        model: wire.ModelAlias = chat.model  # type: ignore[assignment]
        if not policy.allowed(model, anonymous=connection.visitor.anonymous):
            return policy.DEFAULT_MODEL
        return model

    async def _accept(
        self,
        session: ChatSession,
        message: wire.Chat,
        text: str,
        model: wire.ModelAlias,
        visitor: Visitor,
    ) -> None:
        try:
            await session.accept(
                client_message_id=message.client_message_id,
                text=text,
                model_alias=model,
                model_id=policy.model_id(self.settings, model),
                anonymous=visitor.anonymous,
            )
        except DuplicateClientMessage:
            raise _Rejected(
                "bad_request", "This clientMessageId was already used.", session.chat.id
            ) from None
        except SessionClosed:
            raise _Rejected("not_found", "This chat no longer exists.", session.chat.id) from None

    async def _resend(
        self, connection: Connection, message: wire.Chat, chat_id: str, previous: MessageRecord
    ) -> None:
        """A repeated clientMessageId: re-send the original answers, start nothing."""
        chat = await self.store.chats.get_chat(chat_id)
        if chat is None:
            raise _Rejected("not_found", "This chat no longer exists.", chat_id)
        if message.chat_id is not None and message.chat_id != chat_id:
            raise _Rejected(
                "bad_request",
                "This clientMessageId was already used in another chat.",
                message.chat_id,
            )
        if chat.created_by == message.client_message_id:
            connection.send(
                wire.ChatCreated(
                    chat_id=chat.id,
                    client_message_id=message.client_message_id,
                    model=chat.model,
                    persona=chat.persona,
                    request_id=message.request_id,
                )
            )
            if chat.id not in connection.subscriptions:
                session = await self.sessions.open(chat)
                session.subscribe(
                    connection,
                    after_seq=previous.seq_start - 1,
                    request_id=None,
                    announce=False,
                )
                connection.subscriptions.add(chat.id)
                return
        connection.send(user_message_event(previous))

    # --- ownership --------------------------------------------------------------------

    async def _own_chat(self, visitor: Visitor, chat_id: str) -> ChatRecord:
        """The chat, if this visitor owns it; otherwise not_found, revealing nothing."""
        session = self.sessions.get(chat_id)
        chat = session.chat if session is not None else await self.store.chats.get_chat(chat_id)
        if chat is None or chat.owner_id != visitor.id:
            raise _Rejected("not_found", "There is no such chat.", chat_id)
        return chat

    async def _own_session(self, visitor: Visitor, chat_id: str) -> ChatSession:
        chat = await self._own_chat(visitor, chat_id)
        return await self.sessions.open(chat)


class _Rejected(Exception):
    """A valid message that cannot be carried out; becomes an `error` frame."""

    def __init__(
        self,
        code: wire.ErrorCode,
        message: str,
        chat_id: str | None = None,
        *,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.code: wire.ErrorCode = code
        self.message = message
        self.chat_id = chat_id
        self.retryable = retryable


def title_for(text: str, limit: int = 60) -> str:
    """A chat title from its first message: the first line, cut at a word."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] or line[:limit]
    return cut.rstrip(",.;:!?") + "…"
