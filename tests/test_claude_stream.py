"""The Claude engine's reading of the SDK stream, in process: `StreamReader` (stream.py) and
`Attempt` (turn.py) fed with what the real SDK and CLI reported for scripted answers of the
test server (tests/fixtures/claude_stream/, recorded by tests/support/recorded_stream.py),
through a scripted agent process. No CLI, no server: tests/test_claude_engine.py and
tests/test_claude_exactness.py are the acceptance layer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import pytest
from claude_agent_sdk import (
    AssistantMessage,
    StreamEvent,
    SystemMessage,
    ToolUseBlock,
    UserMessage,
)

from blogchat.engines import base
from blogchat.engines.base import (
    EngineEvent,
    ModelCall,
    Retrying,
    TextDelta,
    ThinkingDelta,
    ToolFinished,
    ToolStarted,
    TurnFailed,
)
from blogchat.engines.claude import failures
from blogchat.engines.claude.process import Ended, Inbound
from blogchat.engines.claude.stream import (
    BlockEnded,
    BlockStarted,
    CallUsage,
    CliNote,
    Delta,
    Fact,
    Finished,
    ProcessEnded,
    ProviderError,
    RefusalAnnounced,
    Requesting,
    ResponseEnded,
    ResponseStarted,
    RetryAnnounced,
    StreamReader,
    ToolCall,
    ToolResult,
    UnstreamedReply,
    WholeBlock,
)
from blogchat.engines.claude.turn import DRAIN, STOP_GRACE, Attempt, Phase, Tally
from blogchat.session import SessionTimings
from tests.support.recorded_stream import Recording, load
from tests.support.scripted import Cue, PressStop, ScriptedAgent, Silence

PROMPT = "Tell me about sourdough starters."


def facts_of(items: Iterable[Inbound]) -> list[Fact]:
    """Everything a reader of the stream makes of these items."""
    reader = StreamReader("chat-1")
    return [fact for item in items for fact in reader.read(item)]


def index_of(recording: Recording, matches: type, nth: int = 0, **where: object) -> int:
    """The index of the nth recorded item of a type whose attributes match `where`."""
    found = [
        i
        for i, item in enumerate(recording.items)
        if isinstance(item, matches) and all(getattr(item, k) == v for k, v in where.items())
    ]
    return found[nth]


def calls_a_tool(item: Inbound) -> bool:
    """Whether an item is the CLI's whole copy of a tool call."""
    return isinstance(item, AssistantMessage) and any(
        isinstance(block, ToolUseBlock) for block in item.content
    )


def stream_event(recording: Recording, kind: str, nth: int = 0) -> int:
    """The index of the nth StreamEvent of a kind (`message_stop`, ...)."""
    found = [
        i
        for i, item in enumerate(recording.items)
        if isinstance(item, StreamEvent) and item.event.get("type") == kind
    ]
    return found[nth]


@dataclass
class Run:
    """An attempt replayed to its end."""

    attempt: Attempt
    agent: ScriptedAgent
    events: list[EngineEvent]

    @property
    def shown(self) -> list[EngineEvent]:
        """What reached the reader (model calls are for telemetry only)."""
        return [event for event in self.events if not isinstance(event, ModelCall)]

    @property
    def text(self) -> str:
        """The answer text the reader got."""
        return "".join(event.text for event in self.events if isinstance(event, TextDelta))

    @property
    def thinking(self) -> str:
        """The thinking the reader got."""
        return "".join(event.text for event in self.events if isinstance(event, ThinkingDelta))

    @property
    def calls(self) -> list[ModelCall]:
        """The model calls reported for telemetry."""
        return [event for event in self.events if isinstance(event, ModelCall)]

    @property
    def tally(self) -> Tally:
        """The turn's tally."""
        return self.attempt.tally


