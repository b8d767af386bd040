"""A WebSocket connection's send queue, in process: bounded in frames and in bytes, with
replays (the log's own frames) not counted, and a repeated subscribe held off."""

from __future__ import annotations

from blogchat.connection import CLOSE_SLOW_CONSUMER, Connection, ConnectionState
from blogchat.visitors import Visitor


def connection(*, frames: int = 10**9, size: int = 65536) -> Connection:
    # No socket: only the queue is exercised here; its writer is tested on live servers.
    return Connection(
        None,  # type: ignore[arg-type]
        Visitor("v", anonymous=True),
        queue_limit=frames,
        queue_bytes=size,
    )


def state_of(conn: Connection) -> ConnectionState:
    return conn.state


def test_live_frames_past_the_byte_limit_close_the_connection_as_a_slow_consumer() -> None:
    conn = connection(size=65536)
    frame = "x" * 20_000
    for _ in range(3):
        conn.deliver(frame)
    assert state_of(conn) is ConnectionState.OPEN
    conn.deliver(frame)
    assert state_of(conn) is ConnectionState.CLOSING
    assert conn._close_code == CLOSE_SLOW_CONSUMER
    assert conn.backlog == 0  # the queue is dropped


def test_sent_frames_give_their_room_back_and_replays_take_none() -> None:
    conn = connection(size=65536)
    conn.replay(["r" * 60_000] * 5)
    for _ in range(3):
        conn.deliver("x" * 20_000)
    assert conn.state is ConnectionState.OPEN
    while conn.backlog:
        conn._next_frame()
    for _ in range(3):
        conn.deliver("y" * 20_000)
    assert conn.state is ConnectionState.OPEN


def test_a_subscribe_answer_still_queued_holds_off_the_next_for_that_chat_only() -> None:
    conn = connection()
    conn.deliver("earlier frame")
    conn.deliver("history of chat a")
    conn.answered("a")
    assert conn.answering("a")
    assert not conn.answering("b")
    conn._next_frame()
    assert conn.answering("a")
    conn._next_frame()
    assert not conn.answering("a")
