"""What the real SDK and CLI report for a few scripted answers, recorded as JSON fixtures.

The in-process tests (tests/test_claude_stream.py) replay these into the stream parser
and `Attempt` with no CLI process. To record them again (after an SDK or CLI upgrade):

    uv run python -m tests.support.recorded_stream

Each scenario starts the Claude engine's own agent process (the real options, launcher
and MCP tools) against `AnthropicTestServer`, sends one prompt, and saves everything the
process's inbox receives up to the turn's `ResultMessage`. A scenario may interrupt the
turn when a message arrives, as the engine does on a stop or a failure; the fixture notes
after which item.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import claude_agent_sdk
from claude_agent_sdk import (
    AssistantMessage,
    ResultMessage,
    StreamEvent,
    SystemMessage,
    ToolUseBlock,
    types,
)

from blogchat.engines.claude.process import WAKE, Ended, Inbound, Wake

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "claude_stream"


# --- the JSON form of inbox items -------------------------------------------------------------


def encode(value: Any) -> Any:
    """An inbox item (an SDK message, `Wake`, `Ended`) as JSON, keeping its classes."""
    if isinstance(value, Wake):
        return {"__item__": "Wake"}
    if isinstance(value, Ended):
        return {"__item__": "Ended", "error": None if value.error is None else repr(value.error)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        encoded = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__sdk__": type(value).__name__, **encoded}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    return value


def decode(value: Any) -> Any:
    """The inverse of `encode`."""
    if isinstance(value, list):
        return [decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    if "__item__" in value:
        if value["__item__"] == "Wake":
            return WAKE
        error = value.get("error")
        return Ended(None if error is None else RuntimeError(error))
    fields = {key: decode(item) for key, item in value.items() if key != "__sdk__"}
    if "__sdk__" in value:
        name = value["__sdk__"]
        cls = getattr(claude_agent_sdk, name, None) or getattr(types, name)
        return cls(**fields)
    return fields


@dataclass(frozen=True)
class Recording:
    """One scenario as the engine's inbox received it."""

    name: str
    about: str
    prompt: str
    items: list[Inbound]
    # The index of the item after which the recorder interrupted the turn, if it did.
    interrupted_after: int | None = None

    @property
    def before_interrupt(self) -> list[Inbound]:
        """The items up to the interrupt (all of them when there was none)."""
        if self.interrupted_after is None:
            return list(self.items)
        return self.items[: self.interrupted_after + 1]

    @property
    def after_interrupt(self) -> list[Inbound]:
        """What the CLI sent after the interrupt."""
        if self.interrupted_after is None:
            return []
        return self.items[self.interrupted_after + 1 :]


