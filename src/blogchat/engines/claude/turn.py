"""One attempt at a turn: a prompt sent to a chat's agent process, and the SDK's messages
turned into engine events, with graceful stop, a stall watchdog and failure detection.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any

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

from blogchat.engines.base import (
    EngineEvent,
    ModelCall,
    Retrying,
    TextDelta,
    ThinkingDelta,
    ToolFinished,
    ToolStarted,
)
from blogchat.engines.claude import failures
from blogchat.engines.claude.failures import ProviderFailure
from blogchat.engines.claude.process import AgentProcess, Ended, Inbound, Wake

log = logging.getLogger(__name__)

# After a stop: how long the agent may take to finish its sentence or its tool call. The
# session cuts the turn 1.6 s after the stop; STOP_GRACE + DRAIN stays well under that.
STOP_GRACE = 0.7
# After an interrupt: how long the CLI may take to end the turn before the process is
# given up on (it usually takes 20-50 ms).
DRAIN = 0.5

# The in-process MCP server with the blog tools, and the prefix the CLI gives their names.
SERVER = "blog"
TOOL_PREFIX = f"mcp__{SERVER}__"

# Stop reasons that end the turn, whatever the CLI would do next (see Attempt._cut_short).
CUT_SHORT = frozenset({"refusal", "max_tokens"})

# Where a sentence (or a line) ends inside streamed text: a graceful stop cuts there.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]*_]*(?=\s|$)|\n")


def plain_tool_name(name: str) -> str:
    """`mcp__blog__searchBlogContent` → `searchBlogContent`."""
    return name.removeprefix(TOOL_PREFIX)


def sentence_end(text: str) -> int | None:
    """The index just after the first sentence end in `text`, if there is one."""
    match = _SENTENCE_END.search(text)
    return None if match is None else match.end()


class Outcome(enum.Enum):
    """How an attempt ended."""

    COMPLETE = "complete"
    MAX_TURNS = "max_turns"
    STOPPED = "stopped"
    FAILED = "failed"


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


@dataclass
class Tally:
    """What a whole turn produced, across its attempts."""

    # Whether anything reached the reader (then a failure can no longer be retried unseen).
    forwarded: bool = False
    # Tokens per model call, by message id.
    usage: dict[str, CallUsage] = field(default_factory=dict)
    # Tool calls announced to the reader that have not returned, by tool_use_id.
    open_tools: dict[str, str] = field(default_factory=dict)
    result: ResultMessage | None = None
    attempts: int = 0
    # The model that answered (from the last `message_start`) and why it stopped.
    model: str | None = None
    stop_reason: str | None = None

    @property
    def input_tokens(self) -> int:
        """Input tokens over the turn's model calls (cached ones included)."""
        return sum(call.input for call in self.usage.values())

    @property
    def output_tokens(self) -> int:
        """Output tokens over the turn's model calls."""
        return sum(call.output for call in self.usage.values())

    @property
    def cache_read_tokens(self) -> int:
        """Input tokens read from the prompt cache."""
        return sum(call.cache_read for call in self.usage.values())

    @property
    def cache_creation_tokens(self) -> int:
        """Input tokens written to the prompt cache."""
        return sum(call.cache_creation for call in self.usage.values())


