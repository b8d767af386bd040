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
CLOSE_GOING_AWAY = 1001


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