async def replay(
    script: Iterable[Cue],
    *,
    after_interrupt: Iterable[Cue] | None = None,
    retry_max_wait: float = 30.0,
    fail_query: BaseException | None = None,
) -> Run:
    """Run one attempt against a scripted agent process, to its end."""
    stop = asyncio.Event()
    agent = ScriptedAgent(script, stop, after_interrupt=after_interrupt, fail_query=fail_query)
    attempt = Attempt(
        agent, PROMPT, stop, Tally(), stall_seconds=60.0, retry_max_wait=retry_max_wait
    )
    events = [event async for event in attempt.events()]
    assert attempt.phase is Phase.DONE
    return Run(attempt, agent, events)


def with_cues(recording: Recording, cues: dict[int, Cue], *, upto: int | None = None) -> list[Cue]:
    """The recording's items (up to the index `upto`), with cues before the given indexes."""
    items = recording.items if upto is None else recording.items[: upto + 1]
    script: list[Cue] = []
    for i, item in enumerate(items):
        if i in cues:
            script.append(cues[i])
        script.append(item)
    return script


# --- the stream, read once ------------------------------------------------------------------


def test_a_streamed_answer_reads_as_one_response_with_its_deltas_whole_block_and_end() -> None:
    facts = [f for f in facts_of(load("plain_answer").items) if not isinstance(f, Delta)]
    deltas = [f for f in facts_of(load("plain_answer").items) if isinstance(f, Delta)]

    assert [type(fact) for fact in facts] == [
        Requesting,
        ResponseStarted,
        BlockStarted,
        WholeBlock,
        BlockEnded,
        ResponseEnded,
        Finished,
    ]
    assert "".join(delta.text for delta in deltas) == "Keep it warm. Feed it daily."
    assert {delta.kind for delta in deltas} == {"text"}
    whole = facts[3]
    assert whole == WholeBlock("text", "Keep it warm. Feed it daily.", streamed=True)
    ended = facts[5]
    assert isinstance(ended, ResponseEnded)
    assert ended.stop_reason == "end_turn"
    assert not ended.broke_off


def test_a_responses_usage_counts_cached_input_and_takes_output_from_its_end() -> None:
    facts = facts_of(load("thinking_tool_answer").items)
    started = [fact for fact in facts if isinstance(fact, ResponseStarted)]
    ended = [fact for fact in facts if isinstance(fact, ResponseEnded)]

    # Input includes the tokens read from and written to the cache; output is unknown until
    # the response's end.
    assert [fact.usage for fact in started] == [
        CallUsage(input=2400, output=0, cache_read=2000, cache_creation=300),
        CallUsage(input=2350, output=0, cache_read=2300, cache_creation=0),
    ]
    assert [fact.usage for fact in ended] == [
        CallUsage(input=2400, output=40, cache_read=2000, cache_creation=300),
        CallUsage(input=2350, output=60, cache_read=2300, cache_creation=0),
    ]
    assert [fact.stop_reason for fact in ended] == ["tool_use", "end_turn"]
    assert started[0].model == "claude-haiku-4-5"


def test_a_tool_call_reads_with_its_plain_name_and_whole_input_and_its_result_follows() -> None:
    facts = facts_of(load("thinking_tool_answer").items)
    (call,) = [fact for fact in facts if isinstance(fact, ToolCall)]
    (result,) = [fact for fact in facts if isinstance(fact, ToolResult)]

    assert (call.name, call.input) == ("searchBlogContent", {"query": "sourdough starter"})
    assert result.tool_use_id == call.tool_use_id
    assert not result.is_error
    assert '"results"' in result.output
    kinds = [
        (type(f).__name__, getattr(f, "kind", None)) for f in facts if not isinstance(f, Delta)
    ]
    assert kinds.index(("BlockStarted", "thinking")) < kinds.index(("BlockStarted", "text"))
    assert kinds.index(("BlockStarted", "text")) < kinds.index(("BlockStarted", "tool_use"))


