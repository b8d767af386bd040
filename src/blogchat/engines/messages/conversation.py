"""A chat's conversation in the Messages API's shape, rebuilt from the database history.

An answer the Messages engine wrote carries its messages exactly as the provider saw them
(`PastMessage.content`: thinking with signatures, tool calls with their results). Any
other answer (the Agent SDK engine's, the offline engine's, one saved before the column
existed) is rebuilt from what is stored: its tool calls with their results, then its text.
Thinking without a signature cannot be sent back, so such an answer's thinking is left
out. Messages of the same role in a row are merged, so the conversation alternates as the
API requires, whatever the history holds (a question that got no answer, a stopped turn
that ended on tool results).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from blogchat.engines.base import PastMessage, TurnRequest

# The prompt-cache breakpoint the engine sets (system prompt, tools, conversation prefix).
EPHEMERAL: dict[str, str] = {"type": "ephemeral"}
# The earlier conversation sent with a turn, at most, in characters of its JSON-ish text;
# older messages are left out (the chat's context cap ends a chat long before this).
MAX_HISTORY_CHARS = 400_000

Message = dict[str, Any]


def messages_for(request: TurnRequest, question: str) -> list[Message]:
    """The conversation before the turn, then the reader's new message (`question`)."""
    history: list[Message] = []
    for past in request.history:
        history.extend(_messages_of(past))
    history = _within(history, MAX_HISTORY_CHARS)
    return merged([*history, {"role": "user", "content": [{"type": "text", "text": question}]}])


def with_breakpoint(messages: Sequence[Message]) -> list[Message]:
    """A copy of `messages` whose last block marks the end of the cached prefix: the next
    request of the turn, and the chat's next turn, read the conversation from the cache."""
    copied = [dict(message) for message in messages]
    if not copied:
        return copied
    last = copied[-1]
    content = last["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    content = [dict(block) for block in content]
    if content:
        content[-1]["cache_control"] = EPHEMERAL
    last["content"] = content
    return copied


def merged(messages: Sequence[Message]) -> list[Message]:
    """Messages of the same role in a row become one; empty ones go. The first is a user's."""
    out: list[Message] = []
    for message in messages:
        blocks = _blocks(message.get("content"))
        if not blocks:
            continue
        if out and out[-1]["role"] == message["role"]:
            out[-1]["content"] = [*out[-1]["content"], *blocks]
        else:
            out.append({"role": message["role"], "content": blocks})
    while out and out[0]["role"] != "user":
        out.pop(0)
    return out


def _messages_of(past: PastMessage) -> list[Message]:
    if past.role == "user":
        text = past.text.strip()
        return [{"role": "user", "content": [{"type": "text", "text": text}]}] if text else []
    if past.content:
        return [copy.deepcopy(dict(message)) for message in past.content]
    text = past.text.strip()
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}] if text else []


def _blocks(content: object) -> list[Mapping[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content.strip() else []
    if not isinstance(content, list):
        return []
    return [block for block in content if isinstance(block, Mapping) and _sendable(block)]


def _sendable(block: Mapping[str, Any]) -> bool:
    kind = block.get("type")
    if kind == "text":
        return bool(str(block.get("text") or "").strip())
    if kind == "thinking":
        return bool(block.get("signature"))
    return True


def _within(history: list[Message], limit: int) -> list[Message]:
    """The newest messages whose size stays under `limit`, starting at a reader's message
    that is not a tool result (a tool result needs the call just before it)."""
    total = 0
    start = len(history)
    for index in range(len(history) - 1, -1, -1):
        total += len(repr(history[index]["content"]))
        if total > limit:
            break
        start = index
    while start < len(history) and not _opens_exchange(history[start]):
        start += 1
    return history[start:]


def _opens_exchange(message: Message) -> bool:
    if message["role"] != "user":
        return False
    content = message["content"]
    return not any(
        isinstance(block, Mapping) and block.get("type") == "tool_result" for block in content
    )
