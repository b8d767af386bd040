"""The Anthropic test server, over raw HTTP and driven by the real SDK with its bundled CLI."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    Message,
    ResultMessage,
    StreamEvent,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
    create_sdk_mcp_server,
    tool,
)

from tests.support.anthropic_server import (
    AnthropicTestServer,
    EchoResponder,
    cut,
    error,
    reply,
    stall,
    text,
    thinking,
    tool_use,
    usage,
)

IDENTITY = "You are a Claude agent, built on Anthropic's Claude Agent SDK."
PERSONA = "You are the blog's assistant. Answer from the blog's posts."
BLOG_TOOLS = ["mcp__blog__getCurrentDateTime", "mcp__blog__searchBlogContent"]


@pytest.fixture
def api() -> Iterator[AnthropicTestServer]:
    """A server of its own for each test, so tests can run in parallel."""
    with AnthropicTestServer() as server:
        yield server


def messages_body(prompt: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    """A Messages request shaped like the CLI's agent loop."""
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 1024,
        "stream": stream,
        "system": [{"type": "text", "text": IDENTITY}, {"type": "text", "text": PERSONA}],
        "tools": [{"name": name, "input_schema": {"type": "object"}} for name in BLOG_TOOLS],
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        **extra,
    }


def sse_events(body: str) -> list[dict[str, Any]]:
    """The data payloads of an SSE body, in order."""
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


def streamed_text(events: list[dict[str, Any]]) -> str:
    """Concatenated text deltas."""
    return "".join(
        e["delta"]["text"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
    )


# -- the server on its own ----------------------------------------------------------------------


def test_start_and_stop_leave_no_thread() -> None:
    before = set(threading.enumerate())
    with AnthropicTestServer() as server:
        assert httpx.post(f"{server.base_url}/v1/messages", json=messages_body("hi")).is_success
    assert set(threading.enumerate()) == before


def test_scripts_are_selected_per_conversation_under_concurrency(
    api: AnthropicTestServer,
) -> None:
    for n in range(8):
        api.when_user_says(f"chat-{n}:", [text(f"first answer {n}"), text(f"second answer {n}")])
    api.enqueue(text("from the queue"))

    def converse(n: int) -> list[str]:
        with httpx.Client(base_url=api.base_url) as client:
            return [
                streamed_text(sse_events(client.post("/v1/messages", json=body).text))
                for body in [messages_body(f"chat-{n}: hello")] * 3
            ]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(converse, range(8)))

    for n, replies in enumerate(answers):
        assert replies[:2] == [f"first answer {n}", f"second answer {n}"]
    # Once its rule is used up a conversation falls through to the queue, then the default.
    thirds = sorted(replies[2] for replies in answers)
    assert thirds[-1] == "from the queue"
    assert {t.split(": ", 1)[0] for t in thirds[:-1]} == {"Echo"}
    assert len(api.main_requests()) == 24


def test_rules_match_the_latest_prompt_not_tool_results(api: AnthropicTestServer) -> None:
    api.when_user_says("weather", [tool_use("getCurrentDateTime"), text("It is sunny.")])
    with httpx.Client(base_url=api.base_url) as client:
        first = sse_events(client.post("/v1/messages", json=messages_body("weather?")).text)
        call = next(e for e in first if e["type"] == "content_block_start")["content_block"]
        follow_up = messages_body("weather?")
        follow_up["messages"] += [
            {"role": "assistant", "content": [call]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "noon"}],
            },
        ]
        second = sse_events(client.post("/v1/messages", json=follow_up).text)
    # The plain tool name was mapped onto the name the request offered.
    assert call["name"] == "mcp__blog__getCurrentDateTime"
    assert first[-2]["delta"]["stop_reason"] == "tool_use"
    assert streamed_text(second) == "It is sunny."
    assert api.last_request().tool_results[0]["content"] == "noon"
    assert api.problems == []


