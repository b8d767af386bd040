"""What a reader sees of a Claude turn is the same on both engines: each test runs on the
Agent SDK engine (the real SDK and its CLI) and on the Messages engine (the real anthropic
SDK and its tool runner), against the Anthropic test server, through a live server,
WebSocket and database (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blogchat.settings import Settings
from tests.support.anthropic_server import (
    AnthropicTestServer,
    RecordedRequest,
    error,
    reply,
    stall,
    text,
    thinking,
    tool_use,
    usage,
)
from tests.support.claude import claude_overrides, claude_server_for, slow_down_tool
from tests.support.client import ChatSocket, Event, Reader, answer_text
from tests.support.server import LiveServer

pytestmark = pytest.mark.claude

ENGINES = ["agent-sdk", "messages"]
TOOL_PREFIX = "mcp__blog__"
LONG_ANSWER = "Starters like warmth. " + " ".join(
    f"Sentence number {n} keeps going for a while." for n in range(200)
)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    """The engine the test's server runs its chats on."""
    return str(request.param)


@pytest.fixture
def make_engine_settings(
    make_settings: Callable[..., Settings], api: AnthropicTestServer, engine: str
) -> Callable[..., Settings]:
    """Settings for a server on this test's engine, database and test server."""

    def make(**overrides: Any) -> Settings:
        return make_settings(**claude_overrides(api, engine=engine, **overrides))

    return make


@pytest.fixture
def engine_server(make_engine_settings: Callable[..., Settings]) -> Iterator[LiveServer]:
    """A live server whose chats run on this test's engine."""
    with claude_server_for(make_engine_settings()) as server:
        yield server


@pytest.fixture
async def engine_reader(engine_server: LiveServer) -> AsyncIterator[Reader]:
    """An anonymous visitor of that server."""
    async with Reader(engine_server.url) as visitor:
        yield visitor


def of_type(events: list[Event], kind: str) -> list[Event]:
    """The events of one type."""
    return [event for event in events if event["type"] == kind]


def plain(names: list[str]) -> list[str]:
    """Tool names without the Agent SDK's MCP prefix."""
    return [name.removeprefix(TOOL_PREFIX) for name in names]


def occurrences(request: RecordedRequest, needle: str) -> int:
    """How often a text is a user text block (or ends one) in the conversation sent."""
    count = 0
    for message in request.messages:
        if message.get("role") != "user":
            continue
        content = message["content"]
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for block in blocks:
            if block.get("type") == "text" and str(block.get("text")).endswith(needle):
                count += 1
    return count


async def ask(ws: ChatSocket, question: str, chat_id: str | None = None) -> tuple[str, list[Event]]:
    """Send a question and read up to its `done`; returns the chat id and the events."""
    await ws.chat(question, chat_id)
    if chat_id is None:
        chat_id = (await ws.expect("chat_created"))["chatId"]
    return chat_id, await ws.until("done", timeout=60)


async def chat_detail(reader: Reader, chat_id: str) -> dict[str, Any]:
    """GET /api/chats/{id}."""
    response = await reader.http.get(f"/api/chats/{chat_id}")
    response.raise_for_status()
    detail: dict[str, Any] = response.json()
    return detail


