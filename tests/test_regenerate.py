"""Regenerate and edit-and-resend: a `chat` that replaces the chat's last turn, over the real
WebSocket and database (SQLite and PostgreSQL), on the offline engine and on Claude."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from blogchat.settings import Settings
from tests.support.anthropic_server import AnthropicTestServer, error
from tests.support.claude import claude_overrides, claude_server_for
from tests.support.client import ChatSocket, Event, Reader, answer_text, transcript
from tests.support.server import LiveServer, running

QUESTION = "How warm should a sourdough starter be kept?"


async def ask(ws: ChatSocket, text: str, chat_id: str | None = None, **fields: Any) -> list[Event]:
    """Send a `chat` and read to its `done` (or to the refusal that answers it)."""
    await ws.chat(text, chat_id, **fields)
    events: list[Event] = []
    while True:
        event = await ws.recv(timeout=60)
        events.append(event)
        if event["type"] == "done" or (event["type"] == "error" and "seq" not in event):
            return events


async def history(reader: Reader, chat_id: str) -> dict[str, Any]:
    response = await reader.http.get(f"/api/chats/{chat_id}")
    response.raise_for_status()
    detail: dict[str, Any] = response.json()
    return detail


def of_type(events: list[Event], kind: str) -> list[Event]:
    return [event for event in events if event["type"] == kind]


async def test_regenerate_replaces_the_last_answer_in_place_and_keeps_seqs_growing(
    reader: Reader,
) -> None:
    ws = await reader.connect()
    first = await ask(ws, QUESTION)
    chat_id = first[0]["chatId"]
    question = of_type(first, "user_message")[0]
    answer = first[-1]

    again = await ask(ws, "", chat_id, regenerate=answer["messageId"])

    asked = of_type(again, "user_message")[0]
    assert asked["text"] == QUESTION
    assert asked["messageId"] != question["messageId"]
    assert asked["replaces"] == [question["messageId"], answer["messageId"]]
    assert asked["seq"] == answer["seq"] + 1
    assert again[-1]["reason"] == "complete"
    seqs = [event["seq"] for event in transcript(first + again)]
    assert seqs == list(range(1, len(seqs) + 1))

    detail = await history(reader, chat_id)
    assert [(m["role"], m["id"]) for m in detail["messages"]] == [
        ("user", asked["messageId"]),
        ("assistant", again[-1]["messageId"]),
    ]
    assert detail["messages"][0]["text"] == QUESTION
    assert detail["messages"][1]["text"] == answer_text(again)
    assert detail["lastSeq"] == again[-1]["seq"]

    # A fresh subscriber gets the same history: one question, one answer.
    other = await reader.connect()
    await other.send(type="subscribe", chatId=chat_id)
    subscribed = await other.expect("subscribed")
    assert [m["id"] for m in subscribed["messages"]] == [
        asked["messageId"],
        again[-1]["messageId"],
    ]


async def test_edit_replaces_the_last_question_and_its_answer_with_the_new_text(
    reader: Reader,
) -> None:
    ws = await reader.connect()
    first = await ask(ws, "How do I keep a starter?")
    chat_id = first[0]["chatId"]
    second = await ask(ws, "Is rye flour fine?", chat_id)
    old_question = of_type(second, "user_message")[0]

    edited = await ask(ws, "Is whole wheat flour fine?", chat_id, edit=old_question["messageId"])

    asked = of_type(edited, "user_message")[0]
    assert asked["text"] == "Is whole wheat flour fine?"
    assert asked["replaces"] == [old_question["messageId"], second[-1]["messageId"]]
    texts = [(m["role"], m["text"]) for m in (await history(reader, chat_id))["messages"]]
    assert [t for role, t in texts if role == "user"] == [
        "How do I keep a starter?",
        "Is whole wheat flour fine?",
    ]
    assert len(texts) == 4


async def test_a_resumed_client_sees_the_replacement_exactly_as_a_connected_one(
    reader: Reader,
) -> None:
    watcher = await reader.connect()
    ws = await reader.connect()
    first = await ask(ws, QUESTION)
    chat_id = first[0]["chatId"]
    await watcher.send(type="subscribe", chatId=chat_id)
    await watcher.expect("subscribed")
    last_seen = first[-1]["seq"]
    await watcher.close()

    again = await ask(ws, "", chat_id, regenerate=first[-1]["messageId"])

    late = await reader.connect()
    await late.send(type="subscribe", chatId=chat_id, afterSeq=last_seen)
    await late.expect("subscribed")
    replayed = await late.until("done")
    assert transcript(replayed) == transcript(again)
    assert of_type(replayed, "user_message")[0]["replaces"] == [
        of_type(first, "user_message")[0]["messageId"],
        first[-1]["messageId"],
    ]


async def test_a_repeated_regenerate_is_answered_once_and_replaces_nothing_again(
    reader: Reader,
) -> None:
    ws = await reader.connect()
    first = await ask(ws, QUESTION)
    chat_id = first[0]["chatId"]
    client_message_id = str(uuid.uuid4())
    fields = {"regenerate": first[-1]["messageId"], "clientMessageId": client_message_id}
    again = await ask(ws, "", chat_id, **fields)

    await ws.chat("", chat_id, **fields)
    repeat = await ws.expect("user_message")
    assert repeat == of_type(again, "user_message")[0]
    assert await ws.silent(0.5)
    assert len((await history(reader, chat_id))["messages"]) == 2


@pytest.mark.parametrize(
    "case",
    ["not_last", "a_question", "both", "no_chat", "empty_edit", "someone_elses"],
)
async def test_a_regenerate_or_edit_that_does_not_fit_is_refused_and_changes_nothing(
    server: LiveServer, reader: Reader, case: str
) -> None:
    ws = await reader.connect()
    first = await ask(ws, "First question")
    chat_id = first[0]["chatId"]
    second = await ask(ws, "Second question", chat_id)
    first_user = of_type(first, "user_message")[0]["messageId"]
    second_user = of_type(second, "user_message")[0]["messageId"]
    fields: dict[str, Any] = {
        "not_last": {"regenerate": first[-1]["messageId"]},
        "a_question": {"regenerate": second_user},
        "both": {"regenerate": second[-1]["messageId"], "edit": second_user},
        "no_chat": {"regenerate": second[-1]["messageId"]},
        "empty_edit": {"edit": second_user},
        "someone_elses": {"regenerate": second[-1]["messageId"]},
    }[case]
    text = "" if case == "empty_edit" else "new text"
    if case == "someone_elses":
        async with Reader(server.url) as stranger:
            other = await stranger.connect()
            refused = (await ask(other, text, chat_id, **fields))[-1]
            assert refused["code"] == "not_found"
    else:
        target = None if case == "no_chat" else chat_id
        refused = (await ask(ws, text, target, **fields))[-1]
        assert refused["type"] == "error"
        assert refused["code"] == "bad_request", refused
    before = [m["id"] for m in (await history(reader, chat_id))["messages"]]
    assert before == [
        first_user,
        first[-1]["messageId"],
        second_user,
        second[-1]["messageId"],
    ]


async def test_a_regenerate_while_the_answer_streams_is_refused(
    make_settings: Callable[..., Settings],
) -> None:
    with running(make_settings(offline_tokens_per_second=200)) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            first = await ask(ws, "First question")
            chat_id = first[0]["chatId"]
            await ws.chat("Second question", chat_id)
            await ws.until("token")
            refused = (await ask(ws, "", chat_id, regenerate=first[-1]["messageId"]))[-1]
            assert (refused["type"], refused["code"]) == ("error", "bad_request")
            assert "Wait for the answer" in refused["message"]
            await ws.send(type="stop", chatId=chat_id)
            await ws.until("done")


async def test_a_regenerate_counts_against_the_visitors_turns_like_any_message(
    make_settings: Callable[..., Settings],
) -> None:
    with running(make_settings(visitor_turns_per_hour=2)) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            first = await ask(ws, QUESTION)
            chat_id = first[0]["chatId"]
            again = await ask(ws, "", chat_id, regenerate=first[-1]["messageId"])
            assert again[-1]["reason"] == "complete"
            refused = (await ask(ws, "", chat_id, regenerate=again[-1]["messageId"]))[-1]
            assert (refused["type"], refused["code"]) == ("error", "rate_limited")
            # Refused before anything was replaced.
            ids = [m["id"] for m in (await history(reader, chat_id))["messages"]]
            assert ids[-1] == again[-1]["messageId"]


@pytest.mark.claude
async def test_ask_again_after_a_failure_retries_in_place_without_the_failed_turn_in_context(
    api: AnthropicTestServer, make_settings: Callable[..., Settings]
) -> None:
    with claude_server_for(make_settings(**claude_overrides(api))) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            first = await ask(ws, "Remember the word marmalade")
            chat_id = first[0]["chatId"]
            # The first try and both retries fail; then the provider is back.
            api.when_user_says("Which word?", [error(529)] * 3)
            failed = await ask(ws, "Which word?", chat_id)
            assert failed[-1]["reason"] == "error"
            failed_question = of_type(failed, "user_message")[0]["messageId"]

            again = await ask(ws, "", chat_id, regenerate=failed[-1]["messageId"])

            assert again[-1]["reason"] == "complete"
            assert answer_text(again).endswith("Which word?")
            assert of_type(again, "user_message")[0]["replaces"] == [
                failed_question,
                failed[-1]["messageId"],
            ]
            messages = (await history(reader, chat_id))["messages"]
            assert [m["text"] for m in messages if m["role"] == "user"] == [
                "Remember the word marmalade",
                "Which word?",
            ]

            # Regenerating a complete answer: the model never sees the replaced one.
            replaced = answer_text(again)
            third = await ask(ws, "", chat_id, regenerate=again[-1]["messageId"])
            assert third[-1]["reason"] == "complete"
            request = api.last_request()
            said = [b["text"] for b in request.blocks("text", role="assistant")]
            assert replaced not in said
            asked = "\n".join(request.user_prompts)
            assert asked.count("Which word?") == 1, asked
            assert "marmalade" in asked
            assert replaced not in asked
