"""A server killed mid-turn comes back with the turn marked incomplete, and nothing reused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blogchat.engines.claude.engine import INTERRUPTED
from tests.support.anthropic_server import AnthropicTestServer, text
from tests.support.claude import agent_processes, claude_process_env, gone, wait_until
from tests.support.client import Event, Reader, answer_text
from tests.support.server import REPO, Database, ServerProcess


def process_env(database: Database, data_dir: Path) -> dict[str, str]:
    return {
        **database.env(),
        "BLOGCHAT_DATA_DIR": str(data_dir),
        "BLOGCHAT_CONTENT_DIR": str(REPO / "content"),
        "BLOGCHAT_PERSONAS_FILE": str(REPO / "config" / "personas.yaml"),
        "BLOGCHAT_SECRET_KEY": "crash-test-secret-key-0123456789abcdef",
        # About ten seconds for an answer: the kill lands mid-stream.
        "BLOGCHAT_OFFLINE_TOKENS_PER_SECOND": "40",
        "BLOGCHAT_LOG_LEVEL": "WARNING",
        "ANTHROPIC_API_KEY": "",
        "BRAINTRUST_API_KEY": "",
    }


async def test_a_turn_cut_off_by_a_crash_is_incomplete_with_its_saved_text_and_the_chat_goes_on(
    database: Database, tmp_path: Path
) -> None:
    env = process_env(database, tmp_path / "data")
    server = ServerProcess(env).start(tmp_path / "server.log")
    try:
        async with Reader(server.url) as reader:
            cookie = reader.cookie
            ws = await reader.connect()
            await ws.chat("How warm should a sourdough starter be kept?")
            chat_id = (await ws.expect("chat_created"))["chatId"]
            user = await ws.expect("user_message")
            events: list[Event] = [user]
            # Stream for a while so that at least two periodic saves have happened.
            loop = asyncio.get_running_loop()
            until = loop.time() + 2.6
            while loop.time() < until:
                events.append(await ws.recv())
            server.kill()
        streamed = answer_text(events)
        last_seen = events[-1]["seq"]
        assert events[-1]["type"] == "token", "the answer finished before the crash"
    finally:
        server.stop()

    fast = {**env, "BLOGCHAT_OFFLINE_TOKENS_PER_SECOND": "0"}
    restarted = ServerProcess(fast, port=server.port).start(tmp_path / "server.log")
    try:
        async with Reader(restarted.url, cookie=cookie) as reader:
            detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
            question, answer = detail["messages"]
            # The acknowledged user message survived, and the answer kept its saved part.
            assert question["id"] == user["messageId"]
            assert answer["status"] == "incomplete"
            assert answer["text"], "nothing of the answer was saved"
            assert streamed.startswith(answer["text"])
            assert answer["seqEnd"] <= last_seen
            assert detail["busy"] is False

            # Resuming from the last seq seen falls back to the saved history.
            ws = await reader.connect()
            await ws.send(type="subscribe", chatId=chat_id, afterSeq=last_seen)
            subscribed = await ws.expect("subscribed")
            assert [m["status"] for m in subscribed["messages"]] == ["complete", "incomplete"]
            assert subscribed["lastSeq"] >= last_seen

            # The chat works, and no seq from before the crash is ever handed out again.
            await ws.chat("And espresso?", chat_id)
            after = await ws.until("done", timeout=60)
            assert after[-1]["reason"] == "complete"
            assert min(event["seq"] for event in after if "seq" in event) > last_seen
            seqs = [event["seq"] for event in after if "seq" in event]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    finally:
        restarted.stop()


async def test_a_clean_restart_leaves_no_gap_in_seqs(database: Database, tmp_path: Path) -> None:
    env = {**process_env(database, tmp_path / "data"), "BLOGCHAT_OFFLINE_TOKENS_PER_SECOND": "0"}
    server = ServerProcess(env).start(tmp_path / "server.log")
    try:
        async with Reader(server.url) as reader:
            cookie = reader.cookie
            ws = await reader.connect()
            await ws.chat("sourdough")
            chat_id = (await ws.expect("chat_created"))["chatId"]
            done = (await ws.until("done"))[-1]
    finally:
        server.stop()
    restarted = ServerProcess(env, port=server.port).start(tmp_path / "server.log")
    try:
        async with Reader(restarted.url, cookie=cookie) as reader:
            ws = await reader.connect()
            await ws.chat("espresso", chat_id)
            first = await ws.expect("user_message")
            assert first["seq"] == done["seq"] + 1
            await ws.until("done")
    finally:
        restarted.stop()


@pytest.mark.claude
@pytest.mark.agent_sdk
async def test_a_claude_chat_cut_off_by_a_crash_goes_on_with_the_cut_exchange(
    database: Database, tmp_path: Path, api: AnthropicTestServer
) -> None:
    env = {
        **process_env(database, tmp_path / "data"),
        **claude_process_env(api, tmp_path / "agent"),
    }
    long_answer = " ".join(f"Sentence number {n} keeps going for a while." for n in range(200))
    api.when(lambda request: request.prompt == "Tell me everything.", text(long_answer, delay=0.02))
    server = ServerProcess(env).start(tmp_path / "server.log")
    try:
        async with Reader(server.url) as reader:
            cookie = reader.cookie
            ws = await reader.connect()
            await ws.chat("Remember the word damson")
            chat_id = (await ws.expect("chat_created"))["chatId"]
            assert (await ws.until("done", timeout=60))[-1]["reason"] == "complete"
            await ws.chat("Tell me everything.", chat_id)
            await ws.until("token", timeout=60)
            # Long enough for a periodic save of the answer.
            loop = asyncio.get_running_loop()
            until = loop.time() + 2.6
            while loop.time() < until:
                await ws.recv()
            agents = agent_processes(server)
            server.kill()
    finally:
        server.stop()
    assert agents
    assert wait_until(lambda: all(gone(agent) for agent in agents), timeout=30)

    restarted = ServerProcess(env, port=server.port).start(tmp_path / "server.log")
    try:
        async with Reader(restarted.url, cookie=cookie) as reader:
            detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
            cut = detail["messages"][-1]
            assert cut["status"] == "incomplete"
            assert cut["text"], "nothing of the answer was saved"
            ws = await reader.connect()
            await ws.chat("Where were you?", chat_id)
            assert (await ws.until("done", timeout=60))[-1]["reason"] == "complete"
    finally:
        restarted.stop()

    # The stored transcript has the finished turn; the cut one comes with the next question.
    assert api.last_request().user_prompts == [
        "Remember the word damson",
        f"<interrupted_exchange>\n{INTERRUPTED}\n\nReader: Tell me everything.\n\n"
        f"You: {cut['text']}\n</interrupted_exchange>\n\nWhere were you?",
    ]
