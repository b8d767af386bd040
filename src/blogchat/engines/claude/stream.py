"""The SDK's messages, read once, as the few facts about a turn that the engine acts on.

The CLI reports a turn as a mix of raw API stream events (`StreamEvent`), whole content
blocks (`AssistantMessage`), tool results and its own notes (`UserMessage`), system
messages (a request sent, a retry, a refusal) and a `ResultMessage`; the process adds
`Ended` when its stream ends. `StreamReader` turns each into typed facts. `Attempt` (what
the reader sees, stop, failures) and `ModelCalls` (telemetry) both read the facts, so the
token counts and the rule for a reply that was not streamed live here only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Any, Literal

from claude_agent_sdk import (
    AssistantMessage,
    RateLimitEvent,
    ResultMessage,
    StreamEvent,
    SystemMessage,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from blogchat.engines.claude.process import Ended, Inbound, Wake

log = logging.getLogger(__name__)

# The in-process MCP server with the blog tools, and the prefix the CLI gives their names.
SERVER = "blog"
TOOL_PREFIX = f"mcp__{SERVER}__"

BlockKind = Literal["text", "thinking", "tool_use", "other"]
DeltaKind = Literal["text", "thinking", "other"]


def plain_tool_name(name: str) -> str:
    """`mcp__blog__searchBlogContent` → `searchBlogContent`."""
    return name.removeprefix(TOOL_PREFIX)


@dataclass(frozen=True)
class CallUsage:
    """Tokens of one model call, as the provider reports them. `input` includes the cached
    tokens (read from the cache or written to it), which are also counted apart."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_creation: int = 0

    @classmethod
    def of(cls, usage: dict[str, Any] | None, output: int | None = None) -> CallUsage:
        """From the API's `usage` object (`message_start`, an AssistantMessage)."""
        usage = usage or {}
        read = int(usage.get("cache_read_input_tokens") or 0)
        creation = int(usage.get("cache_creation_input_tokens") or 0)
        return cls(
            input=int(usage.get("input_tokens") or 0) + read + creation,
            output=int(usage.get("output_tokens") or 0) if output is None else output,
            cache_read=read,
            cache_creation=creation,
        )


# --- the facts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Requesting:
    """The CLI sends a model request (its "requesting" status)."""


@dataclass(frozen=True)
class ResponseStarted:
    """A streamed response began (`message_start`): input tokens are known, output not yet."""

    message_id: str
    model: str | None
    usage: CallUsage


@dataclass(frozen=True)
class BlockStarted:
    """A content block of the streamed response began."""

    kind: BlockKind


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed block: answer text, thinking, or something else (a tool's
    input, a signature) whose text nobody reads."""

    kind: DeltaKind
    text: str


@dataclass(frozen=True)
class BlockEnded:
    """The streamed block ended."""

    kind: BlockKind


@dataclass(frozen=True)
class ResponseEnded:
    """A streamed response ended. Without a stop reason it broke off: its stream was cut,
    or the CLI started the request over or fell back to one that does not stream."""

    message_id: str
    stop_reason: str | None
    usage: CallUsage

    @property
    def broke_off(self) -> bool:
        """Whether the response ended without the provider saying why."""
        return self.stop_reason is None


@dataclass(frozen=True)
class UnstreamedReply:
    """A reply that was not streamed (the CLI's fallback request); its blocks follow as
    `WholeBlock` and `ToolCall` facts."""

    message_id: str
    model: str
    usage: CallUsage
    stop_reason: str | None


@dataclass(frozen=True)
class WholeBlock:
    """A text or thinking block, whole. Its text reached the reader as deltas already unless
    the reply was not `streamed`."""

    kind: Literal["text", "thinking"]
    text: str
    streamed: bool


@dataclass(frozen=True)
class ToolCall:
    """The model called a tool (`name` is the plain tool name), with its whole input."""

    tool_use_id: str
    name: str
    input: dict[str, object]


@dataclass(frozen=True)
class ToolResult:
    """A tool call returned (or the CLI cancelled it); this goes to the model next."""

    tool_use_id: str
    output: str
    is_error: bool


@dataclass(frozen=True)
class CliNote:
    """Text the CLI adds to the conversation itself: a request to resume a broken answer,
    "[Request interrupted by user]"."""

    text: str


@dataclass(frozen=True)
class RetryAnnounced:
    """A model request failed and the CLI will send it again after `delay` seconds."""

    attempt: int
    max_retries: int
    delay: float
    status: int | None
    error: str | None


@dataclass(frozen=True)
class RefusalAnnounced:
    """The CLI's word that the model refused (it comes before the response's stop reason)."""


@dataclass(frozen=True)
class ProviderError:
    """The CLI's report of a failed model request (an "API Error: ..." message). Its text is
    not an answer."""

    kind: str
    text: str


@dataclass(frozen=True)
class Finished:
    """The CLI's result for the prompt: the turn is over on its side."""

    result: ResultMessage