def test_rules_match_the_readers_words_not_the_context_the_app_puts_before_them(
    api: AnthropicTestServer,
) -> None:
    # A chat whose agent process starts over carries its earlier conversation in the
    # prompt: a rule for a question asked before must not catch the new one.
    api.when_user_says("refused-key", error(401), repeat_last=True)
    api.when_user_says("And now?", text("Now it works."))
    earlier = (
        "<post_context>\nThe reader opened this chat from a post.\n</post_context>\n\n"
        "<earlier_conversation>\nReader: refused-key, please\n</earlier_conversation>\n\n"
    )
    with httpx.Client(base_url=api.base_url) as client:
        again = client.post("/v1/messages", json=messages_body(earlier + "And now?"))
        first = client.post("/v1/messages", json=messages_body(earlier + "refused-key again"))
    assert streamed_text(sse_events(again.text)) == "Now it works."
    assert first.status_code == 401
    assert api.last_request().question == "refused-key again"


def test_side_requests_never_consume_scripts(api: AnthropicTestServer) -> None:
    api.when_user_says("hello", text("scripted"))
    title_request = messages_body(
        "<session>\nhello\n</session>",
        output_config={
            "format": {
                "type": "json_schema",
                "schema": {"type": "object", "properties": {"title": {"type": "string"}}},
            }
        },
    )
    with httpx.Client(base_url=api.base_url) as client:
        title = streamed_text(sse_events(client.post("/v1/messages", json=title_request).text))
        quota = client.post(
            "/v1/messages", json={**messages_body("hello", stream=False), "system": "quota"}
        )
        main = streamed_text(
            sse_events(client.post("/v1/messages", json=messages_body("hello")).text)
        )
    assert json.loads(title) == {"title": "Test chat"}
    assert quota.json()["content"] == [{"type": "text", "text": "OK"}]
    assert main == "scripted"
    assert [r.kind for r in api.requests] == ["side", "side", "main"]


def test_non_streaming_requests_get_the_whole_message(api: AnthropicTestServer) -> None:
    api.enqueue(reply(thinking("Let me think."), text("Done thinking."), usage(11, 7)))
    response = httpx.post(
        f"{api.base_url}/v1/messages", json=messages_body("think", stream=False)
    ).json()
    assert [b["type"] for b in response["content"]] == ["thinking", "text"]
    assert response["content"][0]["signature"]
    assert response["content"][1]["text"] == "Done thinking."
    assert response["usage"]["input_tokens"] == 11
    assert response["usage"]["output_tokens"] == 7


def test_errors_cuts_and_stalls(api: AnthropicTestServer) -> None:
    api.enqueue(
        error(529),
        (text("one two three four"), cut(after=4)),
        (text("before "), stall(0.4), text("after")),
        (text("partial "), error(529)),
    )
    with httpx.Client(base_url=api.base_url) as client:
        overloaded = client.post("/v1/messages", json=messages_body("a"))
        with pytest.raises(httpx.RemoteProtocolError):
            client.post("/v1/messages", json=messages_body("b"))
        started = time.monotonic()
        stalled = sse_events(client.post("/v1/messages", json=messages_body("c")).text)
        stall_seconds = time.monotonic() - started
        broken = sse_events(client.post("/v1/messages", json=messages_body("d")).text)
    assert overloaded.status_code == 529
    assert overloaded.json()["error"]["type"] == "overloaded_error"
    assert streamed_text(stalled) == "before after"
    assert stall_seconds >= 0.4
    assert broken[-1]["error"]["type"] == "overloaded_error"
    outcomes = [r.outcome for r in api.main_requests()]
    assert outcomes == ["error 529", "cut", "completed", "completed"]