async def test_a_turn_streams_thinking_tokens_and_tools_and_is_saved(
    api: AnthropicTestServer, engine_reader: Reader
) -> None:
    api.when_user_says(
        "starter",
        [
            reply(
                thinking("The reader asks about starters."),
                text("Let me look that up. "),
                tool_use("searchBlogContent", {"query": "sourdough starter temperature"}),
                usage(1000, 40),
            ),
            reply(
                thinking("The search found the post."),
                text("Keep it warm, around 24-26 °C."),
                usage(1500, 60),
            ),
        ],
    )
    ws = await engine_reader.connect()
    chat_id, events = await ask(ws, "How warm should a sourdough starter be kept?")

    kinds = [event["type"] for event in events]
    assert kinds.index("thinking") < kinds.index("token") < kinds.index("tool_use")
    assert kinds.index("tool_use") < kinds.index("tool_result") < len(kinds) - 1
    (call,) = of_type(events, "tool_use")
    assert (call["name"], call["input"]) == (
        "searchBlogContent",
        {"query": "sourdough starter temperature"},
    )
    (result,) = of_type(events, "tool_result")
    assert (result["toolUseId"], result["isError"]) == (call["toolUseId"], False)
    found = json.loads(result["output"])
    assert found["results"], "the real blog search ran"
    assert answer_text(events) == "Let me look that up. Keep it warm, around 24-26 °C."
    thought = "".join(event["text"] for event in of_type(events, "thinking"))
    assert thought == "The reader asks about starters.The search found the post."
    assert events[-1]["reason"] == "complete"
    assert events[-1]["usage"] == {"inputTokens": 2500, "outputTokens": 100}

    _, second = api.main_requests()
    (sent,) = second.tool_results
    assert sent["tool_use_id"] == call["toolUseId"]
    content = sent["content"]
    assert json.loads(content if isinstance(content, str) else content[0]["text"]) == found
    # The thinking goes back with its signature (the test server refuses it otherwise).
    (signed,) = second.blocks("thinking", role="assistant")
    assert signed["signature"]

    answer = (await chat_detail(engine_reader, chat_id))["messages"][-1]
    assert (answer["status"], answer["text"], answer["thinking"]) == (
        "complete",
        answer_text(events),
        thought,
    )
    assert [(c["name"], c["isError"]) for c in answer["toolCalls"]] == [
        ("searchBlogContent", False)
    ]


async def test_the_model_gets_the_personas_prompt_its_tools_only_and_thinking(
    api: AnthropicTestServer, engine_server: LiveServer, engine_reader: Reader
) -> None:
    explainer = engine_server.state.personas["explainer"]
    ws = await engine_reader.connect()
    await ws.chat("What is hydration?", persona="explainer", post="sourdough-starter-from-scratch")
    await ws.until("done", timeout=60)

    request = api.last_request()
    assert sorted(plain(request.tool_names)) == sorted(explainer.allowed_tools)
    assert explainer.system_prompt in request.system
    assert "sourdough-starter-from-scratch" not in request.system
    assert "<post_context>" in request.prompt
    assert request.prompt.endswith("What is hydration?")
    assert request.thinking == {"type": "enabled", "budget_tokens": 2048, "display": "summarized"}
    assert request.model == engine_server.settings.model_haiku
    assert request.max_tokens == engine_server.settings.max_output_tokens
    assert api.side_requests() == []


