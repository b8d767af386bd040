"""The Messages engine: chats run on Claude through the Messages API, inside the server.

One `AsyncAnthropic` client (one connection pool) serves every chat; a turn is the SDK's
streaming tool runner (`client.beta.messages.tool_runner(stream=True)`) over the chat's
conversation, rebuilt from the database (conversation.py). The runner sends each request,
runs the persona's blog tools and loops until the model stops calling them or
`BLOGCHAT_MAX_TURNS` requests were made; this module reads each request's stream into
engine events, and decides how the turn ends: a graceful stop, a failure (retried here,
honouring `retry-after`, from the conversation as it stood before the failed request), a
refusal or the output limit. No process is started per chat. docs/engines.md explains
the design and compares it with the Agent SDK engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
import warnings
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, cast

import anthropic
import httpx2
from anthropic import AsyncAnthropic, DefaultAioHttpClient
from anthropic.lib.tools import BetaAsyncBuiltinFunctionTool, ToolError

from blogchat.engines.base import (
    CUT_TOOL,
    STOP_DEADLINE,
    STOPPED_TOOL,
    AgentEngine,
    EngineEvent,
    Exchange,
    ModelCall,
    Retrying,
    TextDelta,
    ThinkingDelta,
    ToolFinished,
    ToolStarted,
    TurnEnded,
    TurnFailed,
    TurnRequest,
)
from blogchat.engines.claude import failures
from blogchat.engines.claude.engine import CUT_SHORT_WARNINGS, post_context
from blogchat.engines.messages.conversation import EPHEMERAL, Message, messages_for, with_breakpoint
from blogchat.engines.messages.prices import price_of, request_cost
from blogchat.engines.text import sentence_end
from blogchat.protocol import DoneReason
from blogchat.settings import MIN_THINKING_BUDGET, Settings
from blogchat.tools import BlogTools

log = logging.getLogger(__name__)

# After a stop: how long the model may take to finish its sentence, or a tool its call.
STOP_GRACE = 0.7
assert STOP_GRACE < STOP_DEADLINE, "a graceful stop must end before the session cuts the turn"

# Stop reasons that end the answer early: the reader is told why (docs/claude.md).
CutReason = Literal["refusal", "max_tokens"]
CUT_SHORT: dict[str | None, CutReason] = {"refusal": "refusal", "max_tokens": "max_tokens"}

# A tool the model names that the persona does not offer is refused by the runner, with an
# error result the model reads (the turn goes on); the SDK also warns, which would only be
# noise in the logs: the engine logs the call itself.
warnings.filterwarnings(
    "ignore", message=r"Tool '.*' not found in tool runner", category=UserWarning
)

Phase = Literal["streaming", "finishing_sentence", "finishing_tool", "done"]

# The events the SDK's stream derives from the raw event it yielded just before (a `text`
# event for every text delta, with the block's text so far): the raw ones say it all.
_DERIVED = frozenset({"text", "thinking", "signature", "input_json", "citation", "compaction"})


# Connections to the API, open at once and kept between requests: every running turn has
# one, so the pool must never make a turn wait for another's (docs/performance.md, 7).
MAX_CONNECTIONS = 1000


def http_client() -> DefaultAioHttpClient:
    """The SDK's documented aiohttp transport: its C HTTP parser reads a streamed answer for
    0.69-0.77 of the CPU of the default httpx one (docs/performance.md, section 7).
    Every connection is kept alive, so a crowd of turns does not reconnect for its next."""
    return DefaultAioHttpClient(
        limits=httpx2.Limits(
            max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS
        )
    )


class _BlogTool(BetaAsyncBuiltinFunctionTool):
    """One of the persona's blog tools, as the SDK's tool runner runs it."""

    def __init__(self, tools: BlogTools, name: str, allowed: tuple[str, ...], definition: Any):
        self._tools = tools
        self._name = name
        self._allowed = allowed
        self._definition = definition

    def to_dict(self) -> Any:
        """The tool's definition, as sent to the model."""
        return self._definition

    async def call(self, input: object) -> str:
        """Run the tool (BlogTools.call refuses any the persona does not list)."""
        arguments = dict(input) if isinstance(input, Mapping) else {}
        result = await asyncio.to_thread(self._tools.call, self._name, arguments, self._allowed)
        if result.is_error:
            raise ToolError(result.output)
        return result.output