def test_a_reply_that_was_not_streamed_is_announced_once_then_read_whole() -> None:
    facts = facts_of(load("unstreamed_reply").items)
    replies = [fact for fact in facts if isinstance(fact, UnstreamedReply)]
    blocks = [fact for fact in facts if isinstance(fact, WholeBlock)]

    (reply,) = replies
    assert reply.stop_reason == "end_turn"
    assert reply.usage.input > 0
    assert blocks == [
        WholeBlock("thinking", "Hm.", streamed=False),
        WholeBlock("text", "A whole reply.", streamed=False),
    ]
    assert not [fact for fact in facts if isinstance(fact, (ResponseStarted, Delta))]


def test_a_response_cut_mid_sentence_ends_without_a_stop_reason_before_the_cli_retries() -> None:
    facts = [f for f in facts_of(load("cut_mid_sentence").items) if not isinstance(f, Delta)]
    ended = [fact for fact in facts if isinstance(fact, ResponseEnded)]
    retry = next(fact for fact in facts if isinstance(fact, RetryAnnounced))

    assert [fact.broke_off for fact in ended] == [True, False]
    assert facts.index(ended[0]) < facts.index(retry)
    assert (retry.attempt, retry.max_retries, retry.status, retry.error) == (1, 2, None, "unknown")
    assert retry.delay > 0


def test_a_response_still_open_when_the_next_starts_is_read_as_broken_off() -> None:
    # The same break, had the CLI started over without closing the first response.
    recording = load("cut_mid_sentence")
    items = [
        item
        for i, item in enumerate(recording.items)
        if i != stream_event(recording, "message_stop")
    ]
    ended = [fact for fact in facts_of(items) if isinstance(fact, ResponseEnded)]

    assert [fact.broke_off for fact in ended] == [True, False]
    assert ended[0].message_id != ended[1].message_id


def test_the_clis_retries_and_final_error_read_as_facts_and_its_error_text_as_no_answer() -> None:
    facts = facts_of(load("overloaded_throughout").items)

    retries = [fact for fact in facts if isinstance(fact, RetryAnnounced)]
    assert [(r.attempt, r.max_retries, r.status, r.error) for r in retries] == [
        (1, 2, 529, "overloaded"),
        (2, 2, 529, "overloaded"),
    ]
    (error,) = [fact for fact in facts if isinstance(fact, ProviderError)]
    assert error.kind == "server_error"
    assert "529" in error.text
    assert not [fact for fact in facts if isinstance(fact, WholeBlock)]
    assert isinstance(facts[-1], Finished)
    assert facts[-1].result.api_error_status == 529


def test_a_refusal_is_announced_before_the_clis_error_and_the_responses_stop_reason() -> None:
    facts = facts_of(load("refusal").items)
    order = [
        type(fact)
        for fact in facts
        if isinstance(fact, (RefusalAnnounced, ProviderError, ResponseEnded))
    ]

    assert order == [RefusalAnnounced, ProviderError, ResponseEnded]
    (ended,) = [fact for fact in facts if isinstance(fact, ResponseEnded)]
    assert ended.stop_reason == "refusal"


def test_the_clis_own_words_to_the_model_read_as_notes() -> None:
    facts = facts_of(load("error_event_mid_answer").items)
    (note,) = [fact for fact in facts if isinstance(fact, CliNote)]
    assert note.text.startswith("Your response above was cut off mid-stream.")


def test_an_ended_process_reads_as_such_and_a_subagents_messages_not_at_all() -> None:
    recording = load("plain_answer")
    streamed = [
        item for item in recording.items if isinstance(item, (StreamEvent, AssistantMessage))
    ]
    for item in streamed:
        item.parent_tool_use_id = "toolu_subagent"
    error = RuntimeError("gone")

    assert facts_of(streamed) == []
    assert facts_of([Ended(error)]) == [ProcessEnded(error)]


# --- an attempt: what the reader sees, and how it ends ---------------------------------------