def load(name: str) -> Recording:
    """A recorded scenario from tests/fixtures/claude_stream/."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    return Recording(
        name=data["name"],
        about=data["about"],
        prompt=data["prompt"],
        items=[decode(item) for item in data["items"]],
        interrupted_after=data["interrupted_after"],
    )


# --- the scenarios ------------------------------------------------------------------------------


def _text_deltas(count: int) -> Callable[[Inbound, int], bool]:
    seen = 0

    def when(item: Inbound, _: int) -> bool:
        nonlocal seen
        if isinstance(item, StreamEvent):
            delta = item.event.get("delta") or {}
            seen += delta.get("type") == "text_delta"
        return seen >= count

    return when


def _tool_use(item: Inbound, _: int) -> bool:
    return isinstance(item, AssistantMessage) and any(
        isinstance(block, ToolUseBlock) for block in item.content
    )


def _api_retry(item: Inbound, _: int) -> bool:
    return isinstance(item, SystemMessage) and item.subtype == "api_retry"


@dataclass(frozen=True)
class Scenario:
    """A scripted answer of the test server, and when (if ever) to interrupt the turn."""

    name: str
    about: str
    script: Callable[[], Any]
    prompt: str = "Tell me about sourdough starters."
    interrupt_when: Callable[[], Callable[[Inbound, int], bool]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    slow_tool: str | None = None


def scenarios() -> list[Scenario]:
    """The recorded scenarios (imported here: the test server is a test dependency)."""
    from tests.support.anthropic_server import (
        cut,
        error,
        reply,
        text,
        thinking,
        tool_use,
        usage,
    )

    long_answer = "Starters like warmth. " + " ".join(
        f"Sentence number {n} keeps going." for n in range(40)
    )
    return [
        Scenario(
            "plain_answer",
            "one streamed text answer",
            lambda: [text("Keep it warm. Feed it daily.")],
        ),
        Scenario(
            "thinking_tool_answer",
            "thinking, text and a tool call, then an answer; cache tokens in the usage",
            lambda: [
                reply(
                    thinking("The reader asks about starters."),
                    text("Let me look that up. "),
                    tool_use("searchBlogContent", {"query": "sourdough starter"}),
                    usage(100, 40, cache_read=2000, cache_creation=300),
                ),
                reply(
                    thinking("The search found the post."),
                    text("Keep it warm, around 24-26 °C."),
                    usage(50, 60, cache_read=2300),
                ),
            ],
        ),
        Scenario(
            "overloaded_then_answer",
            "a 529 the CLI retries by itself (api_retry), then the answer",
            lambda: [error(529), text("Here after all.")],
        ),
        Scenario(
            "overloaded_throughout",
            "529 on every request: the CLI gives up after its retries",
            lambda: [error(529), error(529), error(529)],
        ),
        Scenario(
            "refused_key",
            "401 on every request: the CLI retries even that (the engine must not wait)",
            lambda: [error(401), error(401), error(401)],
        ),
        Scenario(
            "retry_after_too_long",
            "429 with retry-after 10 s; interrupted at the CLI's api_retry, as the engine does",
            lambda: [error(429, headers={"retry-after": "10"}), text("Too late.")],
            interrupt_when=lambda: _api_retry,
        ),
        Scenario(
            "unstreamed_reply",
            "the streaming request gets a 404; the CLI asks again without streaming",
            lambda: [error(404), reply(thinking("Hm."), text("A whole reply."))],
        ),
        Scenario(
            "cut_mid_answer",
            "the connection breaks after the first sentence; the CLI asks again from the start",
            lambda: [
                reply(text("The first part. ", delay=0.05), cut()),
                text("The whole answer, again."),
            ],
        ),
        Scenario(
            "cut_before_content",
            "the connection breaks right after message_start; the CLI asks again",
            lambda: [reply(text("Never shown."), cut(after=2)), text("The answer.")],
        ),
        Scenario(
            "cut_mid_sentence",
            "the connection breaks inside a text block; the CLI streams the reply again",
            lambda: [
                reply(text("The first part of it. ", delay=0.05), cut(after=5)),
                text("The whole answer, again."),
            ],
        ),
        Scenario(
            "error_event_mid_answer",
            "an SSE error after the first sentence; the CLI asks the model to resume",
            lambda: [
                reply(text("The first part. ", delay=0.05), error(529)),
                text("The whole answer, again."),
            ],
        ),
        Scenario(
            "max_tokens",
            "the answer reaches max_tokens; the CLI asks the model to go on",
            lambda: [
                reply(
                    thinking("Hm."),
                    text("This answer runs until it is cut off in the mid"),
                    stop_reason="max_tokens",
                ),
                text("dle of a word."),
            ],
        ),
        Scenario(
            "refusal",
            "the model refuses; the CLI reports it and ends the turn",
            lambda: [
                reply(thinking("Hm."), text("I can't help with that."), stop_reason="refusal")
            ],
        ),
        Scenario(
            "max_turns",
            "two tool calls with max_turns 2: the CLI ends the turn",
            lambda: [
                reply(text("Searching once. "), tool_use("searchBlogContent", {"query": "bread"})),
                reply(text("Searching twice. "), tool_use("searchBlogContent", {"query": "rye"})),
                text("This is never asked for."),
            ],
            settings={"max_turns": 2},
        ),
        Scenario(
            "stopped_mid_text",
            "a long answer, interrupted after three text deltas",
            lambda: [text(long_answer, delay=0.02)],
            interrupt_when=lambda: _text_deltas(3),
        ),
        Scenario(
            "stopped_mid_tool",
            "a slow tool call, interrupted while the tool runs",
            lambda: [
                reply(text("Let me check the date. "), tool_use("getCurrentDateTime", {})),
                text("It is a fine day."),
            ],
            interrupt_when=lambda: _tool_use,
            slow_tool="getCurrentDateTime",
        ),
    ]


async def record(scenario: Scenario, workdir: Path) -> Recording:
    """Run one scenario against a test server of its own."""
    from blogchat.app import load_content
    from blogchat.engines.claude import ClaudeEngine
    from blogchat.engines.claude.process import AgentSpec
    from blogchat.store import Store
    from blogchat.store.transcripts import TranscriptStore
    from tests.support.anthropic_server import AnthropicTestServer
    from tests.support.claude import claude_overrides
    from tests.support.server import Database, settings_for

    workdir.mkdir(parents=True)
    with AnthropicTestServer() as api:
        database = Database("sqlite", f"sqlite+aiosqlite:///{workdir / 'record.db'}")
        overrides = claude_overrides(api, **scenario.settings)
        settings = settings_for(database, workdir, **overrides)
        content = load_content(settings)
        if scenario.slow_tool is not None:
            original = content.tools.all[scenario.slow_tool]

            def slow(arguments: Any) -> object:
                time.sleep(2.0)
                return original.run(arguments)

            content.tools.all[scenario.slow_tool] = dataclasses.replace(original, run=slow)
        store = await Store.open(settings.database)
        engine = ClaudeEngine(settings, content.tools, TranscriptStore(store.db))
        persona = content.personas.default
        api.when_user_says(scenario.prompt, scenario.script(), where="any")
        spec = AgentSpec(
            chat_id="00000000-0000-4000-8000-000000000000",
            model_id=settings.model_haiku,
            system_prompt=persona.system_prompt,
            tools=tuple(persona.allowed_tools),
        )
        items: list[Inbound] = []
        interrupted_after: int | None = None
        when = scenario.interrupt_when() if scenario.interrupt_when else None
        try:
            process = await engine.pool.acquire(spec)
            await process.query(scenario.prompt)
            while True:
                item = await process.receive(60)
                items.append(item)
                if when is not None and interrupted_after is None and when(item, len(items)):
                    interrupted_after = len(items) - 1
                    process.interrupt()
                if isinstance(item, (ResultMessage, Ended)):
                    break
            await engine.pool.discard(process)
        finally:
            await engine.aclose()
            await store.close()
    return Recording(scenario.name, scenario.about, scenario.prompt, items, interrupted_after)


def save(recording: Recording) -> Path:
    """Write a recording to tests/fixtures/claude_stream/<name>.json."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{recording.name}.json"
    data = {
        "name": recording.name,
        "about": recording.about,
        "prompt": recording.prompt,
        "interrupted_after": recording.interrupted_after,
        "items": [encode(item) for item in recording.items],
    }
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    return path


async def main(names: list[str]) -> None:
    """Record every scenario (or those named), one after the other."""
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in scenarios():
            if names and scenario.name not in names:
                continue
            recording = await record(scenario, Path(tmp) / scenario.name)
            print(f"{save(recording)}: {len(recording.items)} items")


if __name__ == "__main__":
    import sys

    asyncio.run(main(sys.argv[1:]))
