"""The model requests behind an attempt, for telemetry: one `ModelCall` per request.

The CLI makes the requests; the facts of its stream (stream.py) show when one is sent,
retried, streamed, finished or failed. The session hands each `ModelCall` to the turn's
trace; readers never see them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from blogchat.engines.base import ModelCall
from blogchat.engines.claude.stream import (
    BlockStarted,
    CallUsage,
    CliNote,
    Delta,
    Fact,
    ProviderError,
    Requesting,
    ResponseEnded,
    ResponseStarted,
    RetryAnnounced,
    ToolCall,
    ToolResult,
    UnstreamedReply,
    WholeBlock,
)


@dataclass
class _OpenCall:
    """A model request in flight, as far as the CLI's messages show it."""

    model: str
    started_at: float
    input: object
    message_id: str | None = None
    usage: CallUsage = field(default_factory=CallUsage)
    first_token_at: float | None = None
    stop_reason: str | None = None
    content: list[dict[str, Any]] = field(default_factory=list)
    # Text of the block being streamed; its whole text comes in an AssistantMessage after.
    partial: list[str] = field(default_factory=list)

    def ended(self, error: str | None = None, stop_reason: str | None = None) -> ModelCall:
        if self.partial:
            # A block cut short (by a stop or a failure): keep what the model had said.
            self.content.append({"type": "text", "text": "".join(self.partial)})
            self.partial = []
        return ModelCall(
            model=self.model,
            started_at=self.started_at,
            ended_at=time.time(),
            input=self.input,
            output={"role": "assistant", "content": self.content} if self.content else None,
            input_tokens=self.usage.input,
            output_tokens=self.usage.output,
            cache_read_tokens=self.usage.cache_read,
            cache_creation_tokens=self.usage.cache_creation,
            first_token_at=self.first_token_at,
            stop_reason=self.stop_reason or stop_reason,
            error=error,
            message_id=self.message_id,
        )


class ModelCalls:
    """Follows the model requests of one attempt and reports each as it ends."""

    def __init__(self, model: str, prompt: str) -> None:
        self.model = model
        self._call: _OpenCall | None = None
        # The reader stopped the turn: a response cut short is interrupted, not broken.
        self.stopped = False
        # What the next request adds to the conversation: the prompt, then the tool results
        # and notes of the CLI that came since the last request (a retry sends them again).
        self._next_input: object = [{"role": "user", "content": prompt}]
        self._since_request: list[dict[str, Any]] = []

    def observe(self, fact: Fact) -> list[ModelCall]:
        """The model calls that ended with this fact (usually none)."""
        call = self._call
        match fact:
            case Requesting():
                if call is not None and call.message_id is None:
                    return []  # The same request, announced again.
                return self._open()
            case RetryAnnounced(status=status, error=error):
                # The request failed and the CLI sends it again.
                ended = self.close(f"API error {status}: {error}")
                return ended + self._open()
            case ResponseStarted(message_id=message_id, model=model, usage=usage):
                ended = self._open() if call is None or call.message_id is not None else []
                self._fill(message_id, model, usage, None)
                return ended
            case UnstreamedReply(message_id=message_id, model=model, usage=usage):
                ended = self._open() if call is None or call.message_id is not None else []
                self._fill(message_id, model, usage, fact.stop_reason)
                return ended
            case BlockStarted() if call is not None:
                call.partial = []
            case Delta(kind=kind, text=text) if call is not None:
                if call.first_token_at is None:
                    call.first_token_at = time.time()
                if kind == "text":
                    call.partial.append(text)
            case WholeBlock(kind=kind, text=text) if call is not None:
                call.content.append({"type": kind, kind: text})
                call.partial = []
            case ToolCall() if call is not None:
                call.content.append(
                    {
                        "type": "tool_use",
                        "id": fact.tool_use_id,
                        "name": fact.name,
                        "input": fact.input,
                    }
                )
                call.partial = []
            case ResponseEnded() if call is not None and call.message_id == fact.message_id:
                call.usage = fact.usage
                call.stop_reason = fact.stop_reason
                if not fact.broke_off:
                    return self.close(None)
                if self.stopped:
                    return self.close(None, "interrupted")
                return self.close("the response broke off mid-stream")
            case ProviderError(kind=kind, text=text):
                opened = self._open() if call is None else []
                return opened + self.close(f"{kind}: {text}".strip())
            case ToolResult():
                self._add_input(
                    {
                        "type": "tool_result",
                        "tool_use_id": fact.tool_use_id,
                        "content": fact.output,
                        "is_error": fact.is_error,
                    }
                )
            case CliNote(text=text):
                # The CLI's own words, such as its request to resume a broken answer.
                self._add_input({"type": "text", "text": text})
        return []

    def close(self, error: str | None, stop_reason: str | None = None) -> list[ModelCall]:
        """The call still open, if any, is over: report it."""
        call, self._call = self._call, None
        return [] if call is None else [call.ended(error, stop_reason)]

    def _open(self) -> list[ModelCall]:
        call = self._call
        # A reply that was not streamed ends without a stop event: the next request ends it.
        ended = self.close(None if call and call.stop_reason else "superseded by a new request")
        self._call = _OpenCall(self.model, time.time(), self._next_input)
        self._since_request = []
        return ended

    def _fill(
        self, message_id: str, model: str | None, usage: CallUsage, stop_reason: str | None
    ) -> None:
        call = self._call
        assert call is not None
        call.message_id = message_id
        call.model = model or call.model
        call.usage = usage
        call.stop_reason = stop_reason

    def _add_input(self, block: dict[str, Any]) -> None:
        self._since_request.append(block)
        self._next_input = [{"role": "user", "content": list(self._since_request)}]