async def test_an_answer_reaches_the_reader_as_deltas_and_ends_complete_with_its_usage() -> None:
    run = await replay(load("plain_answer").items)

    assert run.text == "Keep it warm. Feed it daily."
    assert all(isinstance(event, TextDelta) for event in run.shown)
    assert (run.attempt.outcome, run.attempt.failure, run.attempt.settled) == (
        "complete",
        None,
        True,
    )
    assert run.agent.prompts == [PROMPT]
    assert run.agent.interrupted_after is None
    assert (run.tally.model, run.tally.stop_reason) == ("claude-haiku-4-5", "end_turn")
    (call,) = run.calls
    assert call.output == {"role": "assistant", "content": [{"type": "text", "text": run.text}]}
    assert (call.input_tokens, call.output_tokens) == (
        run.tally.input_tokens,
        run.tally.output_tokens,
    )
    assert call.input == [{"role": "user", "content": PROMPT}]
    assert (call.stop_reason, call.error) == ("end_turn", None)
    assert call.first_token_at is not None


async def test_thinking_a_tool_call_and_its_result_arrive_in_order_and_each_call_is_reported() -> (
    None
):
    run = await replay(load("thinking_tool_answer").items)

    kinds = [type(event) for event in run.shown]
    assert kinds.index(ThinkingDelta) < kinds.index(TextDelta) < kinds.index(ToolStarted)
    assert kinds.index(ToolStarted) < kinds.index(ToolFinished)
    (started,) = [e for e in run.shown if isinstance(e, ToolStarted)]
    (finished,) = [e for e in run.shown if isinstance(e, ToolFinished)]
    assert (started.name, started.input) == ("searchBlogContent", {"query": "sourdough starter"})
    assert finished.tool_use_id == started.tool_use_id
    assert not finished.is_error
    assert run.text == "Let me look that up. Keep it warm, around 24-26 °C."
    assert run.thinking == "The reader asks about starters.The search found the post."
    assert run.attempt.outcome == "complete"
    assert run.tally.open_tools == {}
    # Usage over both calls, cached tokens counted in the input and apart.
    assert (run.tally.input_tokens, run.tally.output_tokens) == (2400 + 2350, 100)
    assert (run.tally.cache_read_tokens, run.tally.cache_creation_tokens) == (4300, 300)
    first, second = run.calls
    assert first.output == {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "The reader asks about starters."},
            {"type": "text", "text": "Let me look that up. "},
            {
                "type": "tool_use",
                "id": started.tool_use_id,
                "name": "searchBlogContent",
                "input": started.input,
            },
        ],
    }
    assert (first.stop_reason, first.cache_read_tokens, first.cache_creation_tokens) == (
        "tool_use",
        2000,
        300,
    )
    assert second.input == [
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": started.tool_use_id,
                    "content": finished.output,
                    "is_error": False,
                }
            ],
        }
    ]
    assert (second.input_tokens, second.output_tokens, second.stop_reason) == (2350, 60, "end_turn")


async def test_a_retry_the_cli_announces_reaches_the_readers_and_the_answer_follows() -> None:
    run = await replay(load("overloaded_then_answer").items)

    retry, *rest = run.shown
    assert isinstance(retry, Retrying)
    assert (retry.attempt, retry.max_attempts) == (2, 3)
    assert retry.delay > 0
    assert all(isinstance(event, TextDelta) for event in rest)
    assert run.text == "Here after all."
    assert run.attempt.outcome == "complete"
    # A retry alone shows the reader nothing of the answer: a failure could still be
    # retried unseen.
    failed, answered = run.calls
    assert failed.error == "API error 529: overloaded"
    assert (answered.error, answered.stop_reason) == (None, "end_turn")