@dataclass
class _Usage:
    """Tokens of one model request. `input` includes the cached tokens, counted apart too."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_creation: int = 0

    @classmethod
    def of(cls, usage: Any) -> _Usage:
        read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        creation = int(getattr(usage, "cache_creation_input_tokens", 0) or 0)
        return cls(
            input=int(getattr(usage, "input_tokens", 0) or 0) + read + creation,
            output=int(getattr(usage, "output_tokens", 0) or 0),
            cache_read=read,
            cache_creation=creation,
        )


@dataclass
class _Call:
    """A model request of the turn, from sending it to its last event."""

    model: str
    started_at: float
    input: object
    message_id: str | None = None
    usage: _Usage = field(default_factory=_Usage)
    first_token_at: float | None = None
    stop_reason: str | None = None
    # Whether any of its text or thinking reached the reader.
    shown: bool = False
    # The text of each block that reached the reader, by block index, in the pieces shown
    # (joined only if the request ends early: adding each delta to a string copies it).
    shown_text: dict[int, list[str]] = field(default_factory=dict)
    block: str | None = None
    block_index: int = -1

    def report(self, content: list[Any], error: str | None = None) -> ModelCall:
        return ModelCall(
            model=self.model,
            started_at=self.started_at,
            ended_at=time.time(),
            input=self.input,
            output={"role": "assistant", "content": content} if content else None,
            input_tokens=self.usage.input,
            output_tokens=self.usage.output,
            cache_read_tokens=self.usage.cache_read,
            cache_creation_tokens=self.usage.cache_creation,
            first_token_at=self.first_token_at,
            stop_reason=self.stop_reason,
            error=error,
            message_id=self.message_id,
        )


class MessagesEngine(AgentEngine):
    """Runs turns on Claude through the Messages API, in this process."""

    name = "messages"

    def __init__(
        self, settings: Settings, tools: BlogTools, *, client: AsyncAnthropic | None = None
    ) -> None:
        self.settings = settings
        self.tools = tools
        if client is None:
            key = settings.anthropic_api_key
            client = AsyncAnthropic(
                api_key=key.get_secret_value() if key is not None else None,
                base_url=settings.anthropic_base_url,
                # The engine retries a failed request itself: the readers get a `status`
                # while they wait, and a retry-after beyond the limit ends the turn.
                max_retries=0,
                # Nothing from the model for this long: the request failed (a stall).
                timeout=settings.stall_seconds,
                http_client=http_client(),
            )
        self.client = client
        self._tool_sets: dict[tuple[str, ...], list[_BlogTool]] = {}

    async def run_turn(
        self, request: TurnRequest, stop: asyncio.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        """Stream one turn (see the module's docstring)."""
        turn = _Turn(self, request, stop)
        async with contextlib.aclosing(turn.events()) as events:
            async for event in events:
                yield event

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.close()

    def tools_for(self, allowed: tuple[str, ...]) -> list[_BlogTool]:
        """The persona's tools, in its order; the last carries the tools' cache breakpoint."""
        found = self._tool_sets.get(allowed)
        if found is None:
            chosen = self.tools.allowed(allowed)
            names = tuple(tool.name for tool in chosen)
            found = []
            for index, tool in enumerate(chosen):
                definition: dict[str, Any] = {
                    "name": tool.name,
                    "description": tool.description,
                    "input_schema": tool.input_schema,
                }
                if index == len(chosen) - 1:
                    definition["cache_control"] = EPHEMERAL
                found.append(_BlogTool(self.tools, tool.name, names, definition))
            self._tool_sets[allowed] = found
        return found

    def thinking(self) -> dict[str, Any] | None:
        """The extended-thinking setting of every request, or None when it is off."""
        budget = self.settings.thinking_budget
        if not budget:
            return None
        return {
            "type": "enabled",
            "budget_tokens": max(MIN_THINKING_BUDGET, budget),
            # Newer models return no thinking text unless asked for a summary.
            "display": "summarized",
        }


class _Turn:
    """One turn: the runner over the conversation, started again after a retried failure."""

    def __init__(self, engine: MessagesEngine, request: TurnRequest, stop: asyncio.Event):
        self.engine = engine
        self.settings = engine.settings
        self.request = request
        self.stop = stop
        self.chat_id = request.chat_id
        self.tools = engine.tools_for(tuple(request.persona.allowed_tools))
        question = request.text
        if request.post is not None:
            names = tuple(tool.name for tool in self.tools)
            question = f"{post_context(request.post, names)}\n\n{question}"
        # The conversation up to the reader's new message, then what this turn added.
        self.question = question
        self.before = messages_for(request, question)
        self.exchange: list[Message] = []
        self.phase: Phase = "streaming"
        self.deadline = 0.0
        # The model and tokens of each request the provider started answering.
        self.calls: list[_Call] = []
        self.requests = 0
        self.attempts = 1
        self.model: str | None = None
        self.stop_reason: str | None = None
        self.cut_reason: CutReason | None = None
        self.outcome: DoneReason | None = None
        self.failure: TurnFailed | None = None
        # Tool calls announced to the reader that have not returned, by tool_use_id.
        self.open_tools: dict[str, str] = {}
        self.error: BaseException | None = None
        # The request being streamed (None between requests), and whether any of a failed
        # request reached the reader.
        self.call: _Call | None = None
        self.failed_shown = False

    # --- the turn ---------------------------------------------------------------------------

    async def events(self) -> AsyncGenerator[EngineEvent, None]:
        """The turn's events: runners until one ends the turn, the last event TurnEnded."""
        retries = self.settings.provider_retries
        delay = self.settings.provider_retry_delay
        while True:
            async with contextlib.aclosing(self._run()) as events:
                async for event in events:
                    yield event
            error = self._take_error()
            if error is None:
                break
            failure, wait = self._failed(error, delay)
            shown = self.failed_shown
            if shown:
                # Part of this answer reached the reader: asking again would start it over.
                failure = failures.CUT_OFF.because(failure.detail)
            if not failure.retryable or shown or retries <= 0 or self.outcome is not None:
                self._decide("error", failure)
                break
            if wait > self.settings.provider_retry_max_wait:
                self._decide("error", failure.because(f"retry in {wait:.0f} s is beyond the limit"))
                break
            log.info("chat %s: retrying in %.1f s after %s", self.chat_id, wait, failure.detail)
            max_attempts = self.attempts + retries
            self.attempts += 1
            yield Retrying(attempt=self.attempts, max_attempts=max_attempts, delay=wait)
            if await _stopped_within(self.stop, wait):
                self._decide("stopped")
                break
            retries -= 1
            delay *= 2
        note = STOPPED_TOOL if self.outcome == "stopped" else CUT_TOOL
        for tool_use_id in self.open_tools:
            yield ToolFinished(tool_use_id, note, is_error=True)
        if self.exchange:
            yield Exchange(tuple(self.exchange))
        if self.outcome == "error" and self.failure is not None:
            log.warning("chat %s: turn failed: %s", self.chat_id, self.failure.detail)
            yield self.failure
        yield self._ended()

    async def _run(self) -> AsyncGenerator[EngineEvent, None]:
        """One runner over the conversation as it stands: until the turn is decided, or a
        request fails (then `error` is set and the caller may start another)."""
        engine = self.engine
        settings = self.settings
        params: dict[str, Any] = {
            "model": self.request.model_id,
            "max_tokens": settings.max_output_tokens,
            "system": [
                {
                    "type": "text",
                    "text": self.request.persona.system_prompt,
                    "cache_control": EPHEMERAL,
                }
            ],
            "messages": with_breakpoint([*self.before, *self.exchange]),
            "tools": self.tools,
            "max_iterations": settings.max_turns - self.requests,
            "stream": True,
            # The database holds the conversation: every request sends it whole (the
            # prompt cache makes that cheap), and no thread is kept on the server.
            "thread": False,
        }
        thinking = engine.thinking()
        if thinking is not None:
            params["thinking"] = thinking
        runner = engine.client.beta.messages.tool_runner(**params)
        pending_input = _telemetry_input(
            self.exchange[-1] if self.exchange else None, self.question
        )
        stream: Any = None
        started = time.time()
        try:
            async for stream in runner:
                self.requests += 1
                self.call = call = _Call(self.request.model_id, started, pending_input)
                async for event in self._stream(stream, call):
                    yield event
                if self.phase == "done":
                    return
                message = await stream.get_final_message()
                reply: Message = {
                    "role": "assistant",
                    "content": [_block_param(block) for block in message.content],
                }
                self.exchange.append(reply)
                self.call = None
                yield call.report(_blocks(reply))
                self.stop_reason = message.stop_reason
                if (cut := CUT_SHORT.get(message.stop_reason)) is not None:
                    log.info("chat %s: the answer ended with stop reason %s", self.chat_id, cut)
                    self.cut_reason = cut
                    self._decide("stopped" if self.phase != "streaming" else "complete")
                    return
                results = await self._run_tools(runner)
                if results is None:
                    return  # Stopped while a tool ran.
                for event in results:
                    yield event
                if self.phase == "finishing_tool" or self.stop.is_set():
                    self._decide("stopped")
                    return
                started = time.time()
                pending_input = _telemetry_input(self.exchange[-1], self.question)
        except Exception as exc:
            if not _is_provider_error(exc):
                raise
            self.error = exc
            call = self.call or _Call(self.request.model_id, started, pending_input)
            self.call = None
            self.failed_shown = call.shown
            yield call.report(self._keep_shown(call, stream), error=_describe(exc))
            return
        finally:
            await runner.close()
        if self.stop_reason == "tool_use":
            self._decide("max_turns")
        else:
            self._decide("complete")

    async def _stream(self, stream: Any, call: _Call) -> AsyncGenerator[EngineEvent, None]:
        """One request's stream, as engine events. Sets phase "done" when the turn ends in
        it (a stop took effect); a failure propagates."""
        shown_text = call.shown_text
        async for event in stream:
            kind = event.type
            if kind in _DERIVED:
                continue
            if kind == "content_block_delta":
                delta = event.delta
                if delta.type == "text_delta":
                    if call.first_token_at is None:
                        call.first_token_at = time.time()
                    text = self._text(delta.text)
                    if text:
                        call.shown = True
                        pieces = shown_text.get(event.index)
                        if pieces is None:
                            shown_text[event.index] = [text]
                        else:
                            pieces.append(text)
                        yield TextDelta(text)
                elif delta.type == "thinking_delta":
                    if call.first_token_at is None:
                        call.first_token_at = time.time()
                    if self.phase != "streaming" or self.stop.is_set():
                        self._stop_now()  # No new thinking after a stop.
                    elif delta.thinking:
                        call.shown = True
                        yield ThinkingDelta(delta.thinking)
            elif kind == "content_block_start":
                call.block = event.content_block.type
                call.block_index = event.index
            elif kind == "content_block_stop":
                block = event.content_block
                call.block = None
                if block.type == "tool_use" and self.phase == "streaming":
                    self.open_tools[block.id] = block.name
                    yield ToolStarted(block.id, block.name, dict(block.input or {}))
                elif block.type == "text" and self.phase == "finishing_sentence":
                    self._stop_now()  # The block ended before its sentence did.
            elif kind == "message_start":
                message = event.message
                call.message_id = message.id
                call.model = message.model or call.model
                call.usage = _Usage.of(message.usage)
                self.calls.append(call)
                if message.model:
                    self.model = message.model
            elif kind == "message_delta":
                call.stop_reason = event.delta.stop_reason or call.stop_reason
                output = getattr(event.usage, "output_tokens", None)
                if output is not None:
                    call.usage.output = int(output)
            if self.phase == "streaming" and self.stop.is_set():
                self._on_stop()
            elif self.phase == "finishing_sentence" and time.monotonic() > self.deadline:
                self._stop_now()
            if self.phase == "done":
                self.call = None
                call.stop_reason = call.stop_reason or "interrupted"
                yield call.report(self._keep_shown(call, stream))
                return

    async def _run_tools(self, runner: Any) -> list[EngineEvent] | None:
        """Run the reply's tool calls (the runner's own call, cached for its loop), while
        watching for a stop: a tool still running STOP_GRACE after it gives up. None: the
        turn stopped there."""
        running = asyncio.ensure_future(runner.generate_tool_call_response())
        if not self.stop.is_set():
            stopped = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
        if not running.done():
            await asyncio.wait({running}, timeout=STOP_GRACE)
        if not running.done():
            running.cancel()
            self._decide("stopped")
            self.phase = "done"
            return None
        response = running.result()
        if response is None:
            return []
        self.exchange.append(cast(dict[str, Any], response))
        events: list[EngineEvent] = []
        for block in response["content"]:
            if not isinstance(block, Mapping) or block.get("type") != "tool_result":
                continue
            tool_use_id = str(block.get("tool_use_id"))
            name = self.open_tools.pop(tool_use_id, None)
            is_error = bool(block.get("is_error"))
            if is_error and name is not None and name not in runner_names(self.tools):
                log.warning("chat %s: the model called a tool not offered: %r", self.chat_id, name)
            events.append(ToolFinished(tool_use_id, _tool_output(block.get("content")), is_error))
        return events

    # --- stopping ---------------------------------------------------------------------------

    def _on_stop(self) -> None:
        call = self.call
        if self.open_tools:
            self.phase = "finishing_tool"  # Its result still reaches the reader.
        elif call is not None and call.block == "text":
            self.phase = "finishing_sentence"
            self.deadline = time.monotonic() + STOP_GRACE
        else:
            self._stop_now()

    def _text(self, text: str) -> str:
        if self.phase == "finishing_sentence":
            cut = sentence_end(text)
            if cut is not None:
                self._stop_now()
                return text[:cut]
            return text
        if self.phase == "streaming":
            if self.stop.is_set() and (cut := sentence_end(text)) is not None:
                self._stop_now()
                return text[:cut]
            return text
        return ""

    def _stop_now(self) -> None:
        self._decide("stopped")
        self.phase = "done"

    def _keep_shown(self, call: _Call, stream: Any) -> list[dict[str, Any]]:
        """The request ended early: the conversation keeps what the reader was shown of it
        (whole thinking blocks with their signatures, and text as far as it was shown)."""
        if not call.shown or stream is None:
            return []
        content: list[dict[str, Any]] = []
        try:
            snapshot = list(stream.current_message_snapshot.content)
        except Exception:  # No message_start was read: nothing of it was shown either.
            snapshot = []
        for index, block in enumerate(snapshot):
            if block.type == "thinking" and block.signature:
                content.append(
                    {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
                )
            elif (text := "".join(call.shown_text.get(index, ()))).strip():
                content.append({"type": "text", "text": text})
        if content:
            self.exchange.append({"role": "assistant", "content": content})
        return content

    # --- the end ----------------------------------------------------------------------------

    def _take_error(self) -> BaseException | None:
        error, self.error = self.error, None
        return error

    def _decide(self, outcome: DoneReason, failure: TurnFailed | None = None) -> None:
        if self.outcome is None:
            self.outcome, self.failure = outcome, failure

    def _failed(self, exc: BaseException, delay: float) -> tuple[TurnFailed, float]:
        """What a failed request means, and how long to wait before asking again."""
        if isinstance(exc, anthropic.APITimeoutError):
            return failures.STALLED.because(_describe(exc)), delay
        if isinstance(exc, anthropic.APIStatusError):
            status = exc.status_code if exc.status_code >= 400 else None
            failure = failures.classify(status, None, _describe(exc))
            wait = _retry_after(exc.response.headers)
            return failure, delay if wait is None else wait
        return failures.CONNECTION_LOST.because(_describe(exc)), delay

    def _ended(self) -> TurnEnded:
        outcome: DoneReason = self.outcome or "error"
        warning = None
        if outcome == "max_turns":
            warning = (
                f"The assistant reached its limit of {self.settings.max_turns} steps for one "
                "message, so this answer may be incomplete. Ask it to go on if you need more."
            )
        elif outcome == "complete" and self.cut_reason is not None:
            warning = CUT_SHORT_WARNINGS[self.cut_reason]
        calls = [call.usage for call in self.calls]
        metadata: dict[str, object] = {
            "engine": MessagesEngine.name,
            # A turn is never started over (a failed request is sent again, as the Agent
            # SDK engine's CLI does), so it has one attempt, as the spans count them.
            "attempts": 1,
            "tries": self.attempts,
        }
        cost = _cost(self.calls)
        if cost is not None:
            metadata["cost_usd"] = cost
        return TurnEnded(
            reason=outcome,
            model=self.model or self.request.model_id,
            input_tokens=sum(call.input for call in calls),
            output_tokens=sum(call.output for call in calls),
            warning=warning,
            metadata=metadata,
            stop_reason=self.stop_reason if outcome != "stopped" else None,
            cache_read_tokens=sum(call.cache_read for call in calls),
            cache_creation_tokens=sum(call.cache_creation for call in calls),
            context_tokens=calls[-1].input if calls else 0,
        )


def _cost(calls: Sequence[_Call]) -> float | None:
    """What the turn's requests cost in dollars, each at the price of the model that
    answered it (prices.py); None if one of those models has no price there."""
    total = Decimal(0)
    for call in calls:
        price = price_of(call.model)
        if price is None:
            log.debug("no price for model %s: the turn's cost is not reported", call.model)
            return None
        usage = call.usage
        total += request_cost(
            price,
            uncached_input=usage.input - usage.cache_read - usage.cache_creation,
            output=usage.output,
            cache_read=usage.cache_read,
            cache_write=usage.cache_creation,
        )
    return float(total)


def runner_names(tools: Sequence[_BlogTool]) -> set[str]:
    """The names of the tools offered."""
    return {tool.name for tool in tools}


def _telemetry_input(last: Message | None, question: str) -> object:
    """What a request added to the conversation, for its span (as the Agent SDK engine
    reports it): the reader's message, or the tool results."""
    if last is None or last["role"] != "user":
        return [{"role": "user", "content": question}]
    results = [
        {
            "type": "tool_result",
            "tool_use_id": block.get("tool_use_id"),
            "content": _tool_output(block.get("content")),
            "is_error": bool(block.get("is_error")),
        }
        for block in last["content"]
        if isinstance(block, Mapping) and block.get("type") == "tool_result"
    ]
    return [{"role": "user", "content": results}]


def _block_param(block: Any) -> dict[str, Any]:
    """A content block of a reply, as the next request sends it back (plain JSON)."""
    kind = block.type
    if kind == "text":
        return {"type": "text", "text": block.text}
    if kind == "thinking":
        return {"type": "thinking", "thinking": block.thinking, "signature": block.signature}
    if kind == "redacted_thinking":
        return {"type": "redacted_thinking", "data": block.data}
    if kind == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    return cast(dict[str, Any], block.model_dump(mode="json", exclude_none=True))


def _blocks(reply: Mapping[str, Any]) -> list[Any]:
    content = reply.get("content")
    return list(content) if isinstance(content, list) else []


def _tool_output(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(block.get("text", "")) for block in content if isinstance(block, Mapping)
        )
    return str(content)


def _is_provider_error(exc: BaseException) -> bool:
    """A failed request or a broken connection, as opposed to a bug of ours."""
    if isinstance(exc, anthropic.APIError):
        return True
    return isinstance(exc, httpx2.HTTPError)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The provider's retry-after, in seconds, if it gave one."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        with contextlib.suppress(ValueError):
            return max(0.0, float(millis) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    when = email.utils.parsedate_to_datetime(value) if value else None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()
