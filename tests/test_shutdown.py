"""A graceful restart (SIGTERM) mid-answer: the server saves the running answer and ends its
turn, so its reader sees it end as interrupted, and the saved text holds every word the
reader saw."""

from __future__ import annotations

import signal
from pathlib import Path

from websockets.exceptions import ConnectionClosed

from tests.support.client import Event, Reader, answer_text
from tests.support.load import process_env
from tests.support.server import Database, ServerProcess


async def test_sigterm_mid_answer_saves_what_the_reader_saw_and_ends_the_turn_interrupted(
    database: Database, tmp_path: Path
) -> None:
    # About ten seconds for an answer: the signal lands mid-stream.
    env = process_env(database, tmp_path / "data", tokens_per_second=40)
    server = ServerProcess(env).start(tmp_path / "server.log")
    try:
        async with Reader(server.url) as reader:
            cookie = reader.cookie
            ws = await reader.connect()
            await ws.chat("How warm should a sourdough starter be kept?")
            chat_id = (await ws.expect("chat_created"))["chatId"]
            events: list[Event] = [await ws.expect("user_message")]
            while sum(event["type"] == "token" for event in events) < 25:
                events.append(await ws.recv())
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            # Everything the server still sends before it closes the connection.
            try:
                while True:
                    events.append(await ws.recv(timeout=20))
            except ConnectionClosed:
                pass  # the server closed it, after the turn's end
            # (uvicorn raises the signal again once it has shut down.)
            assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
        seen = answer_text(events)
    finally:
        server.stop()

    done = events[-1]
    assert done["type"] == "done", [e["type"] for e in events[-3:]]
    assert done["reason"] == "stopped"
    assert "restart" in done["warning"]

    restarted = ServerProcess(env, port=server.port).start(tmp_path / "server.log")
    try:
        async with Reader(restarted.url, cookie=cookie) as reader:
            detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
            _, answer = detail["messages"]
            assert answer["id"] == done["messageId"]
            # Nothing the reader saw is lost: the saved answer is exactly what it was sent.
            assert answer["text"] == seen
            assert answer["status"] == "stopped"
            assert answer["warning"] == done["warning"]
            assert detail["lastSeq"] == done["seq"]
    finally:
        restarted.stop()
