"""Generated chat titles: written after the first exchange (offline from the question's key
words, with Claude by a small Haiku request that counts in the visitor's usage), pushed to
the reader as `chat_updated`; a rename wins and a failure keeps the first message's title."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from blogchat.settings import Settings
from blogchat.titles import clean_title, keyword_title
from tests.support.anthropic_server import AnthropicTestServer
from tests.support.claude import claude_overrides, claude_server_for, wait_until
from tests.support.client import ChatSocket, Event, Reader
from tests.support.server import running

QUESTION = "How warm should a sourdough starter be kept?"


async def first_exchange(ws: ChatSocket, text: str = QUESTION) -> tuple[str, list[Event]]:
    """Start a chat and read to its first `done`; returns the chat id and the events."""
    await ws.chat(text)
    created = await ws.expect("chat_created")
    return created["chatId"], await ws.until("done", timeout=60)


async def listed_title(reader: Reader, chat_id: str) -> str:
    chats = (await reader.http.get("/api/chats")).json()
    title: str = next(chat["title"] for chat in chats if chat["id"] == chat_id)
    return title


def test_an_offline_title_is_the_questions_key_words() -> None:
    assert keyword_title(QUESTION) == "Warm sourdough starter"
    assert keyword_title("what is the best way to dial in espresso at home") == (
        "Best way dial espresso home"
    )
    assert keyword_title("is it?") is None
    assert clean_title('"Sourdough starter warmth."') == "Sourdough starter warmth"
    long = clean_title("Title: A " + "very " * 30 + "long one")
    assert long is not None
    assert long.endswith("…")


@pytest.fixture
def titled(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings with titles on (the test suite's servers run without them)."""

    def make(**overrides: Any) -> Settings:
        return make_settings(chat_titles=True, **overrides)

    return make


async def test_the_first_exchange_gets_a_title_pushed_to_the_reader_and_listed(
    titled: Callable[..., Settings],
) -> None:
    with running(titled()) as server:
        async with Reader(server.url) as reader:
            await _first_exchange_is_titled(reader)


async def _first_exchange_is_titled(reader: Reader) -> None:
    ws = await reader.connect()
    chat_id, _ = await first_exchange(ws)
    updated = await ws.expect("chat_updated")
    assert updated["chatId"] == chat_id
    assert updated["chat"]["title"] == "Warm sourdough starter"
    assert "seq" not in updated
    assert await listed_title(reader, chat_id) == "Warm sourdough starter"

    # Later exchanges keep it.
    await ws.chat("And how often should it be fed?", chat_id)
    await ws.until("done")
    assert await ws.silent(0.5)
    assert await listed_title(reader, chat_id) == "Warm sourdough starter"


async def test_a_rename_is_pushed_and_wins_over_the_generated_title(
    titled: Callable[..., Settings],
) -> None:
    with running(titled(offline_tokens_per_second=100)) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat(QUESTION)
            chat_id = (await ws.expect("chat_created"))["chatId"]
            await ws.until("token")
            renamed = await reader.http.patch(f"/api/chats/{chat_id}", json={"title": "Mine"})
            assert renamed.status_code == 200
            events = await ws.until("done", timeout=60)
            pushed = [e for e in events if e["type"] == "chat_updated"]
            assert [e["chat"]["title"] for e in pushed] == ["Mine"]
            assert wait_until(lambda: server.state.titles.writing == 0)
            assert await ws.silent(0.3)
            assert await listed_title(reader, chat_id) == "Mine"


@pytest.mark.claude
async def test_a_claude_title_is_a_haiku_request_counted_in_the_visitors_usage(
    api: AnthropicTestServer, titled: Callable[..., Settings]
) -> None:
    with claude_server_for(titled(**claude_overrides(api))) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            chat_id, events = await first_exchange(ws)
            updated = await ws.expect("chat_updated")
            # The test server answers a request with an output schema with "Test chat".
            assert updated["chat"]["title"] == "Test chat"
            (request,) = api.side_requests()
            assert request.model == server.settings.model_haiku
            assert QUESTION in request.prompt
            assert request.json["max_tokens"] <= 50

            usage = events[-1]["usage"]
            answer_tokens = usage["inputTokens"] + usage["outputTokens"]
            visitor = (await reader.me())["id"]
            spent: list[Any] = server.call(server.state.store.usage.spending("visitor", visitor, 0))
            title_tokens = sum(tokens for _, tokens in spent) - answer_tokens
            assert title_tokens > 0
            # The answer's own usage is the turn's alone.
            detail = (await reader.http.get(f"/api/chats/{chat_id}")).json()
            assert detail["messages"][1]["usage"] == usage


@pytest.mark.claude
async def test_a_failed_title_request_leaves_the_first_messages_title(
    api: AnthropicTestServer, titled: Callable[..., Settings]
) -> None:
    # A model the provider does not serve: the title request fails with a 404.
    settings = titled(**claude_overrides(api, title_model="claude-no-such-model"))
    with claude_server_for(settings) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            chat_id, _ = await first_exchange(ws)
            assert wait_until(lambda: any(r.outcome == "error 404" for r in api.requests))
            assert wait_until(lambda: server.state.titles.writing == 0)
            assert await ws.silent(0.3)
            assert await listed_title(reader, chat_id) == QUESTION
