"""The Messages engine's conversation, rebuilt from a chat's history (engines/messages/
conversation.py): exact provider messages where an answer kept them, a faithful stand-in
where it did not, and always a conversation the API accepts."""

from __future__ import annotations

from typing import Any

from blogchat.engines.base import PastMessage, TurnRequest
from blogchat.engines.messages.conversation import merged, messages_for, with_breakpoint
from blogchat.personas import Persona
from tests.support.anthropic_server import KNOWN_MODELS, refusal_of

PERSONA = Persona(
    id="guide",
    name="Guide",
    description="",
    system_prompt="You guide readers.",
    allowed_tools=("searchBlogContent",),
)

SIGNED: list[dict[str, Any]] = [
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Search.", "signature": "c2ln"},
            {"type": "tool_use", "id": "toolu_1", "name": "searchBlogContent", "input": {}},
        ],
    },
    {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "[]"}],
    },
    {"role": "assistant", "content": [{"type": "text", "text": "Nothing on that."}]},
]


def request(*history: PastMessage, text: str = "And now?") -> TurnRequest:
    """A turn with this history."""
    return TurnRequest(
        chat_id="c",
        text=text,
        persona=PERSONA,
        model_alias="haiku",
        model_id="claude-haiku-4-5",
        history=history,
    )


def accepted(messages: list[dict[str, Any]]) -> bool:
    """Whether the test server (as strict as the API here) would take these messages."""
    body = {"model": "claude-haiku-4-5", "max_tokens": 100, "messages": messages}
    return refusal_of(body, KNOWN_MODELS) is None


def test_an_answer_that_kept_its_messages_is_sent_back_exactly() -> None:
    messages = messages_for(
        request(PastMessage("user", "Rye?"), PastMessage("assistant", "Nothing on that.", SIGNED)),
        "And now?",
    )
    assert messages[1:4] == SIGNED
    assert messages[0] == {"role": "user", "content": [{"type": "text", "text": "Rye?"}]}
    assert messages[-1]["content"] == [{"type": "text", "text": "And now?"}]
    assert accepted(messages)


def test_an_answer_of_another_engine_is_sent_as_its_text() -> None:
    messages = messages_for(
        request(PastMessage("user", "Rye?"), PastMessage("assistant", "Rye ferments fast.")),
        "And now?",
    )
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [{"type": "text", "text": "Rye ferments fast."}]
    assert accepted(messages)


def test_unanswered_questions_and_unsigned_thinking_still_make_a_valid_conversation() -> None:
    unsigned = [{"role": "assistant", "content": [{"type": "thinking", "thinking": "Hm."}]}]
    messages = messages_for(
        request(
            PastMessage("assistant", "A greeting before any question."),
            PastMessage("user", "First?"),
            PastMessage("user", "Second?"),
            PastMessage("assistant", "", unsigned),
            PastMessage("assistant", "   "),
        ),
        "Third?",
    )
    assert [m["role"] for m in messages] == ["user"]
    texts = [block["text"] for block in messages[0]["content"]]
    assert texts == ["First?", "Second?", "Third?"]
    assert accepted(messages)


def test_a_turn_that_ended_on_tool_results_is_followed_by_the_next_question_in_one_message() -> (
    None
):
    stopped = SIGNED[:2]
    messages = messages_for(
        request(PastMessage("user", "Rye?"), PastMessage("assistant", "", stopped)), "Go on."
    )
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert [b["type"] for b in messages[-1]["content"]] == ["tool_result", "text"]
    assert accepted(messages)


def test_the_breakpoint_marks_the_last_block_of_a_copy_only() -> None:
    messages = merged([{"role": "user", "content": "Hello"}])
    marked = with_breakpoint(messages)
    assert marked[-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in messages[-1]["content"][-1]