def _with_history(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body = messages_body("now?", **extra)
    body["messages"] = [*messages, *body["messages"]]
    return body


ASKED = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
THOUGHT_WITHOUT_SIGNATURE = {
    "role": "assistant",
    "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "Hello."}],
}
ORPHAN_RESULT = {
    "role": "user",
    "content": [{"type": "tool_result", "tool_use_id": "toolu_nowhere", "content": "x"}],
}
THINKING_ON = {"type": "enabled", "budget_tokens": 2048}


@pytest.mark.parametrize(
    ("body", "status", "kind", "says"),
    [
        pytest.param(
            messages_body("hi") | {"model": "claude-nonexistent-9"},
            404,
            "not_found_error",
            "model: claude-nonexistent-9",
            id="unknown-model",
        ),
        pytest.param(
            messages_body("hi", thinking=THINKING_ON) | {"max_tokens": 2048},
            400,
            "invalid_request_error",
            "`max_tokens` must be greater than `thinking.budget_tokens`",
            id="max-tokens-not-above-budget",
        ),
        pytest.param(
            messages_body("hi", thinking={"type": "enabled", "budget_tokens": 100}),
            400,
            "invalid_request_error",
            "budget_tokens",
            id="budget-under-minimum",
        ),
        pytest.param(
            _with_history(ASKED, THOUGHT_WITHOUT_SIGNATURE),
            400,
            "invalid_request_error",
            "messages.1.content.0.thinking.signature: Field required",
            id="thinking-without-signature",
        ),
        pytest.param(
            _with_history(ASKED, {"role": "assistant", "content": "ok"}, ORPHAN_RESULT),
            400,
            "invalid_request_error",
            "toolu_nowhere",
            id="tool-result-without-tool-use",
        ),
    ],
)
def test_what_the_real_api_refuses_is_refused_the_same_way_and_uses_no_script(
    api: AnthropicTestServer, body: dict[str, Any], status: int, kind: str, says: str
) -> None:
    api.enqueue(text("a script that must stay unused"))
    response = httpx.post(f"{api.base_url}/v1/messages", json=body)
    assert response.status_code == status
    assert response.json()["error"]["type"] == kind
    assert says in response.json()["error"]["message"]
    (record,) = api.main_requests()
    assert (record.answered_by, record.outcome) == ("refused", f"error {status}")
    served = httpx.post(f"{api.base_url}/v1/messages", json=messages_body("hi"))
    assert streamed_text(sse_events(served.text)) == "a script that must stay unused"


def test_a_model_a_test_adds_is_served(api: AnthropicTestServer) -> None:
    body = messages_body("hi") | {"model": "claude-made-up-1"}
    assert httpx.post(f"{api.base_url}/v1/messages", json=body).status_code == 404
    api.add_model("claude-made-up-1")
    assert httpx.post(f"{api.base_url}/v1/messages", json=body).is_success


def test_cache_usage_and_stop_reasons_and_rate_limit_headers_are_scripted(
    api: AnthropicTestServer,
) -> None:
    limited = {"retry-after": "7", "anthropic-ratelimit-requests-remaining": "0"}
    api.enqueue(
        reply(text("Cut off in the mid"), usage(10, 5, cache_read=300, cache_creation=40)),
        reply(text("I can't help with that."), stop_reason="refusal"),
        reply(text("Too long"), stop_reason="max_tokens"),
        error(429, headers=limited),
    )
    with httpx.Client(base_url=api.base_url) as client:
        cached, refused, cut_off = (
            sse_events(client.post("/v1/messages", json=messages_body("x")).text) for _ in range(3)
        )
        busy = client.post("/v1/messages", json=messages_body("x"))
    start = cached[0]["message"]["usage"]
    assert (start["cache_read_input_tokens"], start["cache_creation_input_tokens"]) == (300, 40)
    assert cached[-2]["usage"]["cache_read_input_tokens"] == 300
    assert refused[-2]["delta"]["stop_reason"] == "refusal"
    assert cut_off[-2]["delta"]["stop_reason"] == "max_tokens"
    assert busy.status_code == 429
    assert busy.json()["error"]["type"] == "rate_limit_error"
    assert busy.headers["retry-after"] == "7"
    assert busy.headers["anthropic-ratelimit-requests-remaining"] == "0"


def test_unknown_paths_and_count_tokens_are_recorded(api: AnthropicTestServer) -> None:
    with httpx.Client(base_url=api.base_url) as client:
        missing = client.get("/v1/organizations/usage")
        counted = client.post("/v1/messages/count_tokens", json=messages_body("count me"))
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"
    assert counted.json()["input_tokens"] > 0
    assert [(r.kind, r.path) for r in api.requests] == [
        ("unknown", "/v1/organizations/usage"),
        ("count_tokens", "/v1/messages/count_tokens"),
    ]


# -- the real SDK and CLI against the server ----------------------------------------------------


class BlogTools:
    """Two dummy blog tools that remember how they were called."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def server(self) -> Any:
        @tool("searchBlogContent", "Search the blog's posts", {"query": str})
        async def search(args: dict[str, Any]) -> dict[str, Any]:
            self.calls.append(("searchBlogContent", args))
            return {"content": [{"type": "text", "text": f"Post about {args['query']}"}]}

        @tool("getCurrentDateTime", "The current date and time", {})
        async def now(args: dict[str, Any]) -> dict[str, Any]:
            self.calls.append(("getCurrentDateTime", args))
            return {"content": [{"type": "text", "text": "2025-01-01T12:00:00Z"}]}

        return create_sdk_mcp_server("blog", tools=[search, now])


def agent_options(
    api: AnthropicTestServer, tmp_path: Path, tools: BlogTools, **overrides: Any
) -> ClaudeAgentOptions:
    """Options as the engine uses them: only the blog tools, nothing from the filesystem."""
    (tmp_path / "cwd").mkdir(exist_ok=True)
    (tmp_path / "config").mkdir(exist_ok=True)
    env = api.cli_env(
        config_dir=str(tmp_path / "config"),
        # Without this the CLI offers a deferred-tool placeholder next to the blog tools.
        ENABLE_TOOL_SEARCH="false",
        CLAUDE_CODE_MAX_RETRIES="0",
    )
    settings: dict[str, Any] = {
        "system_prompt": PERSONA,
        "tools": [],
        "allowed_tools": BLOG_TOOLS,
        "mcp_servers": {"blog": tools.server()},
        "setting_sources": [],
        "cwd": str(tmp_path / "cwd"),
        "env": env,
        "model": "claude-haiku-4-5",
        "include_partial_messages": True,
    }
    settings.update(overrides)
    return ClaudeAgentOptions(**settings)


async def run_turn(options: ClaudeAgentOptions, prompt: str) -> list[Message]:
    """Everything the SDK yields for one prompt, up to and including the result."""
    received: list[Message] = []
    async with asyncio.timeout(30), ClaudeSDKClient(options) as client:
        await client.query(prompt)
        async for message in client.receive_response():
            received.append(message)
    return received


def deltas(received: list[Message], kind: str) -> list[dict[str, Any]]:
    """The content-block deltas of one type, as the SDK streamed them."""
    return [
        m.event["delta"]
        for m in received
        if isinstance(m, StreamEvent)
        and m.event.get("type") == "content_block_delta"
        and m.event["delta"]["type"] == kind
    ]


@pytest.mark.claude
async def test_thinking_and_text_stream_as_deltas(api: AnthropicTestServer, tmp_path: Path) -> None:
    api.when_user_says(
        "sourdough",
        reply(thinking("A question about starters.", signature="sig-1"), text("Keep it warm.")),
    )
    received = await run_turn(agent_options(api, tmp_path, BlogTools()), "About sourdough?")

    assert "".join(d["thinking"] for d in deltas(received, "thinking_delta")) == (
        "A question about starters."
    )
    assert [d["signature"] for d in deltas(received, "signature_delta")] == ["sig-1"]
    assert [d["text"] for d in deltas(received, "text_delta")] == ["Keep ", "it ", "warm."]
    blocks = [b for m in received if isinstance(m, AssistantMessage) for b in m.content]
    assert isinstance(blocks[0], ThinkingBlock)
    assert blocks[0].signature == "sig-1"
    assert isinstance(blocks[1], TextBlock)
    assert blocks[1].text == "Keep it warm."
    result = received[-1]
    assert isinstance(result, ResultMessage)
    assert (result.subtype, result.is_error, result.result) == ("success", False, "Keep it warm.")


@pytest.mark.claude
async def test_tool_use_round_trip_runs_the_sdk_tool(
    api: AnthropicTestServer, tmp_path: Path
) -> None:
    tools = BlogTools()
    api.when_user_says(
        "rye",
        [
            reply(text("Searching. "), tool_use("searchBlogContent", {"query": "rye"})),
            text("There is a post about rye."),
        ],
    )
    received = await run_turn(agent_options(api, tmp_path, tools), "Anything on rye bread?")

    assert tools.calls == [("searchBlogContent", {"query": "rye"})]
    first, second = api.main_requests()
    assert second.prompt == first.prompt == "Anything on rye bread?"
    (call,) = second.blocks("tool_use", role="assistant")
    assert call["name"] == "mcp__blog__searchBlogContent"
    (result,) = second.tool_results
    assert result["tool_use_id"] == call["id"]
    # The CLI may append a system reminder to the tool's own output.
    assert result["content"][0]["text"].strip() == "Post about rye"
    assert any(
        isinstance(b, ToolUseBlock) and b.input == {"query": "rye"}
        for m in received
        if isinstance(m, AssistantMessage)
        for b in m.content
    )
    final = received[-1]
    assert isinstance(final, ResultMessage)
    assert final.result == "There is a post about rye."
    assert final.num_turns == 2


@pytest.mark.claude
async def test_overloaded_api_surfaces_as_an_error_result(
    api: AnthropicTestServer, tmp_path: Path
) -> None:
    api.when_user_says("busy", error(529), repeat_last=True)
    received = await run_turn(agent_options(api, tmp_path, BlogTools()), "Are you busy?")

    result = received[-1]
    assert isinstance(result, ResultMessage)
    assert result.is_error
    assert result.api_error_status == 529
    assert result.result is not None
    assert result.result.startswith("API Error: 529")
    # The CLI reports the failure as an assistant message flagged with an error, not a reply.
    flagged = [m for m in received if isinstance(m, AssistantMessage) and m.error]
    assert [m.error for m in flagged] == ["server_error"]
    # CLAUDE_CODE_MAX_RETRIES=0: a single attempt.
    assert len(api.main_requests()) == 1


@pytest.mark.claude
async def test_request_carries_the_system_prompt_and_only_the_blog_tools(
    api: AnthropicTestServer, tmp_path: Path
) -> None:
    await run_turn(agent_options(api, tmp_path, BlogTools()), "Hello there")

    request = api.last_request()
    assert sorted(request.tool_names) == BLOG_TOOLS
    assert request.system_blocks[1:] == [IDENTITY, PERSONA]
    assert request.model == "claude-haiku-4-5"
    assert request.prompt == "Hello there"
    assert api.side_requests() == []
    assert api.unknown_requests() == []


@pytest.mark.claude
async def test_default_tools_include_the_cli_builtins(
    api: AnthropicTestServer, tmp_path: Path
) -> None:
    # Guards the finding the engine relies on: only `tools=[]` keeps the built-ins away.
    api.set_default(EchoResponder())
    options = agent_options(api, tmp_path, BlogTools())
    options.tools = None
    options.env.pop("ENABLE_TOOL_SEARCH")
    await run_turn(options, "Hello there")

    names = api.last_request().tool_names
    assert {"Bash", "Read", "Write", "ToolSearch"} <= set(names)
    # The blog tools are hidden behind ToolSearch instead of offered.
    assert not set(BLOG_TOOLS) & set(names)
