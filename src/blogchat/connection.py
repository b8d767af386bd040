"""One open WebSocket: its state, a bounded send queue and the writer task that drains it."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections import deque
from collections.abc import Sequence

from starlette.websockets import WebSocket, WebSocketDisconnect

from blogchat import protocol as wire
from blogchat.eventlog import MAX_LOG_EVENTS
from blogchat.visitors import Visitor

log = logging.getLogger(__name__)

# Close codes (4000-4999 are ours to define).
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN_ORIGIN = 4403
CLOSE_SLOW_CONSUMER = 4008
# The visitor or its address has too many connections open (where a handshake cannot be
# refused with HTTP 429).
CLOSE_TOO_MANY = 4429
# The server cannot take the connection now (with several instances: Redis, where open
# connections are counted, is out of reach); try again shortly. Where a handshake cannot be
# refused with HTTP 503.
CLOSE_UNAVAILABLE = 4503
CLOSE_GOING_AWAY = 1001


class ConnectionState(enum.Enum):
    """Where a connection is in its life."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Connection:
    """One open WebSocket: a bounded send queue drained by its own writer task.

    Delivering never waits on the network, so one slow reader cannot hold up a chat's
    other subscribers; a reader that falls too far behind (in frames or in bytes) is
    disconnected instead. Frames replayed on resume are already held by the chat's log, so
    they do not count towards those limits: a resume after a long absence must not look
    like falling behind.
    """

    def __init__(
        self,
        websocket: WebSocket,
        visitor: Visitor,
        *,
        queue_limit: int,
        queue_bytes: int = 4 * 1024 * 1024,
        address: str = "",
    ) -> None:
        self.id = uuid.uuid4().hex
        self.websocket = websocket
        self.visitor = visitor
        self.address = address
        self.state = ConnectionState.OPEN
        self.subscriptions: set[str] = set()
        # (frame, replayed): replayed frames are the log's own strings and cost nothing more.
        self._queue: deque[tuple[str, bool]] = deque()
        self._queue_limit = queue_limit
        self._queue_bytes = queue_bytes
        self._replaying = 0
        # Characters of the live frames queued (JSON is mostly ASCII: about bytes), and of
        # all those ever queued.
        self._live_size = 0
        self.delivered_size = 0
        # Frames ever queued and ever sent, to tell whether a given frame went out.
        self._queued = 0
        self._sent = 0
        # The subscribe answer of each chat still on its way out: its number in `_queued`.
        self._answers: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._close_code: int | None = None

    def deliver(self, frame: str) -> None:
        """Queue a frame (a chat event, or an answer to this connection)."""
        if self.state is not ConnectionState.OPEN:
            return
        if self.backlog >= self._queue_limit or self._live_size + len(frame) > self._queue_bytes:
            log.warning(
                "connection %s fell %d frames (%d characters) behind; closing",
                self.id,
                self.backlog,
                self._live_size,
            )
            self.close(CLOSE_SLOW_CONSUMER)
            return
        self._queue.append((frame, False))
        self._live_size += len(frame)
        self.delivered_size += len(frame)
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
        self._queue.extend((frame, True) for frame in frames)
        self._queued += len(frames)
        self._replaying += len(frames)
        self._wake.set()

    def send(self, message: wire.WireModel) -> None:
        """Queue a protocol message for this connection only."""
        self.deliver(message.to_json())

    def answering(self, chat_id: str) -> bool:
        """Whether this connection's last subscribe answer for the chat (its history, maybe
        large) has still not gone out: a repeated subscribe then waits for it."""
        number = self._answers.get(chat_id)
        if number is not None and self._sent >= number:
            del self._answers[chat_id]
            return False
        return number is not None

    def answered(self, chat_id: str) -> None:
        """A subscribe to the chat was just answered (its frames are the last queued)."""
        self._answers[chat_id] = self._queued

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
        frame, replayed = self._queue.popleft()
        self._sent += 1
        if replayed:
            self._replaying -= 1
        else:
            self._live_size -= len(frame)
        return frame

    def _drop_queue(self) -> None:
        self._queue.clear()
        self._replaying = 0
        self._live_size = 0
        self._answers.clear()

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