def _tool_output(block: ToolResultBlock) -> str:
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
    """Follows the model requests behind an attempt's messages and reports each as it ends.

    The CLI makes the requests; its messages show when one is sent (a "requesting" status),
    retried (an "api_retry"), streamed, finished (message_stop) or failed ("API Error").
    """

    def __init__(self, model: str, prompt: str) -> None:
        self.model = model
        self._call: _OpenCall | None = None
        self._reported: set[str] = set()
        # The reader stopped the turn: a response cut short is interrupted, not broken.
        self.stopped = False
        # What the next request adds to the conversation: the prompt, then tool results.
        self._next_input: object = [{"role": "user", "content": prompt}]

    def observe(self, item: Inbound) -> list[ModelCall]:
        """The model calls that ended with this message (usually none)."""
        if isinstance(item, StreamEvent):
            if item.parent_tool_use_id is None:
                return self._on_stream_event(item.event)
        elif isinstance(item, AssistantMessage):
            if item.parent_tool_use_id is None:
                return self._on_assistant(item)
        elif isinstance(item, UserMessage):
            if item.parent_tool_use_id is None and not isinstance(item.content, str):
                self._on_user(item)
        elif isinstance(item, SystemMessage):
            return self._on_system(item)
        return []

    def close(self, error: str | None, stop_reason: str | None = None) -> list[ModelCall]:
        """The attempt is over: report the call still open, if any."""
        call, self._call = self._call, None
        if call is None:
            return []
        if call.message_id:
            self._reported.add(call.message_id)
        return [call.ended(error, stop_reason)]

    def _open(self) -> tuple[_OpenCall, list[ModelCall]]:
        ended = self.close("superseded by a new request") if self._call else []
        self._call = _OpenCall(self.model, time.time(), self._next_input)
        return self._call, ended

    def _on_system(self, message: SystemMessage) -> list[ModelCall]:
        data = message.data
        if message.subtype == "status" and data.get("status") == "requesting":
            if self._call is not None and self._call.message_id is None:
                return []  # The same request, announced again.
            _, ended = self._open()
            return ended
        if message.subtype == "api_retry":
            # The request failed and the CLI sends it again.
            status, error = data.get("error_status"), data.get("error")
            ended = self.close(f"API error {status}: {error}")
            self._open()
            return ended
        return []

    def _on_stream_event(self, event: dict[str, Any]) -> list[ModelCall]:
        kind = event.get("type")
        if kind == "content_block_delta":
            call = self._call
            if call is not None:
                if call.first_token_at is None:
                    call.first_token_at = time.time()
                delta = event.get("delta") or {}
                if delta.get("type") == "text_delta":
                    call.partial.append(str(delta.get("text") or ""))
            return []
        if kind == "content_block_start" and self._call is not None:
            self._call.partial = []
            return []
        if kind == "message_start":
            ended: list[ModelCall] = []
            call = self._call
            if call is None or call.message_id is not None:
                if call is not None:
                    ended = self.close("the response broke off and was requested again")
                call, more = self._open()
                ended += more
            body = event.get("message") or {}
            call.message_id = str(body.get("id") or "") or None
            call.model = str(body.get("model") or call.model)
            call.usage = CallUsage.of(body.get("usage"), output=0)
            return ended
        if kind == "message_delta" and self._call is not None:
            stop = (event.get("delta") or {}).get("stop_reason")
            self._call.stop_reason = stop or self._call.stop_reason
            output = (event.get("usage") or {}).get("output_tokens")
            if output is not None:
                self._call.usage = replace(self._call.usage, output=int(output))
            return []
        if kind == "message_stop" and self._call is not None:
            if self._call.stop_reason is not None:
                return self.close(None)
            if self.stopped:
                return self.close(None, "interrupted")
            return self.close("the response broke off mid-stream")
        return []

    def _on_assistant(self, message: AssistantMessage) -> list[ModelCall]:
        call = self._call
        if message.error is not None:
            text = " ".join(b.text for b in message.content if isinstance(b, TextBlock))
            if call is None:
                call, _ = self._open()
            return self.close(f"{message.error}: {text}".strip())
        if message.message_id in self._reported:
            return []  # A late copy of a response already reported.
        if call is None or (call.message_id and call.message_id != message.message_id):
            # A reply that was not streamed (the CLI's fallback after a broken stream).
            ended = self.close(None) if call is not None else []
            call, _ = self._open()
        else:
            ended = []
        if call.message_id is None:
            call.message_id = message.message_id
            call.usage = CallUsage.of(message.usage)
            call.stop_reason = message.stop_reason
        call.partial = []
        for block in message.content:
            if isinstance(block, TextBlock):
                call.content.append({"type": "text", "text": block.text})
            elif isinstance(block, ThinkingBlock):
                call.content.append({"type": "thinking", "thinking": block.thinking})
            elif isinstance(block, ToolUseBlock):
                name = plain_tool_name(block.name)
                call.content.append(
                    {"type": "tool_use", "id": block.id, "name": name, "input": block.input}
                )
        return ended

    def _on_user(self, message: UserMessage) -> None:
        blocks: list[dict[str, Any]] = []
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                blocks.append(
                    {
                        "type": "tool_result",
                        "tool_use_id": block.tool_use_id,
                        "content": _tool_output(block),
                        "is_error": bool(block.is_error),
                    }
                )
            elif isinstance(block, TextBlock):
                # The CLI's own note, such as its request to resume a broken answer.
                blocks.append({"type": "text", "text": block.text})
        if blocks:
            self._next_input = [{"role": "user", "content": blocks}]


