"""How chats and messages look on the wire: the protocol's views of the store's records."""

from __future__ import annotations

from collections.abc import Callable

from blogchat import protocol as wire
from blogchat.store import STREAMING, ChatRecord, MessageRecord

Renderer = Callable[[str], str]


def usage_of(
    input_tokens: int | None,
    output_tokens: int | None,
    cache_read_tokens: int | None = None,
    cache_creation_tokens: int | None = None,
) -> wire.Usage:
    """Token counts as the protocol shows them (cache counts only when there are some)."""
    cached = bool(cache_read_tokens or cache_creation_tokens)
    return wire.Usage(
        input_tokens=input_tokens or 0,
        output_tokens=output_tokens or 0,
        cache_read_tokens=(cache_read_tokens or 0) if cached else None,
        cache_creation_tokens=(cache_creation_tokens or 0) if cached else None,
    )


def message_info(record: MessageRecord, render: Renderer) -> wire.MessageInfo:
    """A stored message as the protocol shows it in histories."""
    finished = record.status != STREAMING
    usage = None
    if record.input_tokens is not None or record.output_tokens is not None:
        usage = usage_of(
            record.input_tokens,
            record.output_tokens,
            record.cache_read_tokens,
            record.cache_creation_tokens,
        )
    return wire.MessageInfo(
        id=record.id,
        role="user" if record.role == "user" else "assistant",
        text=record.text,
        thinking=record.thinking or None,
        tool_calls=[
            wire.ToolCallInfo(
                tool_use_id=call.tool_use_id,
                name=call.name,
                input=call.input,
                output=call.output,
                is_error=call.is_error,
            )
            for call in record.tool_calls
        ],
        status="incomplete" if record.status == STREAMING else record.status,
        model=record.model,
        usage=usage,
        created_at=record.created_at,
        client_message_id=record.client_message_id,
        html=render(record.text) if record.role == "assistant" and finished else None,
        warning=record.warning,
        error=record.error,
        seq_start=record.seq_start,
        seq_end=record.seq_end,
        stop_reason=record.stop_reason,
    )


def chat_info(chat: ChatRecord) -> wire.ChatInfo:
    """A chat's row as the protocol shows it."""
    return wire.ChatInfo(
        id=chat.id,
        title=chat.title,
        model=chat.model,
        persona=chat.persona,
        created_at=chat.created_at,
        updated_at=chat.updated_at,
        post=chat.post_slug,
    )


def user_message_event(record: MessageRecord) -> wire.UserMessage:
    """The `user_message` event of a saved user message (also re-sent on a repeat)."""
    return wire.UserMessage(
        chat_id=record.chat_id,
        seq=record.seq_start,
        message_id=record.id,
        client_message_id=record.client_message_id or "",
        text=record.text,
        created_at=record.created_at,
        replaces=list(record.replaces) or None,
    )