async def test_a_tool_the_persona_does_not_list_cannot_be_reached(
    api: AnthropicTestServer, engine_reader: Reader, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    api.when_user_says(
        "today",
        [
            reply(
                tool_use("searchBlogContent", {"query": "date"}),
                tool_use("Bash", {"command": f"touch {marker}"}),
            ),
            text("I cannot tell the date here."),
        ],
    )
    ws = await engine_reader.connect()
    # The explainer may search, but has no shell (no persona has).
    _, events = await ask(ws, "What is today's date?")

    results = {r["toolUseId"]: r for r in of_type(events, "tool_result")}
    calls = {c["name"]: c["toolUseId"] for c in of_type(events, "tool_use")}
    assert set(calls) == {"searchBlogContent", "Bash"}
    assert results[calls["Bash"]]["isError"] is True
    assert results[calls["searchBlogContent"]]["isError"] is False
    assert not marker.exists()
    assert events[-1]["reason"] == "complete"
    assert answer_text(events) == "I cannot tell the date here."
    sent = {block["tool_use_id"]: block for block in api.last_request().tool_results}
    assert sent[calls["Bash"]].get("is_error") is True


async def test_the_max_turns_limit_ends_the_turn_with_its_partial_answer_and_a_warning(
    api: AnthropicTestServer, make_engine_settings: Callable[..., Settings]
) -> None:
    api.when_user_says(
        "everything",
        [
            reply(text("Searching once. "), tool_use("searchBlogContent", {"query": "bread"})),
            reply(text("Searching twice. "), tool_use("searchBlogContent", {"query": "coffee"})),
            text("This is never asked for."),
        ],
    )
    with claude_server_for(make_engine_settings(max_turns=2)) as server:
        async with Reader(server.url) as visitor:
            ws = await visitor.connect()
            chat_id, events = await ask(ws, "Tell me everything")
            answer = (await chat_detail(visitor, chat_id))["messages"][-1]

    done = events[-1]
    assert done["reason"] == "max_turns"
    assert "limit of 2 steps" in done["warning"]
    assert answer_text(events) == "Searching once. Searching twice. "
    assert len(of_type(events, "tool_result")) == 2
    assert len(api.main_requests()) == 2
    assert (answer["status"], answer["text"]) == ("max_turns", "Searching once. Searching twice. ")


async def test_stop_mid_text_ends_after_the_sentence_and_the_chat_goes_on(
    api: AnthropicTestServer, engine_reader: Reader
) -> None:
    api.when_user_says("warmth", text(LONG_ANSWER, delay=0.02))
    ws = await engine_reader.connect()
    await ws.chat("Do starters like warmth?")
    created = await ws.expect("chat_created")
    events = await ws.until("token", timeout=60)
    events += await ws.until("token")
    await ws.send(type="stop", chatId=created["chatId"])
    events += await ws.until("done")

    streamed = answer_text(events)
    assert events[-1]["reason"] == "stopped"
    assert LONG_ANSWER.startswith(streamed)
    assert len(streamed) < len(LONG_ANSWER)
    assert streamed.rstrip().endswith(".")
    answer = (await chat_detail(engine_reader, created["chatId"]))["messages"][-1]
    assert (answer["status"], answer["text"]) == ("stopped", streamed)

    _, after = await ask(ws, "And then?", created["chatId"])
    assert answer_text(after) == "Echo: And then?"
    earlier = [block["text"] for block in api.last_request().blocks("text", role="assistant")]
    assert any(streamed.strip() in said for said in earlier)


async def test_stop_mid_tool_ends_the_turn_stopped_without_asking_the_model_again(
    api: AnthropicTestServer, engine_server: LiveServer, engine_reader: Reader
) -> None:
    slow_down_tool(engine_server, "getCurrentDateTime", 5.0)
    api.when_user_says(
        "What day",
        [
            reply(text("Let me check the date. "), tool_use("getCurrentDateTime", {})),
            text("It is a fine day."),
        ],
    )
    ws = await engine_reader.connect()
    await ws.chat("What day is it?")
    created = await ws.expect("chat_created")
    events = await ws.until("tool_use", timeout=60)
    await ws.send(type="stop", chatId=created["chatId"])
    events += await ws.until("done")

    assert events[-1]["reason"] == "stopped"
    (call,) = of_type(events, "tool_use")
    (result,) = of_type(events, "tool_result")
    assert (result["toolUseId"], result["isError"]) == (call["toolUseId"], True)
    assert answer_text(events) == "Let me check the date. "
    assert [r.prompt for r in api.main_requests()] == ["What day is it?"]


async def test_a_rate_limited_request_is_retried_after_its_retry_after_with_one_question(
    api: AnthropicTestServer, engine_reader: Reader
) -> None:
    limited = {"retry-after": "1", "anthropic-ratelimit-requests-remaining": "0"}
    api.when_user_says("busy", [error(429, headers=limited), text("Here it is.")])
    ws = await engine_reader.connect()
    _, events = await ask(ws, "Are you busy?")

    (status,) = of_type(events, "status")
    assert (status["state"], status["attempt"], status["maxAttempts"]) == ("retrying", 2, 3)
    assert status["retryInMs"] >= 1000
    assert answer_text(events) == "Here it is."
    first, second = api.main_requests()
    assert first.outcome == "error 429"
    assert second.received_at - first.received_at >= 1.0
    assert occurrences(second, "Are you busy?") == 1


async def test_a_failure_after_a_tool_is_retried_from_the_conversation_as_it_stood(
    api: AnthropicTestServer, engine_reader: Reader, engine: str
) -> None:
    api.when_user_says(
        "look",
        [
            tool_use("searchBlogContent", {"query": "rye"}),
            error(529),
            text("Rye it is."),
        ],
    )
    ws = await engine_reader.connect()
    _, events = await ask(ws, "Please look it up")

    if engine == "agent-sdk":
        # The CLI would send its request again with the tool's result, but the reader saw
        # the tool call already: the turn ends with a retryable error instead.
        (failure,) = of_type(events, "error")
        assert failure["retryable"] is True
        assert events[-1]["reason"] == "error"
        return
    # The Messages engine asks again from the conversation as it stood: the question and
    # the tool's result once each, and the reader gets the answer.
    assert events[-1]["reason"] == "complete"
    assert answer_text(events) == "Rye it is."
    assert len(of_type(events, "tool_result")) == 1
    requests = api.main_requests()
    assert [r.outcome for r in requests] == ["completed", "error 529", "completed"]
    assert all(occurrences(r, "Please look it up") == 1 for r in requests)
    assert len(requests[-1].tool_results) == 1


@pytest.mark.parametrize(
    ("status", "code", "retryable", "words"),
    [
        (401, "model_error", False, "API key was refused"),
        (404, "model_error", False, "not available"),
        (529, "model_error", True, "overloaded"),
    ],
)
async def test_provider_errors_end_the_turn_with_the_same_error_on_both_engines(
    api: AnthropicTestServer,
    make_engine_settings: Callable[..., Settings],
    status: int,
    code: str,
    retryable: bool,
    words: str,
) -> None:
    api.when_user_says("fail", error(status), repeat_last=True)
    with claude_server_for(make_engine_settings(provider_retries=1)) as server:
        async with Reader(server.url) as visitor:
            ws = await visitor.connect()
            _, events = await ask(ws, "Will this fail?")

    (failure,) = of_type(events, "error")
    assert (failure["code"], failure["retryable"]) == (code, retryable)
    assert words in failure["message"]
    assert events[-1]["reason"] == "error"
    # A failure that trying again may mend is tried again once (provider_retries=1), with a
    # status for the reader; any other is not.
    assert len(of_type(events, "status")) == (1 if retryable else 0)


@pytest.mark.parametrize(
    ("stop_reason", "said", "warning"),
    [
        ("refusal", "I can't help with that.", "declined"),
        ("max_tokens", "This answer runs until it is cut off in the mid", "length limit"),
    ],
)
async def test_a_refusal_or_the_output_limit_ends_the_turn_with_what_the_model_said(
    api: AnthropicTestServer, engine_reader: Reader, stop_reason: str, said: str, warning: str
) -> None:
    api.when_user_says("edge", reply(thinking("Hm."), text(said), stop_reason=stop_reason))
    ws = await engine_reader.connect()
    chat_id, events = await ask(ws, "An edge case?")
    _, after = await ask(ws, "Something else.", chat_id)

    done = events[-1]
    assert answer_text(events) == said
    assert (done["reason"], done["stopReason"]) == ("complete", stop_reason)
    assert warning in done["warning"]
    assert answer_text(after) == "Echo: Something else."
    detail = await chat_detail(engine_reader, chat_id)
    assert [m["text"] for m in detail["messages"] if m["role"] == "assistant"] == [
        said,
        "Echo: Something else.",
    ]
    assert occurrences(api.last_request(), "An edge case?") == 1


async def test_usage_counts_cache_tokens_and_done_names_the_model_that_answered(
    api: AnthropicTestServer, engine_reader: Reader
) -> None:
    answered_by = "claude-haiku-4-5-20251001"
    api.when_user_says(
        "cached",
        [
            reply(
                tool_use("getCurrentDateTime", {}),
                usage(100, 10, cache_read=2000, cache_creation=300),
            ),
            reply(
                text("It is noon."),
                usage(50, 20, cache_read=2300, cache_creation=0),
                model=answered_by,
            ),
        ],
    )
    ws = await engine_reader.connect()
    chat_id, events = await ask(ws, "What time is it? cached")

    expected = {
        "inputTokens": 100 + 2000 + 300 + 50 + 2300,
        "outputTokens": 30,
        "cacheReadTokens": 4300,
        "cacheCreationTokens": 300,
    }
    assert events[-1]["usage"] == expected
    assert events[-1]["model"] == answered_by
    answer = (await chat_detail(engine_reader, chat_id))["messages"][-1]
    assert answer["usage"] == expected
    assert answer["model"] == answered_by


@pytest.mark.parametrize(("first", "then"), [("messages", "agent-sdk"), ("agent-sdk", "messages")])
async def test_a_chat_moves_between_engines_with_its_context(
    api: AnthropicTestServer,
    make_settings: Callable[..., Settings],
    first: str,
    then: str,
) -> None:
    api.when_user_says(
        "starter", [tool_use("searchBlogContent", {"query": "starter"}), text("Feed it daily.")]
    )
    with claude_server_for(make_settings(**claude_overrides(api, engine=first))) as server:
        async with Reader(server.url) as visitor:
            cookie = visitor.cookie
            ws = await visitor.connect()
            chat_id, _ = await ask(ws, "How do I keep a starter alive?")
    with claude_server_for(make_settings(**claude_overrides(api, engine=then))) as server:
        async with Reader(server.url, cookie=cookie) as visitor:
            ws = await visitor.connect()
            _, events = await ask(ws, "And how often?", chat_id)

    assert events[-1]["reason"] == "complete"
    sent = api.last_request().raw_body.decode()
    assert "How do I keep a starter alive?" in sent
    assert "Feed it daily." in sent


# --- the Messages engine's own ------------------------------------------------------------


@pytest.mark.parametrize("engine", ["messages"])
async def test_the_next_turn_sends_the_conversation_as_the_provider_saw_it_with_caching(
    api: AnthropicTestServer, engine_server: LiveServer, engine_reader: Reader
) -> None:
    api.when_user_says(
        "rye",
        [
            reply(thinking("Search first."), tool_use("searchBlogContent", {"query": "rye"})),
            reply(thinking("Found it."), text("Rye ferments fast.")),
        ],
    )
    ws = await engine_reader.connect()
    chat_id, first = await ask(ws, "Tell me about rye")
    _, _ = await ask(ws, "Why?", chat_id)

    turn_one = api.main_requests()[1]
    later = api.last_request()
    # Everything the first turn's second request sent, then its answer, went out again
    # as it was: thinking blocks with their signatures, the tool call and its result.
    sent_before = list(turn_one.messages)
    assert [m["role"] for m in later.messages] == ["user", "assistant", "user", "assistant", "user"]
    strip = _without_cache_control
    assert strip(later.messages[:3]) == strip(sent_before)
    thoughts = later.blocks("thinking", role="assistant")
    assert [t["thinking"] for t in thoughts] == ["Search first.", "Found it."]
    assert all(t["signature"] for t in thoughts)
    (result,) = later.blocks("tool_result", role="user")
    (call,) = of_type(first, "tool_use")
    assert result["tool_use_id"] == call["toolUseId"]
    # The prompt cache: the system prompt, the tools and the conversation so far.
    body = later.json
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert later.messages[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    marked = json.dumps(later.messages).count("cache_control")
    assert marked == 1, "one breakpoint in the conversation, at its end"
    # The answer's messages are kept with it in the database.
    records = await asyncio.to_thread(
        engine_server.call, engine_server.state.store.chats.get_messages(chat_id)
    )
    kept = next(r.content for r in records if r.role == "assistant")
    assert kept is not None
    assert [m["role"] for m in kept] == ["assistant", "user", "assistant"]


@pytest.mark.parametrize("engine", ["messages"])
async def test_a_stall_before_the_first_token_is_retried_and_one_after_it_ends_the_turn(
    api: AnthropicTestServer, make_engine_settings: Callable[..., Settings]
) -> None:
    api.when_user_says(
        "slow",
        [
            reply(stall(5), text("Never shown.")),
            text("Here after a stall."),
        ],
    )
    api.when_user_says("halting", reply(text("Half an answer. "), stall(5), text("never")))
    with claude_server_for(make_engine_settings(stall_seconds=0.5)) as server:
        async with Reader(server.url) as visitor:
            ws = await visitor.connect()
            chat_id, events = await ask(ws, "Are you slow?")
            _, halted = await ask(ws, "Are you halting?", chat_id)
            answers = (await chat_detail(visitor, chat_id))["messages"]

    assert answer_text(events) == "Here after a stall."
    assert len(of_type(events, "status")) == 1
    (failure,) = of_type(halted, "error")
    assert failure["retryable"] is True
    assert answer_text(halted) == "Half an answer. "
    assert (answers[-1]["status"], answers[-1]["text"]) == ("error", "Half an answer. ")


def _without_cache_control(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [
                {k: v for k, v in block.items() if k != "cache_control"} for block in content
            ]
        out.append({**message, "content": content})
    return out
