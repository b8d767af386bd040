"""The Claude engine: the real SDK and its bundled CLI, against the Anthropic test server,
through a real server, WebSocket and database (SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from claude_agent_sdk.types import SessionKey

from tests.support.anthropic_server import (
    AnthropicTestServer,
    EchoResponder,
    RecordedRequest,
    cut,
    error,
    gate,
    reply,
    text,
    thinking,
    tool_use,
    usage,
)
from tests.support.claude import (
    OPUS_ID,
    claude_server_for,
    cli_processes,
    engine_of,
    reader_with_cookie,
    ready_spare,
    slow_down_tool,
    wait_until,
)
from tests.support.client import ChatSocket, Event, Reader, answer_text
from tests.support.server import Database, LiveServer

pytestmark = [pytest.mark.claude, pytest.mark.agent_sdk]

LONG_ANSWER = "Starters like warmth. " + " ".join(
    f"Sentence number {n} keeps going for a while." for n in range(200)
)

BUILT_INS = {"Bash", "Read", "Write", "Edit", "WebFetch", "WebSearch", "ToolSearch", "Agent"}


def of_type(events: list[Event], kind: str) -> list[Event]:
    """The events of one type."""
    return [event for event in events if event["type"] == kind]


async def chat_detail(reader: Reader, chat_id: str) -> dict[str, Any]:
    """GET /api/chats/{id}."""
    response = await reader.http.get(f"/api/chats/{chat_id}")
    response.raise_for_status()
    detail: dict[str, Any] = response.json()
    return detail


def conversation(request: RecordedRequest) -> list[tuple[str, str]]:
    """The user prompts and assistant texts a request carries, in order."""
    turns: list[tuple[str, str]] = []
    for message in request.messages:
        content = message.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for block in blocks:
            text_ = block.get("text") if block.get("type") == "text" else None
            if isinstance(text_, str) and not text_.startswith("<system-reminder>"):
                turns.append((message["role"], text_))
    return turns


async def test_a_full_turn_streams_thinking_tools_and_tokens_and_is_saved(
    api: AnthropicTestServer, claude_reader: Reader
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
    ws = await claude_reader.connect()
    await ws.chat("How warm should a sourdough starter be kept?")
    created = await ws.expect("chat_created")
    events = await ws.until("done", timeout=60)

    kinds = [event["type"] for event in events]
    assert kinds.index("thinking") < kinds.index("token") < kinds.index("tool_use")
    assert kinds.index("tool_use") < kinds.index("tool_result") < len(kinds) - 1
    (call,) = of_type(events, "tool_use")
    assert call["name"] == "searchBlogContent"
    assert call["input"] == {"query": "sourdough starter temperature"}
    (result,) = of_type(events, "tool_result")
    assert result["toolUseId"] == call["toolUseId"]
    assert result["isError"] is False
    found = json.loads(result["output"])
    assert found["results"], "the real blog search ran"
    assert answer_text(events) == "Let me look that up. Keep it warm, around 24-26 °C."
    thought = "".join(event["text"] for event in of_type(events, "thinking"))
    assert thought == "The reader asks about starters.The search found the post."
    done = events[-1]
    assert done["reason"] == "complete"
    assert done["usage"] == {"inputTokens": 2500, "outputTokens": 100}

    # The CLI sent our tool's output back to the model.
    first, second = api.main_requests()
    (sent,) = second.tool_results
    assert sent["tool_use_id"] == call["toolUseId"]
    assert json.loads(sent["content"][0]["text"]) == found

    detail = await chat_detail(claude_reader, created["chatId"])
    answer = detail["messages"][-1]
    assert answer["status"] == "complete"
    assert answer["text"] == answer_text(events)
    assert answer["thinking"] == thought
    assert answer["usage"] == {"inputTokens": 2500, "outputTokens": 100}
    assert [(c["name"], c["isError"]) for c in answer["toolCalls"]] == [
        ("searchBlogContent", False)
    ]
    assert json.loads(answer["toolCalls"][0]["output"]) == found
    assert first.session_id == second.session_id == created["chatId"]


async def test_the_model_gets_the_personas_prompt_only_its_tools_and_thinking(
    api: AnthropicTestServer, claude_server: LiveServer, claude_reader: Reader
) -> None:
    personas = claude_server.state.personas
    explainer = personas["explainer"]
    ws = await claude_reader.connect()
    await ws.chat("What is hydration?", persona="explainer", post="sourdough-starter-from-scratch")
    await ws.until("done", timeout=60)

    request = api.last_request()
    assert sorted(request.tool_names) == sorted(
        f"mcp__blog__{name}" for name in explainer.allowed_tools
    )
    assert not BUILT_INS & set(request.tool_names)
    assert explainer.system_prompt in request.system
    # The post the chat was opened from comes with the first prompt, not in the system
    # prompt (which stays the persona's, so that a spare process fits the chat).
    assert "sourdough-starter-from-scratch" not in request.system
    assert "<post_context>" in request.prompt
    assert "sourdough-starter-from-scratch" in request.prompt
    assert request.prompt.endswith("What is hydration?")
    assert request.thinking == {"type": "enabled", "budget_tokens": 2048, "display": "summarized"}
    assert request.model == claude_server.settings.model_haiku
    # Nothing but the agent loop talks to the provider.
    assert api.side_requests() == []
    assert api.unknown_requests() == []


async def test_a_tool_the_persona_does_not_list_cannot_be_reached(
    api: AnthropicTestServer, claude_reader: Reader, tmp_path: Any
) -> None:
    marker = tmp_path / "ran"
    api.when_user_says(
        "today",
        [
            reply(
                tool_use("mcp__blog__getCurrentDateTime", {}),
                tool_use("Bash", {"command": f"touch {marker}"}),
            ),
            text("I cannot tell the date here."),
        ],
    )
    ws = await claude_reader.connect()
    await ws.chat("What is today's date?", persona="explainer")
    events = await ws.until("done", timeout=60)

    assert {e["name"] for e in of_type(events, "tool_use")} == {"getCurrentDateTime", "Bash"}
    results = of_type(events, "tool_result")
    assert len(results) == 2
    assert all(result["isError"] for result in results)
    assert not marker.exists()
    assert events[-1]["reason"] == "complete"
    assert answer_text(events) == "I cannot tell the date here."
    # The model was told, and never got a date.
    sent = api.last_request().tool_results
    assert len(sent) == 2
    assert all(block.get("is_error") for block in sent)
    assert "weekday" not in json.dumps(sent)


async def test_a_tool_that_fails_reports_an_error_and_the_turn_goes_on(
    api: AnthropicTestServer, claude_reader: Reader
) -> None:
    api.when_user_says(
        "missing post",
        [tool_use("getPost", {"slug": "no-such-post"}), text("That post does not exist.")],
    )
    ws = await claude_reader.connect()
    await ws.chat("Tell me about the missing post")
    events = await ws.until("done", timeout=60)

    (result,) = of_type(events, "tool_result")
    assert result["isError"] is True
    assert "There is no post 'no-such-post'" in result["output"]
    assert answer_text(events) == "That post does not exist."
    assert events[-1]["reason"] == "complete"


async def test_stop_mid_text_ends_after_the_sentence_and_keeps_the_answer(
    api: AnthropicTestServer, claude_reader: Reader
) -> None:
    api.when_user_says("warmth", text(LONG_ANSWER, delay=0.02))
    ws = await claude_reader.connect()
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
    detail = await chat_detail(claude_reader, created["chatId"])
    assert detail["messages"][-1]["status"] == "stopped"
    assert detail["messages"][-1]["text"] == streamed

    # The chat goes on, and the model sees the stopped answer as part of the conversation.
    await ws.chat("And then?", created["chatId"])
    after = await ws.until("done", timeout=60)
    assert after[-1]["reason"] == "complete"
    assert answer_text(after) == "Echo: And then?"
    earlier = [block["text"] for block in api.last_request().blocks("text", role="assistant")]
    assert any(streamed.strip() in text for text in earlier)


async def test_stop_mid_tool_ends_the_turn_stopped(
    api: AnthropicTestServer, claude_server: LiveServer, claude_reader: Reader
) -> None:
    slow_down_tool(claude_server, "getCurrentDateTime", 5.0)
    api.when_user_says(
        "What day",
        [
            reply(text("Let me check the date. "), tool_use("getCurrentDateTime", {})),
            text("It is a fine day."),
        ],
    )
    ws = await claude_reader.connect()
    await ws.chat("What day is it?")
    created = await ws.expect("chat_created")
    events = await ws.until("tool_use", timeout=60)
    await ws.send(type="stop", chatId=created["chatId"])
    events += await ws.until("done")

    assert events[-1]["reason"] == "stopped"
    (call,) = of_type(events, "tool_use")
    (result,) = of_type(events, "tool_result")
    assert result["toolUseId"] == call["toolUseId"]
    assert result["isError"] is True
    assert answer_text(events) == "Let me check the date. "
    # The model was not asked to go on after the stop.
    assert [r.prompt for r in api.main_requests()] == ["What day is it?"]
    detail = await chat_detail(claude_reader, created["chatId"])
    answer = detail["messages"][-1]
    assert answer["status"] == "stopped"
    assert [(c["name"], c["isError"]) for c in answer["toolCalls"]] == [
        ("getCurrentDateTime", True)
    ]


async def test_the_max_turns_limit_ends_the_turn_with_its_partial_answer_and_a_warning(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    api.when_user_says(
        "everything",
        [
            reply(text("Searching once. "), tool_use("searchBlogContent", {"query": "bread"})),
            reply(text("Searching twice. "), tool_use("searchBlogContent", {"query": "coffee"})),
            text("This is never asked for."),
        ],
    )
    with claude_server_for(make_claude_settings(max_turns=2)) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Tell me everything")
            created = await ws.expect("chat_created")
            events = await ws.until("done", timeout=60)
            detail = await chat_detail(reader, created["chatId"])

    done = events[-1]
    assert done["reason"] == "max_turns"
    assert "limit of 2 steps" in done["warning"]
    assert answer_text(events) == "Searching once. Searching twice. "
    assert len(of_type(events, "tool_result")) == 2
    assert len(api.main_requests()) == 2
    answer = detail["messages"][-1]
    assert (answer["status"], answer["text"]) == ("max_turns", "Searching once. Searching twice. ")
    assert answer["warning"] == done["warning"]


async def test_an_overloaded_provider_is_retried_unseen_before_the_first_token(
    api: AnthropicTestServer, claude_reader: Reader
) -> None:
    api.when_user_says("busy", [error(529), error(500), text("Here after all.")])
    ws = await claude_reader.connect()
    await ws.chat("Are you busy?")
    events = await ws.until("done", timeout=60)

    assert events[-1]["reason"] == "complete"
    assert of_type(events, "error") == []
    assert answer_text(events) == "Here after all."
    assert [r.outcome for r in api.main_requests()] == ["error 529", "error 500", "completed"]


async def test_a_provider_that_keeps_failing_ends_the_turn_with_a_clear_error(
    api: AnthropicTestServer, claude_reader: Reader
) -> None:
    api.when_user_says("overloaded", error(529), repeat_last=True)
    ws = await claude_reader.connect()
    await ws.chat("Still overloaded?")
    created = await ws.expect("chat_created")
    events = await ws.until("done", timeout=60)

    (failure,) = of_type(events, "error")
    assert failure["code"] == "model_error"
    assert failure["message"] == "Claude is overloaded right now. Try again in a moment."
    assert failure["retryable"] is True
    assert events[-1]["reason"] == "error"
    assert answer_text(events) == ""
    # The first try and two retries; the CLI itself retried nothing (fixtures set it to 0).
    assert len(api.main_requests()) == 3
    assert "API Error" not in json.dumps(events)

    # The chat stays usable.
    await ws.chat("Hello again", created["chatId"])
    after = await ws.until("done", timeout=60)
    assert after[-1]["reason"] == "complete"
    assert answer_text(after) == "Echo: Hello again"


async def test_a_refused_api_key_is_not_retried_and_says_it_is_a_configuration_problem(
    api: AnthropicTestServer, claude_reader: Reader
) -> None:
    api.when_user_says("key", error(401), repeat_last=True)
    ws = await claude_reader.connect()
    await ws.chat("Is the key fine?")
    events = await ws.until("done", timeout=60)

    (failure,) = of_type(events, "error")
    assert "API key was refused" in failure["message"]
    assert failure["retryable"] is False
    assert events[-1]["reason"] == "error"
    assert len(api.main_requests()) == 1


@pytest.mark.parametrize(
    "break_step",
    [pytest.param(error(529), id="error-event"), pytest.param(cut(), id="connection-cut")],
)
async def test_a_failure_after_the_first_token_ends_the_turn_and_keeps_the_partial_answer(
    api: AnthropicTestServer, claude_reader: Reader, break_step: Any
) -> None:
    # The break waits until the reader has the start of the answer (had it come first, a
    # retry would be right).
    first_part_seen = gate()
    api.when_user_says(
        "break",
        [
            reply(text("The first part. ", delay=0.05), first_part_seen, break_step),
            text("The whole answer, again."),
        ],
    )
    ws = await claude_reader.connect()
    await ws.chat("Will this break?")
    created = await ws.expect("chat_created")
    events = await ws.until("token", timeout=60)
    first_part_seen.open()
    events += await ws.until("done", timeout=60)

    (failure,) = of_type(events, "error")
    assert failure["code"] == "model_error"
    assert "broke off" in failure["message"]
    assert events[-1]["reason"] == "error"
    # What the reader saw stays, and nothing of the CLI's second try was appended to it.
    # (How much of the first part the CLI passes on before the break varies.)
    streamed = answer_text(events)
    assert streamed.startswith("The ")
    assert "The first part. ".startswith(streamed)
    detail = await chat_detail(claude_reader, created["chatId"])
    answer = detail["messages"][-1]
    assert (answer["status"], answer["text"]) == ("error", streamed)
    assert answer["error"] == failure["message"]

    await ws.chat("Try once more", created["chatId"])
    after = await ws.until("done", timeout=60)
    assert after[-1]["reason"] == "complete"


async def test_a_stall_before_the_first_token_is_retried(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    # The first answer never comes (its gate stays shut); every later request gets one at
    # once. Should the short watchdog also fire while a busy machine is slow to send a
    # request, that attempt is retried the same way, so the outcome does not depend on load.
    never = gate()
    api.when_user_says(
        "slow", [reply(never, text("Too late.")), text("On time.")], repeat_last=True
    )
    settings = make_claude_settings(stall_seconds=1.0, provider_retries=4)
    with claude_server_for(settings) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Are you slow?")
            events = await ws.until("done", timeout=60)

    assert events[-1]["reason"] == "complete"
    assert answer_text(events) == "On time."
    assert of_type(events, "error") == []
    assert never.reached.is_set()


async def test_a_stall_after_the_first_token_ends_the_turn_with_an_error(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    # The first token is the whole first part, then the stream goes silent (the gate stays
    # shut). A watchdog firing early, while a busy machine is slow to send the request,
    # meets the same script again on the retry: the outcome does not depend on load.
    api.when_user_says(
        "hang",
        reply(text("Half an answer. ", chunk=100), gate(), text("The rest.")),
        repeat_last=True,
    )
    settings = make_claude_settings(stall_seconds=1.0, provider_retries=4)
    with claude_server_for(settings) as server:
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Will you hang?")
            events = await ws.until("done", timeout=60)

    (failure,) = of_type(events, "error")
    assert failure["message"] == "Claude stopped responding. Try again in a moment."
    assert events[-1]["reason"] == "error"
    assert answer_text(events) == "Half an answer. "


async def test_anonymous_opus_is_refused_and_a_registered_users_opus_reaches_the_provider(
    api: AnthropicTestServer, claude_reader: Reader
) -> None:
    ws = await claude_reader.connect()
    await ws.chat("Use the big model", model="opus")
    refused = await ws.expect("error")
    assert refused["code"] == "model_not_allowed"
    assert await ws.silent(0.5)
    assert api.requests == []

    await claude_reader.register()
    ws = await claude_reader.connect()
    await ws.chat("Use the big model", model="opus")
    events = await ws.until("done", timeout=60)
    assert events[-1]["model"] == OPUS_ID
    assert api.last_request().model == OPUS_ID


async def test_a_new_model_between_turns_reaches_the_provider_with_the_whole_conversation(
    api: AnthropicTestServer, claude_server: LiveServer, claude_reader: Reader
) -> None:
    await claude_reader.register()
    ws = await claude_reader.connect()
    await ws.chat("First question, on haiku")
    created = await ws.expect("chat_created")
    await ws.until("done", timeout=60)
    await ws.chat("Second question, on sonnet", created["chatId"], model="sonnet")
    events = await ws.until("done", timeout=60)

    request = api.last_request()
    assert request.model == claude_server.settings.model_sonnet
    assert events[-1]["model"] == claude_server.settings.model_sonnet
    assert request.user_prompts == ["First question, on haiku", "Second question, on sonnet"]
    assert [b["text"] for b in request.blocks("text", role="assistant")] == [
        "Echo: First question, on haiku"
    ]


async def test_the_persona_is_locked_and_keeps_its_prompt_and_tools(
    api: AnthropicTestServer, claude_server: LiveServer, claude_reader: Reader
) -> None:
    explainer = claude_server.state.personas["explainer"]
    ws = await claude_reader.connect()
    await ws.chat("Explain proofing", persona="explainer")
    created = await ws.expect("chat_created")
    await ws.until("done", timeout=60)
    await ws.chat("Now be the guide", created["chatId"], persona="reading-guide")
    refused = await ws.expect("error")
    assert refused["code"] == "persona_locked"
    await ws.chat("And what is a levain?", created["chatId"])
    await ws.until("done", timeout=60)

    request = api.last_request()
    assert request.prompt == "And what is a levain?"
    assert explainer.system_prompt in request.system
    assert sorted(request.tool_names) == sorted(f"mcp__blog__{t}" for t in explainer.allowed_tools)


async def test_a_chat_keeps_its_context_after_its_process_is_reclaimed(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    with claude_server_for(make_claude_settings(client_idle_seconds=0.5)) as server:
        engine = engine_of(server)
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Remember the word marmalade")
            created = await ws.expect("chat_created")
            chat_id = created["chatId"]
            await ws.until("done", timeout=60)
            first = engine.pool.get(chat_id)
            assert first is not None
            # Idle for longer than client_idle_seconds: the process is closed.
            assert wait_until(lambda: engine.pool.get(chat_id) is None and engine.pool.live == 0)
            await ws.chat("Which word?", chat_id)
            events = await ws.until("done", timeout=60)
            second = engine.pool.get(chat_id)

    assert events[-1]["reason"] == "complete"
    assert second is not None
    assert second is not first
    assert second.resumed
    assert conversation(api.last_request()) == [
        ("user", "Remember the word marmalade"),
        ("assistant", "Echo: Remember the word marmalade"),
        ("user", "Which word?"),
    ]
    assert api.last_request().session_id == chat_id


async def test_a_chat_keeps_its_context_after_its_session_is_released(
    api: AnthropicTestServer, claude_server: LiveServer, claude_reader: Reader
) -> None:
    engine = engine_of(claude_server)
    ws = await claude_reader.connect()
    await ws.chat("Remember the word quince")
    created = await ws.expect("chat_created")
    chat_id = created["chatId"]
    await ws.until("done", timeout=60)
    # The chat's session closes (as when it goes idle): the engine lets its process go.
    claude_server.call(claude_server.state.sessions.close(chat_id))
    assert wait_until(lambda: engine.pool.get(chat_id) is None and engine.pool.live == 0)
    assert cli_processes() == []

    await ws.send(type="subscribe", chatId=chat_id, afterSeq=0)
    await ws.chat("Which word?", chat_id)
    events = await ws.until("done", timeout=60)
    assert events[-1]["reason"] == "complete"
    assert conversation(api.last_request()) == [
        ("user", "Remember the word quince"),
        ("assistant", "Echo: Remember the word quince"),
        ("user", "Which word?"),
    ]


async def test_a_chat_keeps_its_context_after_a_server_restart(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    settings = make_claude_settings()
    with claude_server_for(settings) as server:
        async with Reader(server.url) as reader:
            cookie = reader.cookie
            ws = await reader.connect()
            await ws.chat("Remember the word damson")
            created = await ws.expect("chat_created")
            await ws.until("done", timeout=60)
    assert cli_processes() == []

    with claude_server_for(settings) as server:
        reader = await reader_with_cookie(server, cookie)
        try:
            ws = await reader.connect()
            await ws.chat("Which word?", created["chatId"])
            events = await ws.until("done", timeout=60)
        finally:
            await reader.__aexit__(None, None, None)

    assert events[-1]["reason"] == "complete"
    assert conversation(api.last_request()) == [
        ("user", "Remember the word damson"),
        ("assistant", "Echo: Remember the word damson"),
        ("user", "Which word?"),
    ]


async def test_a_live_process_is_not_used_once_its_chat_ran_on_another_instance(
    api: AnthropicTestServer, make_claude_settings: Any, tmp_path: Path
) -> None:
    # Two servers on one database and one agent directory stand in for two instances: the
    # guard is the engine's own (docs/cluster.md has the instances themselves).
    here, there = (
        LiveServer(
            make_claude_settings(agent_dir=tmp_path / "agent", agent_config_dir=tmp_path / name)
        ).start()
        for name in ("here", "there")
    )
    try:
        engine = engine_of(here)
        async with Reader(here.url) as reader:
            ws = await reader.connect()
            await ws.chat("Remember the word damson")
            chat_id = (await ws.expect("chat_created"))["chatId"]
            await ws.until("done", timeout=60)
            warm = engine.pool.get(chat_id)
            # The next turn runs on the other instance, from the stored transcript.
            elsewhere = await reader_with_cookie(there, reader.cookie)
            try:
                other = await elsewhere.connect()
                await other.chat("And the word quince", chat_id)
                assert (await other.until("done", timeout=60))[-1]["reason"] == "complete"
            finally:
                await elsewhere.__aexit__(None, None, None)
            assert engine.pool.get(chat_id) is warm
            await ws.chat("Which words?", chat_id)
            assert (await ws.until("done", timeout=60))[-1]["reason"] == "complete"
            now = engine.pool.get(chat_id)
    finally:
        here.stop()
        there.stop()
    assert wait_until(lambda: not cli_processes(), 10), cli_processes()

    assert warm is not None
    assert now is not None
    assert now is not warm
    assert now.resumed
    assert conversation(api.last_request()) == [
        ("user", "Remember the word damson"),
        ("assistant", "Echo: Remember the word damson"),
        ("user", "And the word quince"),
        ("assistant", "Echo: And the word quince"),
        ("user", "Which words?"),
    ]


async def test_more_chats_than_the_process_cap_all_get_answers_within_the_cap(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    cap, chats = 2, 5
    api.set_default(EchoResponder(delay=0.02))
    with claude_server_for(make_claude_settings(max_live_clients=cap)) as server:
        engine = engine_of(server)
        seen: list[tuple[int, int]] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                seen.append((engine.pool.live, len(cli_processes())))
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            async with Reader(server.url) as reader:

                async def converse(n: int) -> list[str]:
                    ws = await reader.connect()
                    await ws.chat(f"chat {n} first question")
                    created = await ws.expect("chat_created")
                    first = answer_text(await ws.until("done", timeout=120))
                    await ws.chat(f"chat {n} second question", created["chatId"])
                    second = answer_text(await ws.until("done", timeout=120))
                    return [first, second]

                answers = await asyncio.gather(*(converse(n) for n in range(chats)))
        finally:
            sampling.set()
            sampler.join()
        peak, started = engine.pool.peak, engine.pool.started

    for n, replies in enumerate(answers):
        assert replies == [f"Echo: chat {n} first question", f"Echo: chat {n} second question"]
    assert peak <= cap
    assert max(live for live, _ in seen) <= cap
    assert max(processes for _, processes in seen) <= cap
    # The cap was actually reached, and chats took turns with the processes.
    assert max(processes for _, processes in seen) == cap
    assert started > cap


async def test_a_chat_started_without_claude_brings_its_conversation_along(
    api: AnthropicTestServer, make_settings: Any, make_claude_settings: Any
) -> None:
    # The chat begins on the offline engine (no API key), then Claude is configured.
    with LiveServer(make_settings()) as offline:
        async with Reader(offline.url) as reader:
            cookie = reader.cookie
            ws = await reader.connect()
            await ws.chat("What does the blog say about espresso?")
            created = await ws.expect("chat_created")
            offline_answer = answer_text(await ws.until("done", timeout=60))

    with claude_server_for(make_claude_settings()) as server:
        reader = await reader_with_cookie(server, cookie)
        try:
            ws = await reader.connect()
            await ws.chat("Summarise that in one line", created["chatId"])
            events = await ws.until("done", timeout=60)
        finally:
            await reader.__aexit__(None, None, None)

    assert events[-1]["reason"] == "complete"
    prompt = api.last_request().prompt
    assert "Reader: What does the blog say about espresso?" in prompt
    assert offline_answer.strip()[:200] in prompt
    assert prompt.endswith("Summarise that in one line")


async def test_a_transcript_that_cannot_be_resumed_starts_over_from_the_chats_messages(
    api: AnthropicTestServer, claude_server: LiveServer, claude_reader: Reader
) -> None:
    engine = engine_of(claude_server)
    ws = await claude_reader.connect()
    await ws.chat("Remember the word medlar")
    created = await ws.expect("chat_created")
    chat_id = created["chatId"]
    await ws.until("done", timeout=60)
    claude_server.call(claude_server.state.sessions.close(chat_id))
    assert wait_until(lambda: engine.pool.live == 0)
    key: SessionKey = {"project_key": engine.project_key, "session_id": chat_id}
    stored = claude_server.call(engine.transcripts.load(key))
    assert stored
    # Damage the stored transcript.
    claude_server.call(engine.transcripts.delete(key))
    damaged: Any = {"type": "user", "message": 42}  # a line the CLI cannot read back
    claude_server.call(engine.transcripts.append(key, [damaged]))

    await ws.send(type="subscribe", chatId=chat_id, afterSeq=0)
    await ws.chat("Which word?", chat_id)
    events = await ws.until("done", timeout=60)
    assert events[-1]["reason"] == "complete"
    assert "Reader: Remember the word medlar" in api.last_request().prompt


async def answering(
    api: AnthropicTestServer, server: LiveServer, reader: Reader, word: str
) -> tuple[ChatSocket, str, list[Event], Any]:
    """A new chat whose long answer is streaming: its socket, id, events so far and CLI."""
    api.when_user_says(word, text(LONG_ANSWER, delay=0.02))
    ws = await reader.connect()
    await ws.chat(f"Will you {word}?")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    events = await ws.until("token", timeout=60)
    process = engine_of(server).pool.get(chat_id)
    assert process is not None
    assert process.pid is not None
    return ws, chat_id, events, process


async def test_stop_ends_the_turn_even_when_the_agent_process_hangs(
    api: AnthropicTestServer, claude_server: LiveServer, claude_reader: Reader
) -> None:
    engine = engine_of(claude_server)
    ws, chat_id, events, hung = await answering(api, claude_server, claude_reader, "freeze")
    cli = psutil.Process(hung.pid)
    cli.suspend()  # The CLI answers nothing any more, not even the interrupt.
    await ws.send(type="stop", chatId=chat_id)
    events += await ws.until("done")

    assert events[-1]["reason"] == "stopped"
    # The hung process is killed, and the chat goes on in a new one.
    assert wait_until(lambda: not cli.is_running() or cli.status() == psutil.STATUS_ZOMBIE)
    await ws.chat("Still there?", chat_id)
    after = await ws.until("done", timeout=60)
    assert after[-1]["reason"] == "complete"
    assert engine.pool.get(chat_id) is not hung
    # The killed process never saved its first turn: the new one gets the chat's messages.
    prompt = api.last_request().prompt
    assert "Reader: Will you freeze?" in prompt
    assert f"You: {answer_text(events)}".strip() in prompt
    assert prompt.endswith("Still there?")


async def test_a_crashed_agent_process_fails_the_turn_and_the_chat_goes_on(
    api: AnthropicTestServer, claude_server: LiveServer, claude_reader: Reader
) -> None:
    ws, chat_id, events, process = await answering(api, claude_server, claude_reader, "crash")
    psutil.Process(process.pid).kill()
    events += await ws.until("done", timeout=60)

    (failure,) = of_type(events, "error")
    assert failure["message"] == "The assistant stopped unexpectedly. Try again."
    assert events[-1]["reason"] == "error"
    assert answer_text(events)
    await ws.chat("Back again?", chat_id)
    after = await ws.until("done", timeout=60)
    assert after[-1]["reason"] == "complete"
    assert api.last_request().prompt.endswith("Back again?")


# --- spare processes ------------------------------------------------------------------------


async def test_a_new_chat_takes_the_spare_process_and_another_spare_is_started(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    api.set_default(EchoResponder())
    with claude_server_for(make_claude_settings(spare_processes=1)) as server:
        pool = engine_of(server).pool
        spare = ready_spare(server)
        spare_id, spare_pid = spare.spec.chat_id, spare.pid
        started = pool.started
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Is anyone there?")
            created = await ws.expect("chat_created")
            events = await ws.until("done", timeout=60)
            # The chat is the spare's: same id, same CLI, no process started for it.
            assert created["chatId"] == spare_id
            process = pool.get(spare_id)
            assert process is not None
            assert process.pid == spare_pid
            assert not process.spare
            assert events[-1]["reason"] == "complete"
            assert answer_text(events) == "Echo: Is anyone there?"
            assert api.last_request().session_id == spare_id
            # A new spare takes its place, under a new id.
            next_spare = ready_spare(server)
            assert next_spare.spec.chat_id != spare_id
            assert pool.started == started + 1
            # The chat's next turn runs on the same process.
            await ws.chat("Still you?", spare_id)
            assert answer_text(await ws.until("done", timeout=60)) == "Echo: Still you?"
            assert pool.get(spare_id) is process
            assert process.pid == spare_pid
            detail = await chat_detail(reader, spare_id)
            assert [m["text"] for m in detail["messages"]] == [
                "Is anyone there?",
                "Echo: Is anyone there?",
                "Still you?",
                "Echo: Still you?",
            ]


async def test_a_chat_opened_from_a_post_fits_the_spare_and_is_told_about_the_post_once(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    api.set_default(EchoResponder())
    with claude_server_for(make_claude_settings(spare_processes=1)) as server:
        spare_id = ready_spare(server).spec.chat_id
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Summarize this post", post="sourdough-starter-from-scratch")
            assert (await ws.expect("chat_created"))["chatId"] == spare_id
            await ws.until("done", timeout=60)
            first = api.last_request()
            await ws.chat("And the second section?", spare_id)
            await ws.until("done", timeout=60)
            second = api.last_request()
    assert "<post_context>" in first.prompt
    assert "sourdough-starter-from-scratch" in first.prompt
    assert "sourdough-starter-from-scratch" not in first.system
    # The conversation carries it from then on; it is not repeated.
    assert second.prompt == "And the second section?"
    assert "sourdough-starter-from-scratch" in json.dumps(second.messages)


async def test_a_chat_the_spare_does_not_fit_gets_its_own_process_and_the_spare_stays(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    api.set_default(EchoResponder())
    with claude_server_for(make_claude_settings(spare_processes=1)) as server:
        pool = engine_of(server).pool
        spare = ready_spare(server)
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("Explain proofing", persona="explainer")
            created = await ws.expect("chat_created")
            await ws.until("done", timeout=60)
        assert created["chatId"] != spare.spec.chat_id
        assert spare.spare
        assert pool.get(spare.spec.chat_id) is spare
        assert api.last_request().session_id == created["chatId"]


async def test_a_spare_only_uses_free_room_and_goes_first_when_a_chat_needs_it(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    api.set_default(EchoResponder())
    settings = make_claude_settings(spare_processes=1, max_live_clients=2)
    with claude_server_for(settings) as server:
        pool = engine_of(server).pool
        first_spare = ready_spare(server)
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("First chat")
            taken = (await ws.expect("chat_created"))["chatId"]
            await ws.until("done", timeout=60)
            assert taken == first_spare.spec.chat_id
            # The cap leaves room for one more process: a new spare.
            second_spare = ready_spare(server)
            # A chat the spare does not fit needs that room: the spare goes, not the chat.
            await ws.chat("Explain autolyse", persona="explainer")
            other = (await ws.expect("chat_created"))["chatId"]
            events = await ws.until("done", timeout=60)
            assert events[-1]["reason"] == "complete"
            assert wait_until(lambda: second_spare.state.value == "closed")
            assert pool.get(taken) is not None
            assert pool.get(other) is not None
            # The cap is full with chats: no spare is started.
            assert pool.spare_count == 0
            assert pool.peak <= 2
            await ws.chat("Again", taken)
            assert answer_text(await ws.until("done", timeout=60)) == "Echo: Again"


async def test_a_spare_is_never_reclaimed_for_being_idle(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    settings = make_claude_settings(spare_processes=1, client_idle_seconds=0.5)
    with claude_server_for(settings) as server:
        pool = engine_of(server).pool
        spare = ready_spare(server)
        started = pool.started
        # Several sweeps run meanwhile (every 0.5 s with this idle time).
        await asyncio.sleep(2.5)
        assert pool.get(spare.spec.chat_id) is spare
        assert spare.alive
        assert pool.started == started


REFUSE_CHAT = {
    "sqlite": [
        "CREATE TRIGGER refuse_chat BEFORE INSERT ON chats WHEN NEW.title = 'boom' "
        "BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_chat() RETURNS trigger AS $$ BEGIN "
        "IF NEW.title = 'boom' THEN RAISE EXCEPTION 'refused by test'; END IF; "
        "RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_chat BEFORE INSERT ON chats "
        "FOR EACH ROW EXECUTE FUNCTION refuse_chat()",
    ],
}


async def test_a_chat_the_database_refuses_to_create_gives_its_spare_process_back(
    api: AnthropicTestServer, make_claude_settings: Any, database: Database
) -> None:
    api.set_default(EchoResponder())
    with claude_server_for(make_claude_settings(spare_processes=1)) as server:
        pool = engine_of(server).pool
        spare = ready_spare(server)

        await server.run_sql(*REFUSE_CHAT[database.kind])
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("boom")
            refused = await ws.expect("error")
            assert refused["retryable"] is True
            # The spare the chat took is closed, not kept for a chat that does not exist,
            # and a new one takes its place.
            assert wait_until(lambda: spare.state.value == "closed")
            assert pool.get(spare.spec.chat_id) is None
            assert ready_spare(server) is not spare
            # The next chat works, on the new spare.
            await ws.chat("Hello again")
            created = await ws.expect("chat_created")
            assert answer_text(await ws.until("done", timeout=60)) == "Echo: Hello again"
            assert (await reader.http.get("/api/chats")).json()[0]["id"] == created["chatId"]


# --- a chat's process started when it is opened ------------------------------------------------


async def test_opening_a_chat_whose_process_was_closed_starts_it_before_the_next_question(
    api: AnthropicTestServer, claude_server: LiveServer, claude_reader: Reader
) -> None:
    api.set_default(EchoResponder())
    pool = engine_of(claude_server).pool
    ws = await claude_reader.connect()
    await ws.chat("Remember the word damson")
    chat_id = (await ws.expect("chat_created"))["chatId"]
    await ws.until("done", timeout=60)
    claude_server.call(claude_server.state.sessions.close(chat_id))
    assert wait_until(lambda: pool.get(chat_id) is None and pool.live == 0)
    started = pool.started

    # The reader comes back to the chat: its process starts (resuming the transcript)
    # before they ask anything.
    reader_again = await claude_reader.connect()
    await reader_again.send(type="subscribe", chatId=chat_id, afterSeq=0)
    await reader_again.expect("subscribed")
    assert wait_until(
        lambda: (p := pool.get(chat_id)) is not None and p.state.value == "idle", timeout=60
    )
    process = pool.get(chat_id)
    assert process is not None
    assert process.resumed
    assert pool.started == started + 1
    await reader_again.chat("Which word?", chat_id)
    events = await reader_again.until("done", timeout=60)
    assert events[-1]["reason"] == "complete"
    # The question ran on that process: no other was started.
    assert pool.get(chat_id) is process
    assert pool.started == started + 1
    assert conversation(api.last_request()) == [
        ("user", "Remember the word damson"),
        ("assistant", "Echo: Remember the word damson"),
        ("user", "Which word?"),
    ]


async def test_opening_a_chat_starts_nothing_when_the_cap_is_full(
    api: AnthropicTestServer, make_claude_settings: Any
) -> None:
    api.set_default(EchoResponder())
    with claude_server_for(make_claude_settings(max_live_clients=1)) as server:
        pool = engine_of(server).pool
        async with Reader(server.url) as reader:
            ws = await reader.connect()
            await ws.chat("First chat")
            first = (await ws.expect("chat_created"))["chatId"]
            await ws.until("done", timeout=60)
            await ws.chat("Second chat")
            second = (await ws.expect("chat_created"))["chatId"]
            await ws.until("done", timeout=60)
            # The second chat took the only place: the first chat's process was closed.
            assert wait_until(lambda: pool.get(first) is None)
            started = pool.started
            other = await reader.connect()
            await other.send(type="subscribe", chatId=first, afterSeq=0)
            await other.expect("subscribed")
            await other.until("done")  # The first chat's transcript, replayed.
            # Frames of one connection are handled in order: once the pong is back, the
            # subscribe has been handled in full.
            await other.send(type="ping")
            await other.until("pong")
            # Opening the first chat does not push the second one's process out.
            assert pool.get(first) is None
            assert pool.get(second) is not None
            assert pool.started == started
