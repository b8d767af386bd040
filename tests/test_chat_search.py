"""Chat search (`GET /api/chats?q=`): titles and message text, only the visitor's own chats,
`%` and `_` taken literally, bounded input and results; on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from blogchat.chats import MAX_SEARCH_CHARS, SEARCH_RESULTS, snippet_of
from blogchat.settings import Settings
from blogchat.store import ChatRecord, MessageRecord, Store
from tests.support.client import Reader
from tests.support.server import LiveServer


async def start_chat(reader: Reader, text: str) -> str:
    """A chat whose first message is `text`, answered to the end; returns its id."""
    ws = await reader.connect()
    await ws.chat(text)
    created = await ws.expect("chat_created")
    await ws.until("done")
    await ws.close()
    chat_id: str = created["chatId"]
    return chat_id


async def search(reader: Reader, query: str) -> list[dict[str, Any]]:
    response = await reader.http.get("/api/chats", params={"q": query})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


async def test_search_finds_titles_and_message_text_of_only_the_visitors_own_chats(
    server: LiveServer, reader: Reader
) -> None:
    starter = await start_chat(reader, "How warm should a sourdough starter be kept?")
    espresso = await start_chat(reader, "How fine should espresso be ground?")
    async with Reader(server.url) as stranger:
        theirs = await start_chat(stranger, "My own sourdough starter question")
        assert [c["id"] for c in await search(stranger, "sourdough")] == [theirs]

    # By title, ignoring case.
    assert [c["id"] for c in await search(reader, "SOURDOUGH")] == [starter]
    # By the answer's text only (the offline engine's answer cites the post it found).
    await reader.http.patch(f"/api/chats/{espresso}", json={"title": "Grinding"})
    found = await search(reader, "espresso")
    assert [c["id"] for c in found] == [espresso]
    assert "espresso" in found[0]["snippet"].lower()
    assert found[0]["title"] == "Grinding"
    # Nothing of another visitor's, whatever the words.
    assert await search(reader, "My own sourdough") == []
    # No query: the whole list, as before.
    everything = (await reader.http.get("/api/chats")).json()
    assert {c["id"] for c in everything} == {starter, espresso}
    assert all(c.get("snippet") is None for c in everything)


async def test_percent_underscore_and_backslash_are_matched_literally(reader: Reader) -> None:
    percent = await start_chat(reader, "Is zq%x a word?")
    percent_lookalike = await start_chat(reader, "Is zq55x a word?")
    underscore = await start_chat(reader, "Is zq_y a word?")
    underscore_lookalike = await start_chat(reader, "Is zqKy a word?")
    backslash = await start_chat(reader, "Is zq\\w a word?")

    # Unescaped, `%` and `_` would match the look-alikes too.
    assert [c["id"] for c in await search(reader, "zq%x")] == [percent]
    assert [c["id"] for c in await search(reader, "zq_y")] == [underscore]
    assert [c["id"] for c in await search(reader, "zq\\w")] == [backslash]
    assert [c["id"] for c in await search(reader, "zq55x")] == [percent_lookalike]
    assert [c["id"] for c in await search(reader, "zqky")] == [underscore_lookalike]


async def test_search_takes_bounded_input_and_refuses_nul(reader: Reader) -> None:
    await start_chat(reader, "A question")
    too_long = await reader.http.get("/api/chats", params={"q": "a" * (MAX_SEARCH_CHARS + 1)})
    assert too_long.status_code == 422
    assert too_long.json()["code"] == "bad_request"
    nul = await reader.http.get("/api/chats", params={"q": "a\x00b"})
    assert nul.status_code == 422
    assert await search(reader, "a" * MAX_SEARCH_CHARS) == []


async def test_a_replaced_turn_is_no_longer_found(reader: Reader) -> None:
    ws = await reader.connect()
    await ws.chat("How warm should a sourdough starter be kept?")
    created = await ws.expect("chat_created")
    chat_id = created["chatId"]
    question = await ws.expect("user_message")
    await ws.until("done")
    await ws.chat("Tell me about espresso", chat_id, edit=question["messageId"])
    await ws.until("done")
    found = await search(reader, "sourdough")
    # The title stays (the first message's), but no message of the chat says it any more.
    assert [(c["id"], c.get("snippet")) for c in found] == [(chat_id, None)]


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    opened = await Store.open(settings.database, schema=settings.database_schema)
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_search_returns_at_most_its_limit_newest_first(store: Store) -> None:
    owner = str(uuid.uuid4())
    ids = []
    for n in range(SEARCH_RESULTS + 5):
        chat = await store.chats.create_chat(
            ChatRecord(
                id=str(uuid.uuid4()),
                owner_id=owner,
                title=f"Chat {n}",
                persona="blog-assistant",
                model="haiku",
            )
        )
        await store.chats.add_message(
            MessageRecord(
                id=str(uuid.uuid4()),
                chat_id=chat.id,
                role="user",
                seq_start=1,
                seq_end=1,
                text=f"needle number {n}",
                client_message_id=str(uuid.uuid4()),
            )
        )
        ids.append(chat.id)
    found = await store.chats.search_chats(owner, "needle", SEARCH_RESULTS)
    assert [chat.id for chat, _ in found] == list(reversed(ids))[:SEARCH_RESULTS]
    assert all(text is not None and "needle" in text for _, text in found)


def test_a_snippet_shows_the_words_around_the_match() -> None:
    text = " ".join(f"word{n}" for n in range(100)) + " the needle " + "tail " * 50
    snippet = snippet_of(text, "NEEDLE", width=60)
    assert "needle" in snippet
    assert snippet.startswith("…")
    assert snippet.endswith("…")
    assert len(snippet) <= 62
    assert snippet_of("short text", "short") == "short text"
