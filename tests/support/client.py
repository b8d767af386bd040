"""Test clients that behave like a reader's browser: a cookie jar, REST calls, WebSockets."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from blogchat import protocol as wire

COOKIE = "blogchat_session"
Event = dict[str, Any]


class Reader:
    """One visitor: its own cookie, REST access and WebSocket connections."""

    def __init__(
        self, base_url: str, *, cookie: str | None = None, address: str | None = None
    ) -> None:
        self.base_url = base_url
        # A client address of its own, through X-Forwarded-For: the test server trusts it
        # from loopback, as it would from a reverse proxy (FORWARDED_ALLOW_IPS).
        self.headers = {"X-Forwarded-For": address} if address else {}
        # The server closes a connection idle for 5 s (uvicorn's keep-alive timeout), and
        # httpx would reuse one for 5 s too: a request sent on it as the server closes it
        # fails ("Server disconnected"). Idle connections are dropped well before that.
        self.http = httpx.AsyncClient(
            base_url=base_url,
            timeout=30,
            headers=self.headers,
            limits=httpx.Limits(keepalive_expiry=2.0),
        )
        if cookie is not None:
            # A returning visitor (e.g. after a server restart): same cookie, same identity.
            self.http.cookies.set(COOKIE, cookie, domain=httpx.URL(base_url).host)
        self.sockets: list[ChatSocket] = []

    async def __aenter__(self) -> Reader:
        response = await self.http.get("/api/me")
        response.raise_for_status()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for socket in self.sockets:
            await socket.close()
        await self.http.aclose()

    @property
    def cookie(self) -> str:
        """The visitor's signed session cookie."""
        value = self.http.cookies.get(COOKIE)
        assert value, "the server set no session cookie"
        return value

    async def me(self) -> dict[str, Any]:
        """GET /api/me."""
        response = await self.http.get("/api/me")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def register(
        self, email: str | None = None, password: str = "correct horse battery"
    ) -> dict[str, Any]:
        """Sign up (and in) with a fresh email."""
        email = email or f"reader-{uuid.uuid4().hex[:10]}@example.com"
        response = await self.http.post(
            "/api/auth/register", json={"email": email, "password": password}
        )
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data

    async def connect(self, *, origin: str | None = None) -> ChatSocket:
        """Open a WebSocket with this visitor's cookie and the server's own Origin."""
        ws_url = self.base_url.replace("http://", "ws://") + "/ws"
        connection = await connect(
            ws_url,
            origin=origin or self.base_url,  # type: ignore[arg-type]
            additional_headers={"Cookie": f"{COOKIE}={self.cookie}", **self.headers},
            max_size=None,
            # Keep reading frames a test never consumes; otherwise flow control stops the
            # client from seeing the server's close frame and close() waits 10 s.
            max_queue=None,
            open_timeout=10,
        )
        socket = ChatSocket(connection)
        self.sockets.append(socket)
        return socket


class ChatSocket:
    """A WebSocket speaking the blogchat protocol, with helpers to wait for events."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.received: list[Event] = []

    async def send(self, **message: Any) -> None:
        """Send one protocol message (keyword arguments are its wire fields)."""
        await self.connection.send(json.dumps(message))

    async def send_raw(self, frame: str | bytes) -> None:
        """Send a frame as is."""
        await self.connection.send(frame)

    async def chat(self, text: str, chat_id: str | None = None, **fields: Any) -> str:
        """Send a `chat` message; returns its clientMessageId."""
        client_message_id = fields.pop("clientMessageId", None) or str(uuid.uuid4())
        await self.send(
            type="chat", chatId=chat_id, clientMessageId=client_message_id, text=text, **fields
        )
        return client_message_id

    async def recv(self, timeout: float = 15) -> Event:
        """The next message, validated against the protocol."""
        frame = await asyncio.wait_for(self.connection.recv(), timeout)
        wire.parse_server_message(frame)  # every frame must be a valid protocol message
        event: Event = json.loads(frame)
        self.received.append(event)
        return event

    async def expect(self, kind: str, timeout: float = 15) -> Event:
        """The next message, which must be of this type."""
        event = await self.recv(timeout)
        assert event["type"] == kind, f"expected {kind}, got {event}"
        return event

    async def until(self, kind: str, timeout: float = 30, **match: Any) -> list[Event]:
        """Every message up to and including the first of this type (matching fields)."""
        events: list[Event] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await self.recv(max(0.01, deadline - loop.time()))
            events.append(event)
            if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                return events

    async def silent(self, seconds: float = 0.3) -> bool:
        """True if nothing arrives for a while."""
        try:
            event = await self.recv(seconds)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected message {event}")

    async def close(self) -> None:
        """Close the connection (idempotent)."""
        await self.connection.close()


def transcript(events: list[Event], chat_id: str | None = None) -> list[Event]:
    """The seq'd events of a chat, in order."""
    return [
        event
        for event in events
        if "seq" in event and (chat_id is None or event.get("chatId") == chat_id)
    ]


def answer_text(events: list[Event], message_id: str | None = None) -> str:
    """The answer text the `token` events spell out."""
    return "".join(
        event["text"]
        for event in events
        if event["type"] == "token" and (message_id is None or event["messageId"] == message_id)
    )


async def eventually(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """Wait until `condition()` holds; whether it ever did (a bounded wait on an observable
    state, not a timing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