@dataclass(frozen=True)
class ProcessEnded:
    """The CLI's message stream ended: the process exited or was closed."""

    error: BaseException | None


Fact = (
    Requesting
    | ResponseStarted
    | BlockStarted
    | Delta
    | BlockEnded
    | ResponseEnded
    | UnstreamedReply
    | WholeBlock
    | ToolCall
    | ToolResult
    | CliNote
    | RetryAnnounced
    | RefusalAnnounced
    | ProviderError
    | Finished
    | ProcessEnded
)


def tool_output(block: ToolResultBlock) -> str:
    """A tool result's content as the reader sees it: its text, or JSON for anything else."""
    content = block.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = [item.get("text", "") for item in content if item.get("type") == "text"]
    if len(texts) == len(content):
        return "\n".join(str(text) for text in texts)
    return json.dumps(content, ensure_ascii=False)


@dataclass
class _OpenResponse:
    message_id: str
    usage: CallUsage
    stop_reason: str | None = None
    block: BlockKind | None = None


class StreamReader:
    """Reads one attempt's inbox items into facts, in order."""

    def __init__(self, chat_id: str) -> None:
        self.chat_id = chat_id
        self._open: _OpenResponse | None = None
        # Responses that were streamed: their AssistantMessages repeat what streamed.
        self._streamed: set[str] = set()
        # Replies that were not streamed and have been announced (one message per block).
        self._unstreamed: set[str] = set()

    @property
    def open_block(self) -> BlockKind | None:
        """The kind of the block being streamed now, if any."""
        return None if self._open is None else self._open.block

    def read(self, item: Inbound) -> list[Fact]:
        """The facts in one inbox item (often none)."""
        match item:
            case Wake():
                return []
            case Ended(error=error):
                return [ProcessEnded(error)]
            case StreamEvent(parent_tool_use_id=None):
                return self._stream_event(item.event)
            case AssistantMessage(parent_tool_use_id=None):
                return self._assistant(item)
            case UserMessage(parent_tool_use_id=None):
                return self._user(item)
            case ResultMessage():
                return [Finished(item)]
            case SystemMessage():
                return self._system(item)
            case RateLimitEvent():
                log.info("chat %s: rate limit status %s", self.chat_id, item.rate_limit_info)
                return []
            case StreamEvent() | AssistantMessage() | UserMessage():
                return []  # A subagent's (there are none: no Agent tool is offered).
        # ConversationResetMessage (no slash commands reach the CLI, so none is expected).
        log.debug("chat %s: ignoring %r", self.chat_id, item)
        return []

    def _stream_event(self, event: dict[str, Any]) -> list[Fact]:
        kind = event.get("type")
        response = self._open
        if kind == "message_start":
            # A response still open was cut off: the CLI asks again from the start.
            facts = self._broke_off()
            body = event.get("message") or {}
            message_id = str(body.get("id") or "")
            usage = CallUsage.of(body.get("usage"), output=0)
            self._open = _OpenResponse(message_id, usage)
            self._streamed.add(message_id)
            model = str(body.get("model") or "") or None
            return [*facts, ResponseStarted(message_id, model, usage)]
        if response is None:
            if kind != "ping":
                log.debug("chat %s: stream event %s outside a response", self.chat_id, kind)
            return []
        if kind == "content_block_start":
            response.block = _block_kind((event.get("content_block") or {}).get("type"))
            return [BlockStarted(response.block)]
        if kind == "content_block_delta":
            return [_delta(event.get("delta") or {})]
        if kind == "content_block_stop":
            block, response.block = response.block, None
            return [BlockEnded(block or "other")]
        if kind == "message_delta":
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            response.stop_reason = str(stop_reason) if stop_reason else response.stop_reason
            output = (event.get("usage") or {}).get("output_tokens")
            if output is not None:
                response.usage = replace(response.usage, output=int(output))
            return []
        if kind == "message_stop":
            self._open = None
            return [ResponseEnded(response.message_id, response.stop_reason, response.usage)]
        if kind != "ping":
            log.debug("chat %s: ignoring stream event %s", self.chat_id, kind)
        return []

    def _broke_off(self) -> list[Fact]:
        response, self._open = self._open, None
        if response is None:
            return []
        return [ResponseEnded(response.message_id, None, response.usage)]

    def _assistant(self, message: AssistantMessage) -> list[Fact]:
        if message.error is not None:
            text = " ".join(b.text for b in message.content if isinstance(b, TextBlock))
            return [ProviderError(message.error, text)]
        facts: list[Fact] = []
        message_id = message.message_id
        streamed = message_id is None or message_id in self._streamed
        if not streamed and message_id not in self._unstreamed:
            assert message_id is not None
            self._unstreamed.add(message_id)
            # The streamed request it replaces, if one is open, is over.
            facts += self._broke_off()
            facts.append(
                UnstreamedReply(
                    message_id, message.model, CallUsage.of(message.usage), message.stop_reason
                )
            )
        for block in message.content:
            if isinstance(block, TextBlock):
                facts.append(WholeBlock("text", block.text, streamed))
            elif isinstance(block, ThinkingBlock):
                facts.append(WholeBlock("thinking", block.thinking, streamed))
            elif isinstance(block, ToolUseBlock):
                facts.append(ToolCall(block.id, plain_tool_name(block.name), dict(block.input)))
        return facts

    def _user(self, message: UserMessage) -> list[Fact]:
        if isinstance(message.content, str):
            return []
        facts: list[Fact] = []
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                facts.append(
                    ToolResult(block.tool_use_id, tool_output(block), bool(block.is_error))
                )
            elif isinstance(block, TextBlock):
                facts.append(CliNote(block.text))
        return facts

    def _system(self, message: SystemMessage) -> list[Fact]:
        data = message.data
        subtype = message.subtype
        if subtype == "status":
            return [Requesting()] if data.get("status") == "requesting" else []
        if subtype == "api_retry":
            attempt = int(data.get("attempt") or 1)
            status = data.get("error_status")
            return [
                RetryAnnounced(
                    attempt=attempt,
                    max_retries=int(data.get("max_retries") or attempt),
                    delay=int(data.get("retry_delay_ms") or 0) / 1000,
                    status=status if isinstance(status, int) else None,
                    error=str(data.get("error") or "") or None,
                )
            ]
        if subtype == "model_refusal_no_fallback":
            return [RefusalAnnounced()]
        if subtype == "mirror_error":
            log.warning("chat %s: transcript not saved: %s", self.chat_id, data.get("error"))
        elif subtype not in ("init", "thinking_tokens", "ui_invalidate"):
            log.debug("chat %s: system message %s", self.chat_id, subtype)
        return []


_BLOCK_KINDS: dict[object, BlockKind] = {
    "text": "text",
    "thinking": "thinking",
    "tool_use": "tool_use",
}


def _block_kind(kind: object) -> BlockKind:
    return _BLOCK_KINDS.get(kind, "other")


def _delta(delta: dict[str, Any]) -> Delta:
    kind = delta.get("type")
    if kind == "text_delta":
        return Delta("text", str(delta.get("text") or ""))
    if kind == "thinking_delta":
        return Delta("thinking", str(delta.get("thinking") or ""))
    # input_json_delta (the tool's input arrives whole in the AssistantMessage),
    # signature_delta and citations_delta carry nothing for the reader.
    return Delta("other", "")