async def test_a_provider_that_keeps_failing_ends_the_attempt_with_its_classified_failure() -> None:
    run = await replay(load("overloaded_throughout").items)

    assert [type(event) for event in run.shown] == [Retrying, Retrying]
    assert run.attempt.outcome == "error"
    failure = run.attempt.failure
    assert failure is not None
    assert failure == failures.OVERLOADED.because(failure.detail)
    assert "status=529" in failure.detail
    assert not failure.engine_retries
    assert run.attempt.settled
    assert not run.tally.forwarded
    assert run.calls[-1].error is not None
    assert run.calls[-1].error.startswith("server_error: API Error: 529")


@pytest.mark.parametrize(
    ("name", "retry_max_wait", "expected"),
    [
        # The CLI retries a refused key too: trying again cannot help.
        ("refused_key", 30.0, failures.NOT_CONFIGURED),
        # A retry-after of 10 s when 2 s is the most the engine waits.
        ("retry_after_too_long", 2.0, failures.RATE_LIMITED),
    ],
)
async def test_a_retry_that_cannot_help_or_waits_too_long_is_not_waited_for(
    name: str, retry_max_wait: float, expected: TurnFailed
) -> None:
    recording = load(name)
    run = await replay(
        recording.before_interrupt,
        after_interrupt=recording.after_interrupt or None,
        retry_max_wait=retry_max_wait,
    )

    retry_at = index_of(recording, SystemMessage, subtype="api_retry")
    assert run.agent.interrupted_after == retry_at + 1
    assert not [event for event in run.shown if isinstance(event, Retrying)]
    assert run.attempt.outcome == "error"
    failure = run.attempt.failure
    assert failure is not None
    assert (failure.message, failure.retryable) == (expected.message, expected.retryable)


async def test_a_retry_after_within_the_limit_is_announced_and_waited_for() -> None:
    recording = load("retry_after_too_long")
    script = [*recording.before_interrupt, Silence()]
    run = await replay(script, after_interrupt=recording.after_interrupt)

    (retry,) = run.shown
    assert isinstance(retry, Retrying)
    assert (retry.attempt, retry.max_attempts) == (2, 3)
    assert retry.delay >= 10.0
    # Nothing cut the CLI's wait short: only a silence past the stall limit ends it.
    assert run.agent.interrupted_after == len(recording.before_interrupt)
    assert run.attempt.failure is not None
    assert run.attempt.failure.message == failures.STALLED.message


@pytest.mark.parametrize("name", ["cut_mid_sentence", "cut_mid_answer", "error_event_mid_answer"])
async def test_a_stream_that_breaks_after_text_was_shown_fails_as_cut_off_and_shows_no_more(
    name: str,
) -> None:
    recording = load(name)
    run = await replay(recording.items)

    assert run.text in ("The first ", "The first part. ")
    assert "whole answer" not in run.text
    assert run.attempt.outcome == "error"
    assert run.attempt.failure is not None
    assert run.attempt.failure.message == failures.CUT_OFF.message
    # Interrupted as soon as the response ended without a stop reason.
    assert run.agent.interrupted_after == stream_event(recording, "message_stop") + 1
    assert run.calls[0].error == "the response broke off mid-stream"


async def test_a_stream_that_breaks_before_anything_was_shown_is_left_to_the_clis_retry() -> None:
    run = await replay(load("cut_before_content").items)

    assert isinstance(run.shown[0], Retrying)
    assert run.text == "The answer."
    assert (run.attempt.outcome, run.attempt.failure) == ("complete", None)
    assert run.agent.interrupted_after is None


async def test_a_reply_that_was_not_streamed_reaches_the_reader_whole_with_its_usage() -> None:
    run = await replay(load("unstreamed_reply").items)

    assert run.shown == [ThinkingDelta("Hm."), TextDelta("A whole reply.")]
    assert run.attempt.outcome == "complete"
    assert run.tally.input_tokens > 0
    (call,) = run.calls
    assert call.output == {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Hm."},
            {"type": "text", "text": "A whole reply."},
        ],
    }
    assert (call.error, call.stop_reason) == (None, "end_turn")