class Attempt:
    """Sends one prompt and streams what comes back, until the CLI's result for it."""

    def __init__(
        self,
        process: AgentProcess,
        prompt: str,
        stop: asyncio.Event,
        tally: Tally,
        *,
        stall_seconds: float,
        retry_max_wait: float,
    ) -> None:
        self.process = process
        self.prompt = prompt
        self.stop = stop
        self.tally = tally
        self.stall_seconds = stall_seconds
        self.retry_max_wait = retry_max_wait
        self.outcome = Outcome.FAILED
        self.failure: ProviderFailure | None = None
        # The model ended its answer for a reason that ends the turn too (see CUT_SHORT).
        self.cut_reason: str | None = None
        # Whether the process read this attempt's result and can take the next prompt.
        self.settled = False
        self._error_kind: str | None = None
        self._stop_at: float | None = None
        self._interrupted_at: float | None = None
        self._interrupted_for_stop = False
        # Forward nothing more (the sentence after a stop is done, or the turn failed).
        self._quiet = False
        self._open_message: str | None = None
        self._forwarded_in_message = False
        # Whether the open message got its message_delta (its stop reason).
        self._message_ended_well = False
        self._streamed: set[str] = set()
        self._block: str | None = None
        self._done = False
        self.calls = ModelCalls(process.spec.model_id, prompt)

    @property
    def chat_id(self) -> str:
        """The chat this attempt belongs to."""
        return self.process.spec.chat_id

    async def events(self) -> AsyncGenerator[EngineEvent, None]:
        """The attempt's engine events; `outcome`, `failure` and `settled` are set after."""
        self.tally.attempts += 1
        try:
            await self.process.query(self.prompt)
        except Exception as exc:
            log.warning("chat %s: could not send the prompt: %r", self.chat_id, exc)
            self.failure = failures.CRASHED.because(repr(exc))
            return
        while not self._done:
            if self.stop.is_set() and self._stop_at is None:
                self._on_stop()
            try:
                item = await self.process.receive(self._timeout())
            except TimeoutError:
                self._on_timeout()
                continue
            for call in self.calls.observe(item):
                yield call
            for event in self._handle(item):
                if not isinstance(event, Retrying):
                    self.tally.forwarded = True
                if isinstance(event, (TextDelta, ThinkingDelta)):
                    self._forwarded_in_message = True
                yield event
        if self.outcome is Outcome.FAILED:
            failure = self.failure or failures.CRASHED
            ended = self.calls.close(failure.detail or failure.message)
        else:
            ended = self.calls.close(None, "interrupted")
        for call in ended:
            yield call

    # --- timing -------------------------------------------------------------------------

    def _timeout(self) -> float:
        now = time.monotonic()
        if self._interrupted_at is not None:
            return max(0.0, self._interrupted_at + DRAIN - now)
        if self._stop_at is not None:
            return max(0.0, self._stop_at + STOP_GRACE - now)
        return self.stall_seconds

    def _on_timeout(self) -> None:
        if self._interrupted_at is not None:
            log.warning(
                "chat %s: the agent did not end its turn after an interrupt; giving it up",
                self.chat_id,
            )
            self._finish_unsettled()
        elif self._stop_at is not None:
            self._interrupt(for_stop=True)
        elif self.process.tools_running:
            pass  # Our own tool is working; the CLI has nothing to say meanwhile.
        else:
            log.warning(
                "chat %s: nothing from the model for %.0f s", self.chat_id, self.stall_seconds
            )
            self._fail(failures.STALLED.because(f"no event for {self.stall_seconds} s"))

    def _on_stop(self) -> None:
        self._stop_at = time.monotonic()
        if self._interrupted_at is not None:
            return
        if self.tally.open_tools:
            return  # Let the running tool call finish (within STOP_GRACE).
        if self._block == "text":
            return  # Let the sentence finish (within STOP_GRACE).
        self._interrupt(for_stop=True)

    def _interrupt(self, *, for_stop: bool) -> None:
        self._quiet = True
        self.calls.stopped = self.calls.stopped or for_stop
        if self._interrupted_at is None:
            self._interrupted_at = time.monotonic()
            self._interrupted_for_stop = for_stop
            self.process.interrupt()

    def _fail(self, failure: ProviderFailure) -> None:
        if self.failure is None:
            self.failure = failure
        self._interrupt(for_stop=False)

    def _finish_unsettled(self) -> None:
        self.settled = False
        self._conclude(None)

    # --- messages -----------------------------------------------------------------------

    def _handle(self, item: Inbound) -> list[EngineEvent]:
        if isinstance(item, Wake):
            return []
        if isinstance(item, Ended):
            if self._stop_at is None and self.failure is None:
                detail = repr(item.error) if item.error else "the CLI exited"
                log.warning("chat %s: the agent process ended mid-turn: %s", self.chat_id, detail)
                self.failure = failures.CRASHED.because(detail)
            self._finish_unsettled()
            return []
        if isinstance(item, StreamEvent):
            return self._on_stream_event(item)
        if isinstance(item, AssistantMessage):
            return self._on_assistant(item)
        if isinstance(item, UserMessage):
            return self._on_user(item)
        if isinstance(item, ResultMessage):
            self.tally.result = item
            self.settled = self.process.owed_results == 0 and self.process.alive
            self._conclude(item)
            return []
        if isinstance(item, SystemMessage):
            return self._on_system(item)
        if isinstance(item, RateLimitEvent):
            log.info("chat %s: rate limit status %s", self.chat_id, item.rate_limit_info)
            return []
        # ConversationResetMessage (no slash commands reach the CLI, so none is expected).
        log.debug("chat %s: ignoring %r", self.chat_id, item)
        return []

    def _on_stream_event(self, message: StreamEvent) -> list[EngineEvent]:
        if message.parent_tool_use_id is not None:
            return []  # A subagent's stream (there are none: no Agent tool is offered).
        event = message.event
        kind = event.get("type")
        if kind == "message_start":
            if self._open_message is not None and self._forwarded_in_message:
                # The CLI retries a response that broke off, and streams it again from the
                # start. The reader already has the first part: this turn cannot go on.
                log.warning("chat %s: the model's answer broke off mid-stream", self.chat_id)
                self._fail(failures.CUT_OFF.because("new message_start after streamed deltas"))
                return []
            body = event.get("message") or {}
            self._open_message = str(body.get("id") or "")
            self._forwarded_in_message = False
            self._message_ended_well = False
            self._streamed.add(self._open_message)
            self.tally.usage[self._open_message] = CallUsage.of(body.get("usage"), output=0)
            if not self._quiet:
                self.tally.model = str(body.get("model") or "") or self.tally.model
            return []
        if kind == "content_block_start":
            self._block = (event.get("content_block") or {}).get("type")
            return []
        if kind == "content_block_delta":
            return self._on_delta(event.get("delta") or {})
        if kind == "content_block_stop":
            block, self._block = self._block, None
            if block == "text" and self._stop_at is not None:
                self._interrupt(for_stop=True)
            return []
        if kind == "message_delta":
            self._message_ended_well = True
            output = (event.get("usage") or {}).get("output_tokens")
            if self._open_message is not None and output is not None:
                usage = self.tally.usage.get(self._open_message, CallUsage())
                self.tally.usage[self._open_message] = replace(usage, output=int(output))
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            if stop_reason and not self._quiet:
                self.tally.stop_reason = str(stop_reason)
                if stop_reason in CUT_SHORT:
                    self._cut_short(str(stop_reason))
            return []
        if kind == "message_stop":
            if not self._message_ended_well and self._forwarded_in_message:
                # The stream broke (an error event): the CLI closes the message and asks
                # the model to resume where it stopped. The reader already has the start.
                log.warning("chat %s: the model's answer broke off mid-stream", self.chat_id)
                self._fail(failures.CUT_OFF.because("message ended without a stop reason"))
            self._open_message = None
            return []
        if kind != "ping":
            log.debug("chat %s: ignoring stream event %s", self.chat_id, kind)
        return []

    def _on_delta(self, delta: dict[str, Any]) -> list[EngineEvent]:
        kind = delta.get("type")
        if self._quiet:
            return []
        if kind == "text_delta":
            text = str(delta.get("text") or "")
            if self._stop_at is not None:
                cut = sentence_end(text)
                if cut is not None:
                    # The sentence being written is finished: end the turn here.
                    self._interrupt(for_stop=True)
                    return [TextDelta(text[:cut])] if text[:cut] else []
            return [TextDelta(text)] if text else []
        if kind == "thinking_delta":
            if self._stop_at is not None:
                self._interrupt(for_stop=True)
                return []
            text = str(delta.get("thinking") or "")
            return [ThinkingDelta(text)] if text else []
        # input_json_delta (the tool's input arrives whole in the AssistantMessage),
        # signature_delta and citations_delta carry nothing for the reader.
        return []

    def _on_assistant(self, message: AssistantMessage) -> list[EngineEvent]:
        if message.parent_tool_use_id is not None:
            return []
        if message.error is not None:
            # The CLI reports a provider failure as an assistant message ("API Error: ...").
            # That text is not an answer: keep it out of the transcript.
            if self.cut_reason is not None:
                return []  # The CLI's word on an answer that already ended the turn.
            self._error_kind = message.error
            text = " ".join(b.text for b in message.content if isinstance(b, TextBlock))
            self.failure = self.failure or failures.classify(None, message.error, text)
            self._quiet = True
            return []
        streamed = message.message_id in self._streamed
        if not streamed and message.message_id:
            # A reply that was not streamed (the CLI's fallback after a broken stream).
            if self._open_message is not None and self._forwarded_in_message:
                self._fail(failures.CUT_OFF.because("unstreamed reply after streamed deltas"))
                return []
            self.tally.usage[message.message_id] = CallUsage.of(message.usage)
        events: list[EngineEvent] = []
        for block in message.content:
            if isinstance(block, ToolUseBlock):
                if self._quiet:
                    continue
                self.tally.open_tools[block.id] = block.name
                events.append(ToolStarted(block.id, plain_tool_name(block.name), dict(block.input)))
            elif not streamed and not self._quiet:
                if isinstance(block, TextBlock) and block.text:
                    events.append(TextDelta(block.text))
                elif isinstance(block, ThinkingBlock) and block.thinking:
                    events.append(ThinkingDelta(block.thinking))
        return events

    def _on_user(self, message: UserMessage) -> list[EngineEvent]:
        if message.parent_tool_use_id is not None or isinstance(message.content, str):
            return []
        events: list[EngineEvent] = []
        for block in message.content:
            # Other blocks are the CLI's own notes: "[Request interrupted by user]", or its
            # request to resume an answer that broke off.
            if isinstance(block, ToolResultBlock) and block.tool_use_id in self.tally.open_tools:
                if self._interrupted_at is not None:
                    continue  # The CLI's note about the cancelled call; we say it ourselves.
                del self.tally.open_tools[block.tool_use_id]
                events.append(
                    ToolFinished(block.tool_use_id, _tool_output(block), bool(block.is_error))
                )
        if self._stop_at is not None and not self.tally.open_tools:
            self._interrupt(for_stop=True)
        return events

    def _on_system(self, message: SystemMessage) -> list[EngineEvent]:
        data = message.data
        if message.subtype == "api_retry":
            return self._on_retry(data)
        if message.subtype == "model_refusal_no_fallback" and not self._quiet:
            # The CLI's word that the model refused (before its message_delta says so).
            self.tally.stop_reason = "refusal"
            self._cut_short("refusal")
            return []
        if message.subtype == "mirror_error":
            log.warning("chat %s: transcript not saved: %s", self.chat_id, data.get("error"))
        elif message.subtype not in ("init", "status", "thinking_tokens"):
            log.debug("chat %s: system message %s", self.chat_id, message.subtype)
        return []

    def _on_retry(self, data: dict[str, Any]) -> list[EngineEvent]:
        """The CLI will send a failed model request again after a delay (the provider's
        retry-after when it gave one): tell the readers, unless the wait is too long."""
        attempt = int(data.get("attempt") or 1)
        retries = int(data.get("max_retries") or attempt)
        delay = int(data.get("retry_delay_ms") or 0) / 1000
        status = data.get("error_status")
        log.info(
            "chat %s: the CLI retries a model call in %.1f s (retry %d of %d, status %s)",
            self.chat_id,
            delay,
            attempt,
            retries,
            status,
        )
        if self._quiet:
            return []
        if self.tally.forwarded:
            # Part of the answer reached the reader: a new request would start it over.
            self._fail(failures.CUT_OFF.because(f"the CLI would retry after status {status}"))
            return []
        failure = failures.classify(
            status if isinstance(status, int) else None,
            str(data.get("error") or "") or None,
            f"the CLI would retry in {delay:.1f} s",
        )
        if not failure.retryable:
            # A refused key, a missing model, a bad request: trying again cannot help.
            self._fail(failure)
            return []
        if delay > self.retry_max_wait:
            self._fail(failure.because(f"retry in {delay:.0f} s is beyond the limit"))
            return []
        return [Retrying(attempt=attempt + 1, max_attempts=retries + 1, delay=delay)]

    def _cut_short(self, reason: str) -> None:
        """The model ended its answer on a refusal or at the output limit. The turn ends
        here, with what the model said, and nothing after it reaches the reader.

        After a refusal the CLI ends the turn itself (CLAUDE_CODE_DISABLE_REFUSAL_RETRY);
        at the output limit it would ask the model to go on, so it is interrupted."""
        log.info("chat %s: the model's answer ended with stop reason %s", self.chat_id, reason)
        self.cut_reason = reason
        if reason == "refusal":
            self._quiet = True
        else:
            self._interrupt(for_stop=False)

    # --- the end ------------------------------------------------------------------------

    def _conclude(self, result: ResultMessage | None) -> None:
        self._done = True
        if result is not None and self.cut_reason is None and result.stop_reason in CUT_SHORT:
            # (The CLI reports a refusal as an error result: the answer still stands.)
            self.cut_reason = self.tally.stop_reason = result.stop_reason
        if self._interrupted_for_stop or (self._stop_at is not None and self.failure is None):
            self.outcome = Outcome.STOPPED
        elif self.cut_reason is not None:
            self.failure = None
            self.outcome = Outcome.COMPLETE
        elif self.failure is not None:
            if result is not None and result.api_error_status is not None:
                self.failure = failures.classify(
                    result.api_error_status, self._error_kind, result.result or ""
                )
            self.outcome = Outcome.FAILED
        elif result is None:
            self.failure = failures.CRASHED
            self.outcome = Outcome.FAILED
        elif result.subtype == "error_max_turns" or result.terminal_reason == "max_turns":
            self.outcome = Outcome.MAX_TURNS
        elif result.is_error:
            detail = result.result or "; ".join(result.errors or []) or result.subtype
            self.failure = failures.classify(result.api_error_status, self._error_kind, detail)
            self.outcome = Outcome.FAILED
        else:
            self.outcome = Outcome.COMPLETE
