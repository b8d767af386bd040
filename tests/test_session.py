"""Chat sessions over the real WebSocket: turns, queue, idempotency, stop, fan-out, resume."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from blogchat.settings import Settings
from tests.support.client import Event, Reader, answer_text, transcript
from tests.support.server import LiveServer

SOURDOUGH = "How warm should a sourdough starter be kept?"


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    """A stream slow enough to act mid-answer (about a second for a typical answer)."""
    return make_settings(offline_tokens_per_second=400)


def seqs(events: list[Event]) -> list[int]:
    return [event["seq"] for event in transcript(events)]


async def new_chat(
    reader: Reader, text: str = SOURDOUGH, **fields: Any
) -> tuple[Any, str, list[Event]]:
    """Open a socket, start a chat, and return (socket, chat id, events up to user_message)."""
    ws = await reader.connect()
    await ws.chat(text, **fields)
    created = await ws.expect("chat_created")
    first = await ws.expect("user_message")
    return ws, created["chatId"], [created, first]


async def test_a_whole_turn_streams_in_order_and_the_rest_api_holds_the_same_transcript(
    reader: Reader,
) -> None:
    ws, chat_id, start = await new_chat(reader)
    events = start + await ws.until("done")
    kinds = [event["type"] for event in transcript(events)]
    assert kinds[:4] == ["user_message", "thinking", "tool_use", "tool_result"]
    assert set(kinds[4:-1]) == {"token"}
    assert kinds[-1] == "done"
    assert seqs(events) == list(range(1, len(kinds) + 1))

    tool_use = next(e for e in events if e["type"] == "tool_use")
    tool_result = next(e for e in events if e["type"] == "tool_result")
    assert tool_use["name"] == "searchBlogContent"
    results = json.loads(tool_result["output"])["results"]
    assert results[0]["url"].startswith("/posts/sourdough-starter-from-scratch")
    # Snippets are whole blocks of the post, never cut mid-sentence.
    assert all(r["snippet"].rstrip()[-1] in ".!?:)*|`" for r in results), results

    done = events[-1]
    assert done["reason"] == "complete"
    assert "usage" in done
    assert done["model"] == "offline"
    streamed = answer_text(events)
    assert "24-26 °C" in streamed
    assert "Offline mode" in streamed

    detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
    assert detail["lastSeq"] == done["seq"]
    user, answer = detail["messages"]
    assert user["id"] == start[1]["messageId"]
    assert user["text"] == SOURDOUGH
    assert answer["id"] == done["messageId"]
    assert answer["text"] == streamed
    assert answer["status"] == "complete"
    assert answer["thinking"] == next(e for e in events if e["type"] == "thinking")["text"]
    assert answer["toolCalls"] == [
        {
            "toolUseId": tool_use["toolUseId"],
            "name": "searchBlogContent",
            "input": tool_use["input"],
            "output": tool_result["output"],
            "isError": False,
        }
    ]
    assert '<a href="/posts/sourdough-starter-from-scratch"' in answer["html"]


async def test_queued_messages_run_in_order_one_turn_at_a_time(reader: Reader) -> None:
    ws, chat_id, start = await new_chat(reader, "sourdough starter")
    await ws.chat("espresso grind size", chat_id)
    await ws.chat("hot sauce brine", chat_id)
    events = start + await ws.until("done")
    events += await ws.until("done")
    events += await ws.until("done")
    ordered = transcript(events)
    assert seqs(events) == list(range(1, len(ordered) + 1))

    users = [e for e in ordered if e["type"] == "user_message"]
    dones = [e for e in ordered if e["type"] == "done"]
    assert [u["text"] for u in users] == [
        "sourdough starter",
        "espresso grind size",
        "hot sauce brine",
    ]
    # The queued messages were accepted while the first answer was still streaming.
    assert users[2]["seq"] < dones[0]["seq"]
    # No two answers overlap: each answer's events all come before the next answer's first.
    answer_ids = [d["messageId"] for d in dones]
    spans = []
    for answer_id in answer_ids:
        own = [e["seq"] for e in ordered if e.get("messageId") == answer_id]
        spans.append((min(own), max(own)))
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    assert "Sourdough" in answer_text(events, answer_ids[0]) or "sourdough" in answer_text(
        events, answer_ids[0]
    )
    assert "espresso" in answer_text(events, answer_ids[1]).lower()
    assert "brine" in answer_text(events, answer_ids[2]).lower()

    detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
    roles = [(m["role"], m["text"][:25]) for m in detail["messages"]]
    assert [r for r, _ in roles] == ["user", "assistant"] * 3
    assert [m["id"] for m in detail["messages"] if m["role"] == "assistant"] == answer_ids


async def test_a_repeated_client_message_id_creates_no_second_chat_and_no_second_turn(
    reader: Reader,
) -> None:
    ws = await reader.connect()
    await ws.chat(SOURDOUGH, clientMessageId="cmid-new-chat-1")
    created = await ws.expect("chat_created")
    user = await ws.expect("user_message")
    events = await ws.until("done")

    # A client that lost the acknowledgement resends, on a new connection, without chatId.
    again = await reader.connect()
    await again.chat(SOURDOUGH, clientMessageId="cmid-new-chat-1")
    assert (await again.expect("chat_created"))["chatId"] == created["chatId"]
    replay = await again.until("done")
    assert replay[0]["type"] == "user_message"
    assert replay[0]["messageId"] == user["messageId"]
    assert [e["seq"] for e in replay] == [user["seq"], *seqs(events)]

    # And once more with the chatId, on the first connection: the same answers again.
    await ws.chat(SOURDOUGH, created["chatId"], clientMessageId="cmid-new-chat-1")
    assert (await ws.expect("chat_created"))["chatId"] == created["chatId"]
    repeat = await ws.expect("user_message")
    assert repeat["messageId"] == user["messageId"]
    assert repeat["seq"] == user["seq"]
    assert await ws.silent(0.5)

    chats = (await reader.http.get("/api/chats")).json()
    assert [c["id"] for c in chats] == [created["chatId"]]
    detail = (await reader.http.get(f"/api/chats/{created['chatId']}")).json()
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]


async def test_a_repeated_client_message_id_in_an_existing_chat_starts_no_second_turn(
    reader: Reader,
) -> None:
    ws, chat_id, _ = await new_chat(reader)
    await ws.until("done")
    await ws.chat("espresso", chat_id, clientMessageId="cmid-2")
    first = await ws.expect("user_message")
    await ws.chat("espresso", chat_id, clientMessageId="cmid-2")
    events = await ws.until("done")
    repeats = [e for e in events if e["type"] == "user_message"]
    assert [e["messageId"] for e in repeats] == [first["messageId"]]
    assert await ws.silent(0.5)
    detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"] * 2


async def test_two_subscribers_receive_identical_streams(reader: Reader) -> None:
    ws, chat_id, start = await new_chat(reader)
    tab = await reader.connect()
    await tab.send(type="subscribe", chatId=chat_id, afterSeq=0)
    subscribed = await tab.expect("subscribed")
    assert subscribed["busy"] is True
    first = start + await ws.until("done")
    second = await tab.until("done")
    assert transcript(second) == transcript(first)


async def test_subscribe_without_after_seq_sends_history_with_the_running_answer_then_live(
    reader: Reader,
) -> None:
    ws, chat_id, _ = await new_chat(reader)
    await ws.until("token")
    tab = await reader.connect()
    await tab.send(type="subscribe", chatId=chat_id, requestId="r1")
    subscribed = await tab.expect("subscribed")
    assert subscribed["requestId"] == "r1"
    assert subscribed["busy"] is True
    _user, partial = subscribed["messages"]
    assert partial["status"] == "incomplete"
    assert partial["role"] == "assistant"
    live = await tab.until("done")
    assert live[0]["seq"] == subscribed["lastSeq"] + 1
    final = (await reader.http.get(f"/api/chats/{chat_id}")).json()["messages"][1]["text"]
    assert partial["text"] + answer_text(live) == final
    await ws.until("done")


async def test_stop_ends_the_turn_as_stopped_at_a_sentence_and_keeps_the_partial_answer(
    reader: Reader,
) -> None:
    ws, chat_id, start = await new_chat(reader)
    events = start + await ws.until("token")
    for _ in range(20):
        events.append(await ws.recv())
    await ws.send(type="stop", chatId=chat_id)
    events += await ws.until("done", timeout=10)
    done = events[-1]
    assert done["reason"] == "stopped"
    streamed = answer_text(events)
    assert streamed
    assert re.search(r"[.!?:…][\"'”’)\]*_]*\s*$|\n\s*$", streamed), streamed[-80:]
    detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
    answer = detail["messages"][1]
    assert answer["status"] == "stopped"
    assert answer["text"] == streamed
    # The chat is usable afterwards.
    await ws.chat("espresso", chat_id)
    after = await ws.until("done")
    assert after[-1]["reason"] == "complete"


async def test_stop_when_no_turn_runs_does_nothing(reader: Reader) -> None:
    ws, chat_id, _ = await new_chat(reader)
    await ws.until("done")
    await ws.send(type="stop", chatId=chat_id)
    assert await ws.silent(0.5)


async def test_another_visitors_chat_is_not_found_whatever_the_message(
    reader: Reader, other_reader: Reader
) -> None:
    ws, chat_id, _ = await new_chat(reader)
    await ws.until("done")
    intruder = await other_reader.connect()
    for message in (
        {"type": "subscribe", "chatId": chat_id},
        {"type": "subscribe", "chatId": chat_id, "afterSeq": 0},
        {"type": "chat", "chatId": chat_id, "clientMessageId": "x1", "text": "hi"},
        {"type": "stop", "chatId": chat_id},
        {"type": "unsubscribe", "chatId": chat_id},
    ):
        await intruder.send(**message, requestId="probe")
        error = await intruder.expect("error")
        assert error["code"] == "not_found", error
        assert error["requestId"] == "probe"
        # Nothing about the chat leaks: no title, no text, no seq.
        assert set(error) <= {"type", "code", "message", "chatId", "retryable", "requestId"}
    unknown = "00000000-0000-4000-8000-000000000000"
    await intruder.send(type="subscribe", chatId=unknown)
    assert (await intruder.expect("error"))["code"] == "not_found"
    assert (await other_reader.http.get(f"/api/chats/{chat_id}")).status_code == 404
    assert (await other_reader.http.delete(f"/api/chats/{chat_id}")).status_code == 404
    # The owner's chat is untouched.
    detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
    assert len(detail["messages"]) == 2


async def test_persona_is_chosen_at_creation_and_locked_afterwards(reader: Reader) -> None:
    ws, chat_id, start = await new_chat(reader, persona="reading-guide")
    assert start[0]["persona"] == "reading-guide"
    await ws.until("done")
    await ws.chat("more", chat_id, persona="reading-guide")
    await ws.expect("user_message")
    await ws.until("done")
    await ws.chat("switch", chat_id, persona="explainer", requestId="p")
    error = await ws.expect("error")
    assert error["code"] == "persona_locked"
    assert error["requestId"] == "p"
    await ws.chat("hello", persona="no-such-persona")
    assert (await ws.expect("error"))["code"] == "persona_unknown"


async def test_anonymous_visitors_get_haiku_only(reader: Reader) -> None:
    ws = await reader.connect()
    for model in ("sonnet", "opus"):
        await ws.chat("hello", model=model)
        error = await ws.expect("error")
        assert error["code"] == "model_not_allowed"
    assert (await reader.http.get("/api/chats")).json() == []
    await ws.chat("hello", model="haiku")
    created = await ws.expect("chat_created")
    assert created["model"] == "haiku"


async def test_a_registered_reader_may_choose_any_model_and_the_chat_keeps_it(
    reader: Reader,
) -> None:
    await reader.register()
    ws, chat_id, start = await new_chat(reader, model="opus")
    assert start[0]["model"] == "opus"
    await ws.until("done")
    other_tab = await reader.connect()
    await other_tab.send(type="subscribe", chatId=chat_id)
    assert (await other_tab.expect("subscribed"))["chat"]["model"] == "opus"
    await ws.chat("again", chat_id, model="sonnet")
    events = await ws.until("done")
    # Every reader's summary of the chat follows the change, right after the question.
    assert [e["type"] for e in events[:2]] == ["user_message", "chat_updated"]
    assert events[1]["chat"]["model"] == "sonnet"
    assert await other_tab.until("done") == events
    assert [e["type"] for e in events].count("chat_updated") == 1
    # The same model again changes nothing.
    await ws.chat("once more", chat_id, model="sonnet")
    assert "chat_updated" not in [e["type"] for e in await ws.until("done")]
    detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
    assert detail["chat"]["model"] == "sonnet"


async def test_empty_oversize_and_unknown_post_messages_are_refused(
    reader: Reader, settings: Settings
) -> None:
    ws = await reader.connect()
    await ws.chat("   ")
    assert (await ws.expect("error"))["code"] == "bad_request"
    await ws.chat("x" * (settings.max_message_chars + 1))
    assert (await ws.expect("error"))["code"] == "too_large"
    await ws.chat("about this", post="no-such-post")
    assert (await ws.expect("error"))["code"] == "bad_request"
    assert (await reader.http.get("/api/chats")).json() == []


async def test_asking_about_a_post_gives_the_engine_that_post(reader: Reader) -> None:
    ws, chat_id, start = await new_chat(reader, "What is this about?", post="sqlite-in-production")
    events = start + await ws.until("done")
    calls = [e for e in events if e["type"] == "tool_use"]
    assert {"name": "getPost", "input": {"slug": "sqlite-in-production"}} in [
        {"name": c["name"], "input": c["input"]} for c in calls
    ]
    detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
    assert detail["chat"]["post"] == "sqlite-in-production"


async def test_deleting_a_chat_mid_turn_stops_it_and_tells_subscribers(
    reader: Reader, server: LiveServer
) -> None:
    ws, chat_id, _ = await new_chat(reader)
    await ws.until("token")
    response = await reader.http.delete(f"/api/chats/{chat_id}")
    assert response.status_code == 204
    events = await ws.until("error")
    assert events[-1]["code"] == "not_found"
    assert events[-1]["chatId"] == chat_id
    assert (await reader.http.get(f"/api/chats/{chat_id}")).status_code == 404
    assert server.state.sessions.get(chat_id) is None


async def test_a_connection_going_away_does_not_stop_the_running_turn(reader: Reader) -> None:
    ws, chat_id, start = await new_chat(reader)
    await ws.until("token")
    await ws.close()
    await asyncio.sleep(0.2)
    later = await reader.connect()
    for _ in range(100):
        detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
        if not detail["busy"]:
            break
        await asyncio.sleep(0.1)
    assert detail["messages"][1]["status"] == "complete"
    await later.send(type="subscribe", chatId=chat_id, afterSeq=start[1]["seq"])
    subscribed = await later.expect("subscribed")
    assert subscribed["busy"] is False
    replay = await later.until("done")
    assert answer_text(replay) == detail["messages"][1]["text"]


async def test_idle_sessions_are_reclaimed_and_reopen_with_their_history(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(session_idle_seconds=0.2)
    with LiveServer(settings) as server:
        async with Reader(server.url) as reader:
            ws, chat_id, _ = await new_chat(reader)
            await ws.until("done")
            await ws.send(type="unsubscribe", chatId=chat_id)
            assert await ws.silent(0.3)
            for _ in range(50):
                if server.state.sessions.get(chat_id) is None:
                    break
                server.call(server.state.sessions.sweep())
                await asyncio.sleep(0.05)
            assert server.state.sessions.get(chat_id) is None
            await ws.send(type="subscribe", chatId=chat_id)
            subscribed = await ws.expect("subscribed")
            assert [m["role"] for m in subscribed["messages"]] == ["user", "assistant"]
            await ws.chat("espresso", chat_id)
            events = await ws.until("done")
            assert events[0]["seq"] == subscribed["lastSeq"] + 1