async def test_a_reply_that_was_not_streamed_after_streamed_text_fails_as_cut_off() -> None:
    # Recorded pieces put together: text streams, the response never ends, and the CLI's
    # fallback reply (not streamed) comes instead.
    cut = load("cut_mid_sentence")
    fallback = load("unstreamed_reply")
    first_reply = index_of(fallback, AssistantMessage)
    script = [*cut.items[: stream_event(cut, "message_stop")], *fallback.items[first_reply:]]
    run = await replay(script)

    assert run.text == "The first "
    assert run.attempt.outcome == "error"
    assert run.attempt.failure is not None
    assert run.attempt.failure.message == failures.CUT_OFF.message
    assert "whole reply" not in run.text


async def test_the_output_limit_ends_the_turn_with_what_the_model_said_and_no_more() -> None:
    recording = load("max_tokens")
    run = await replay(recording.items)

    assert run.text == "This answer runs until it is cut off in the mid"
    assert run.thinking == "Hm."
    assert (run.attempt.outcome, run.attempt.failure) == ("complete", None)
    assert (run.attempt.cut_reason, run.tally.stop_reason) == ("max_tokens", "max_tokens")
    # Interrupted at the response's end, before the CLI's request to go on.
    assert run.agent.interrupted_after == stream_event(recording, "message_stop") + 1


async def test_a_refusal_ends_the_turn_with_what_the_model_said_and_the_cli_ends_it_itself() -> (
    None
):
    run = await replay(load("refusal").items)

    assert run.text == "I can't help with that."
    assert "API Error" not in run.text
    assert (run.attempt.outcome, run.attempt.failure) == ("complete", None)
    assert (run.attempt.cut_reason, run.tally.stop_reason) == ("refusal", "refusal")
    assert run.agent.interrupted_after is None
    assert run.attempt.settled


async def test_the_max_turns_limit_ends_the_attempt_with_both_tool_calls_answered() -> None:
    run = await replay(load("max_turns").items)

    assert run.text == "Searching once. Searching twice. "
    assert [type(e) for e in run.shown if not isinstance(e, TextDelta)] == [
        ToolStarted,
        ToolFinished,
        ToolStarted,
        ToolFinished,
    ]
    assert run.attempt.outcome == "max_turns"
    assert len(run.calls) == 2


# --- stop ----------------------------------------------------------------------------------


async def test_a_stop_mid_text_shows_the_rest_of_the_sentence_then_interrupts() -> None:
    recording = load("stopped_mid_text")
    assert recording.interrupted_after is not None
    first_delta = stream_event(recording, "content_block_delta")
    script = with_cues(recording, {first_delta + 1: PressStop()}, upto=recording.interrupted_after)
    run = await replay(script, after_interrupt=recording.after_interrupt)

    assert run.text == "Starters like warmth."
    assert run.attempt.outcome == "stopped"
    assert run.attempt.settled
    assert run.agent.interrupted_after == recording.interrupted_after + 1
    (call,) = run.calls
    assert (call.error, call.stop_reason) == (None, "interrupted")
    assert call.output == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Starters like warmth. "}],
    }


async def test_a_stop_while_the_model_thinks_or_is_awaited_interrupts_at_once() -> None:
    recording = load("thinking_tool_answer")
    for before in (
        stream_event(recording, "message_start"),  # waiting for the model
        stream_event(recording, "content_block_delta") + 1,  # thinking
    ):
        run = await replay(with_cues(recording, {before: PressStop()}))

        assert run.text == ""
        assert run.attempt.outcome == "stopped"
        assert run.agent.interrupted_after == before


