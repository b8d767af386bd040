"""An answer as its transcript events build it: from the first event to the saved message.

The running turn applies each event it publishes, so its periodic and final saves hold
exactly what readers were sent. The same rule rebuilds an answer from the events alone
(`draft_of`), for instance a turn cut off on another instance, from its event log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from blogchat import protocol as wire
from blogchat.store import STREAMING, MessageRecord, ToolCallRecord
from blogchat.store.tables import utcnow


class Draft:
    """One answer being written: apply its events in seq order; `record` is the message."""

    def __init__(self, record: MessageRecord) -> None:
        self.record = record

    @property
    def started(self) -> bool:
        """Whether any event of the answer was published yet."""
        return bool(self.record.seq_start)

    def apply(self, event: wire.TranscriptEvent) -> MessageRecord:
        """Take one more event of this answer into the message; returns the message."""
        record = self.record
        seq = getattr(event, "seq", None)
        if seq:
            if not record.seq_start:
                record.seq_start = seq
            record.seq_end = seq
        match event:
            case wire.Token(text=text):
                record.text += text
            case wire.Thinking(text=text):
                record.thinking = (record.thinking or "") + text
            case wire.ToolUse(tool_use_id=tool_use_id, name=name, input=tool_input):
                record.tool_calls.append(ToolCallRecord(tool_use_id, name, dict(tool_input)))
            case wire.ToolResult(tool_use_id=tool_use_id, output=output, is_error=is_error):
                for call in reversed(record.tool_calls):
                    if call.tool_use_id == tool_use_id:
                        call.output = output
                        call.is_error = is_error
                        call.finished_at = utcnow()
                        break
            case wire.Error(message=message):
                record.error = message
            case wire.Done() as done:
                record.status = done.reason
                record.model = done.model
                record.input_tokens = done.usage.input_tokens
                record.output_tokens = done.usage.output_tokens
                record.cache_read_tokens = done.usage.cache_read_tokens or 0
                record.cache_creation_tokens = done.usage.cache_creation_tokens or 0
                record.stop_reason = done.stop_reason
                record.warning = done.warning
            case wire.UserMessage():
                raise ValueError("a user message is not part of an answer")
        return record

    def snapshot(self) -> MessageRecord:
        """A copy of the message as it stands, safe to save while the turn goes on."""
        record = self.record
        return dataclasses.replace(
            record, tool_calls=[dataclasses.replace(call) for call in record.tool_calls]
        )


def new_answer(answer_id: str, chat_id: str, reply_to: str, model: str) -> MessageRecord:
    """The message an answer starts as: streaming, with no event yet."""
    return MessageRecord(
        id=answer_id,
        chat_id=chat_id,
        role="assistant",
        seq_start=0,
        seq_end=0,
        status=STREAMING,
        model=model,
        reply_to=reply_to,
    )


def draft_of(start: MessageRecord, events: Iterable[wire.TranscriptEvent]) -> MessageRecord:
    """The answer that `events` (its own, in seq order) make of `start`; `start` is left as
    it was."""
    tool_calls = [dataclasses.replace(call) for call in start.tool_calls]
    draft = Draft(dataclasses.replace(start, tool_calls=tool_calls))
    for event in events:
        draft.apply(event)
    return draft.record