async def test_a_stop_while_a_tool_runs_waits_for_its_result_then_interrupts() -> None:
    recording = load("thinking_tool_answer")
    tool_call = next(i for i, item in enumerate(recording.items) if calls_a_tool(item))
    tool_result = index_of(recording, UserMessage)
    run = await replay(with_cues(recording, {tool_call + 1: PressStop()}))

    assert [type(e) for e in run.shown][-2:] == [ToolStarted, ToolFinished]
    assert run.text == "Let me look that up. "
    assert run.attempt.outcome == "stopped"
    assert run.tally.open_tools == {}
    assert run.agent.interrupted_after == tool_result + 1


async def test_a_stop_while_a_tool_hangs_interrupts_after_the_grace_and_leaves_the_call_open() -> (
    None
):
    recording = load("stopped_mid_tool")
    script = [*recording.before_interrupt, PressStop(), Silence(tools_running=1)]
    run = await replay(script, after_interrupt=recording.after_interrupt)

    assert [type(e) for e in run.shown][-1] is ToolStarted
    assert run.attempt.outcome == "stopped"
    # The CLI's note on the cancelled call is not shown: the engine closes the call itself.
    assert list(run.tally.open_tools.values()) == ["getCurrentDateTime"]
    (grace,) = run.agent.silent_waits
    assert grace is not None
    assert grace <= STOP_GRACE


async def test_an_agent_that_does_not_end_its_turn_after_an_interrupt_is_given_up() -> None:
    recording = load("stopped_mid_text")
    first_delta = stream_event(recording, "content_block_delta")
    script = with_cues(recording, {first_delta: PressStop()}, upto=first_delta)
    run = await replay([*script, Silence()], after_interrupt=[Silence()])

    assert run.attempt.outcome == "stopped"
    assert not run.attempt.settled
    drain = run.agent.silent_waits[-1]
    assert drain is not None
    assert drain <= DRAIN


# --- failures of the process --------------------------------------------------------------------


async def test_silence_while_the_model_streams_is_a_stall_the_engine_retries() -> None:
    recording = load("plain_answer")
    started = stream_event(recording, "message_start")
    run = await replay(with_cues(recording, {started + 1: Silence()}))

    assert run.attempt.outcome == "error"
    assert run.attempt.failure is not None
    assert run.attempt.failure.message == failures.STALLED.message
    assert run.attempt.failure.engine_retries
    assert run.agent.interrupted_after == started + 1
    assert run.text == ""


async def test_silence_while_our_tool_runs_is_not_a_stall() -> None:
    recording = load("thinking_tool_answer")
    result = index_of(recording, UserMessage)
    run = await replay(with_cues(recording, {result: Silence(tools_running=1)}))

    assert (run.attempt.outcome, run.attempt.failure) == ("complete", None)
    assert run.agent.interrupted_after is None


async def test_an_agent_process_that_ends_mid_answer_fails_the_attempt_as_crashed() -> None:
    recording = load("plain_answer")
    second_delta = stream_event(recording, "content_block_delta", 1)
    run = await replay([*recording.items[: second_delta + 1], Ended(RuntimeError("killed"))])

    assert run.text == "Keep it "
    assert run.attempt.outcome == "error"
    assert run.attempt.failure is not None
    assert run.attempt.failure.message == failures.CRASHED.message
    assert run.attempt.failure.engine_retries
    assert not run.attempt.settled


async def test_a_prompt_that_cannot_be_sent_fails_the_attempt_as_crashed() -> None:
    run = await replay([], fail_query=BrokenPipeError("stdin closed"))

    assert run.events == []
    assert run.attempt.outcome == "error"
    assert run.attempt.failure is not None
    assert run.attempt.failure.message == failures.CRASHED.message


# --- timings ----------------------------------------------------------------------------------


def test_a_graceful_stop_ends_before_the_session_cuts_the_turn_within_the_protocols_limit() -> None:
    assert STOP_GRACE + DRAIN < SessionTimings().stop_grace < base.STOP_PROMISE
    assert SessionTimings().stop_grace == base.STOP_DEADLINE
