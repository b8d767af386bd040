"""Telemetry: each agent turn traced to Braintrust, when a Braintrust API key is configured.

A turn is one span of type task, with a child span of type llm for each model call and of
type tool for each tool call. The session feeds a turn's engine events to its `TurnTrace`;
nothing here talks to the engines or the wire. docs/telemetry.md shows what a trace holds.

Tracing must never hurt a chat: with no key, nothing is imported or recorded; with a key,
spans are handed to the SDK's background thread (never flushed on the event loop), every
failure of the tracing itself is logged and swallowed, and shutdown waits a bounded time.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blogchat.engines.base import (
    EngineEvent,
    ModelCall,
    TextDelta,
    ThinkingDelta,
    ToolFinished,
    ToolStarted,
    TurnEnded,
    TurnFailed,
)
from blogchat.settings import Settings

if TYPE_CHECKING:
    from braintrust.logger import Logger, Span

log = logging.getLogger(__name__)

TURN_SPAN = "chat turn"
MODEL_SPAN = "model call"
# What a tool span says when the turn ended before the tool returned.
UNFINISHED_TOOL = "The turn ended before the tool finished."


@dataclass(frozen=True)
class TurnStart:
    """What is known of a turn when it starts."""

    chat_id: str
    text: str
    persona: str
    model_alias: str
    model_id: str
    anonymous: bool
    engine: str


class TurnTrace:
    """One turn's trace. This one records nothing: it is what every turn gets when off."""

    def observe(self, event: EngineEvent) -> None:
        """Take note of an engine event (called for every event, tokens included)."""

    def finish(
        self,
        *,
        reason: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        warning: str | None,
        answer: str,
        failure: TurnFailed | None,
    ) -> None:
        """The turn is over: log its spans with its outcome (only the first call counts)."""

    def abandon(self) -> None:
        """The turn was cut off without an outcome (its session closed): log what it had."""


NO_TRACE = TurnTrace()


class Telemetry:
    """Where turns are traced. This one is off: it traces nothing and imports nothing."""

    enabled = False

    def start_turn(self, turn: TurnStart) -> TurnTrace:
        """A trace for a turn that starts now."""
        return NO_TRACE

    async def aclose(self) -> None:
        """Send what is pending, within a bounded time (at shutdown)."""


def telemetry_for(settings: Settings) -> Telemetry:
    """Braintrust tracing when `BRAINTRUST_API_KEY` is set, otherwise telemetry that is off."""
    key = settings.braintrust_api_key
    if key is None or not key.get_secret_value():
        return Telemetry()
    try:
        return BraintrustTelemetry(settings)
    except Exception:
        log.exception("telemetry: could not set up Braintrust; turns are not traced")
        return Telemetry()


class BraintrustTelemetry(Telemetry):
    """Turns traced to a Braintrust project through the SDK's background logger."""

    enabled = True

    def __init__(self, settings: Settings) -> None:
        # Imported here so that with telemetry off the SDK is never even loaded.
        import braintrust

        assert settings.braintrust_api_key is not None
        if settings.braintrust_api_url:
            # The SDK reads the API URL only from the environment (it then overrides the
            # one its login returns); there is no argument for it.
            os.environ["BRAINTRUST_API_URL"] = settings.braintrust_api_url
        self.project = settings.braintrust_project
        self.flush_seconds = settings.telemetry_flush_seconds
        self.complaints = SdkComplaints()
        self._broken = False
        # Logging in and resolving the project happen lazily, in the SDK's own thread,
        # the first time it sends spans: nothing here touches the network.
        self.logger: Logger = braintrust.init_logger(
            project=settings.braintrust_project,
            api_key=settings.braintrust_api_key.get_secret_value(),
            app_url=settings.braintrust_app_url,
            org_name=settings.braintrust_org_name,
            async_flush=True,
            set_current=False,
        )
        self._tame_background_logger()
        log.info("telemetry: tracing turns to Braintrust project %r", self.project)

    def _tame_background_logger(self) -> None:
        background = self.logger.logging_state.global_bg_logger()
        # The SDK prints every failed send (with a traceback, several times a minute while
        # Braintrust is unreachable) to stderr; turn that into one warning.
        if hasattr(background, "outfile"):
            background.outfile = self.complaints
        # Its exit hook flushes with retries that can hold the process for many seconds
        # when the network is down; aclose() flushes within a bound instead.
        finalize = getattr(background, "_finalize", None)
        if finalize is not None:
            atexit.unregister(finalize)

    def start_turn(self, turn: TurnStart) -> TurnTrace:
        """A trace of a turn that starts now (its spans are logged when it ends)."""
        if self._broken:
            return NO_TRACE
        try:
            return BraintrustTurn(self, turn)
        except Exception:
            self.failed("start a turn's span")
            return NO_TRACE

    def failed(self, what: str) -> None:
        """Tracing itself failed: say so once, and keep the chat going."""
        if not self._broken:
            self._broken = True
            log.exception("telemetry: could not %s; turns are no longer traced", what)

    async def aclose(self) -> None:
        """Flush in a thread of its own and wait for it at most `flush_seconds`."""
        loop = asyncio.get_running_loop()
        flushed: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not flushed.done():
                flushed.set_result(None)

        def flush() -> None:
            try:
                self.logger.flush()
            except Exception as exc:
                log.debug("telemetry: final flush failed: %r", exc)
            finally:
                # The loop may be gone if the wait below already gave up.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(settle)

        # A daemon thread rather than the loop's executor: a flush that keeps retrying
        # must not hold up the executor's shutdown, nor the process's exit.
        threading.Thread(target=flush, name="telemetry-flush", daemon=True).start()
        try:
            await asyncio.wait_for(flushed, self.flush_seconds)
        except TimeoutError:
            log.warning(
                "telemetry: pending traces could not be sent within %.1f s; they are dropped",
                self.flush_seconds,
            )


# A line of the SDK's output that says what went wrong: the exception at the bottom of a
# traceback ("ConnectionRefusedError: ..."), or its own summary ("log request failed ...").
_CAUSE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Timeout)\w*:|failed", re.IGNORECASE)


class SdkComplaints(io.TextIOBase):
    """Takes what the SDK prints about failed sends: one warning with the cause, then debug."""

    def __init__(self) -> None:
        super().__init__()
        self.warned = False
        self._lock = threading.Lock()

    def writable(self) -> bool:
        """Always: it is a sink."""
        return True

    def write(self, text: str) -> int:
        """Log one piece of the SDK's output."""
        line = text.strip()
        if line:
            with self._lock:
                first = not self.warned and bool(_CAUSE.search(line))
                self.warned = self.warned or first
            if first:
                log.warning(
                    "telemetry: traces cannot be sent to Braintrust (%s); they are dropped "
                    "until it can be reached. Chats are not affected.",
                    line,
                )
            else:
                log.debug("telemetry: braintrust: %s", line)
        return len(text)


@dataclass
class _ToolCall:
    """A tool call as the turn saw it."""

    tool_use_id: str
    name: str
    input: dict[str, object]
    started_at: float
    ended_at: float | None = None
    output: str | None = None
    is_error: bool = False


class BraintrustTurn(TurnTrace):
    """A turn's task span, with llm and tool spans beneath it.

    While the turn runs, only times and events are noted; the spans are built when it is
    over, so that none of the SDK's work falls between a reader's message and its tokens.
    """

    def __init__(self, telemetry: BraintrustTelemetry, turn: TurnStart) -> None:
        self._telemetry = telemetry
        self._turn = turn
        self._started_at = time.time()
        self._first_token_at: float | None = None
        self._open_tools: dict[str, _ToolCall] = {}
        self._tools: list[_ToolCall] = []
        self._calls: list[ModelCall] = []
        self._stage = "starting"
        self._engine_details: dict[str, object] = {}
        self._ended = False

    def observe(self, event: EngineEvent) -> None:
        """Note first tokens, tool calls and model calls, and where the turn stands."""
        if isinstance(event, TextDelta):
            # The hot path: a check and a store per token.
            if self._first_token_at is None:
                self._first_token_at = time.time()
            self._stage = "model_call"
            return
        try:
            self._observe(event)
        except Exception:
            self._telemetry.failed("trace an engine event")

    def _observe(self, event: EngineEvent) -> None:
        if isinstance(event, ThinkingDelta):
            self._stage = "model_call"
        elif isinstance(event, ModelCall):
            self._calls.append(event)
            if not self._open_tools:
                # (A call that asked for tools is reported just after they started.)
                self._stage = "model_call"
        elif isinstance(event, ToolStarted):
            self._stage = "tool_call"
            call = _ToolCall(event.tool_use_id, event.name, dict(event.input), time.time())
            self._open_tools[event.tool_use_id] = call
            self._tools.append(call)
        elif isinstance(event, ToolFinished):
            finished = self._open_tools.pop(event.tool_use_id, None)
            if finished is not None:
                finished.ended_at = time.time()
                finished.output = event.output
                finished.is_error = event.is_error
            if not self._open_tools and not event.is_error:
                # A failed tool stays the stage until the model is heard from again: the
                # engine reports a tool it cut short as failed just before the turn fails.
                self._stage = "model_call"
        elif isinstance(event, TurnEnded):
            self._engine_details = dict(event.metadata)
            self._engine_details["model"] = event.model
            self._engine_details["provider_stop_reason"] = event.stop_reason
            self._engine_details["cache_read_tokens"] = event.cache_read_tokens
            self._engine_details["cache_creation_tokens"] = event.cache_creation_tokens

    def finish(
        self,
        *,
        reason: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        warning: str | None,
        answer: str,
        failure: TurnFailed | None,
    ) -> None:
        """Build and log the turn's spans: its outcome, metrics and error context."""
        if self._ended:
            return
        self._ended = True
        try:
            self._log(reason, model, input_tokens, output_tokens, warning, answer, failure)
        except Exception:
            self._telemetry.failed("log a turn's spans")

    def abandon(self) -> None:
        """Log the spans of a turn that was cut off with no outcome."""
        if self._ended:
            return
        self._ended = True
        try:
            self._log("stopped", self._turn.model_id, 0, 0, None, None, None, abandoned=True)
        except Exception:
            self._telemetry.failed("log a turn's spans")

    def _log(
        self,
        reason: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        warning: str | None,
        answer: str | None,
        failure: TurnFailed | None,
        *,
        abandoned: bool = False,
    ) -> None:
        from braintrust.span_types import SpanTypeAttribute

        ended_at = time.time()
        turn = self._turn
        details = self._engine_details
        metadata: dict[str, object] = {
            "chat_id": turn.chat_id,
            # Never who they are: only whether they are signed in.
            "visitor": "anonymous" if turn.anonymous else "registered",
            "model": model or details.get("model") or turn.model_id,
            "model_alias": turn.model_alias,
            "persona": turn.persona,
            "engine": turn.engine,
            "stop_reason": reason,
            "tools": [call.name for call in self._tools],
        }
        failed_tools = [call for call in self._tools if call.is_error]
        if failed_tools:
            metadata["tool_errors"] = [call.name for call in failed_tools]
        if warning:
            metadata["warning"] = warning
        if abandoned:
            metadata["abandoned"] = True
        for key in ("attempts", "num_turns", "terminal_reason", "provider_stop_reason"):
            if details.get(key) is not None:
                metadata[key] = details[key]
        metrics: dict[str, float] = {
            "prompt_tokens": input_tokens,
            "completion_tokens": output_tokens,
            "tokens": input_tokens + output_tokens,
            **_cache_metrics(
                _count(details.get("cache_read_tokens")),
                _count(details.get("cache_creation_tokens")),
            ),
        }
        if self._first_token_at is not None:
            metrics["time_to_first_token"] = self._first_token_at - self._started_at
        cost = details.get("cost_usd")
        if isinstance(cost, (int, float)):
            metrics["cost_usd"] = float(cost)
        event: dict[str, Any] = {"input": turn.text, "metadata": metadata, "metrics": metrics}
        if answer is not None:
            event["output"] = answer
        if failure is not None:
            event["error"] = self._failure_context(failure, metadata, failed_tools)
        span = self._telemetry.logger.start_span(
            name=TURN_SPAN, type=SpanTypeAttribute.TASK, start_time=self._started_at, **event
        )
        children: list[tuple[float, ModelCall | _ToolCall]] = [
            *((call.started_at, call) for call in self._calls),
            *((call.started_at, call) for call in self._tools),
        ]
        for _, child in sorted(children, key=lambda pair: pair[0]):
            if isinstance(child, ModelCall):
                self._log_model_call(span, child)
            else:
                self._log_tool_call(span, child, ended_at)
        span.end(end_time=ended_at)

    def _failure_context(
        self, failure: TurnFailed, metadata: dict[str, object], failed_tools: list[_ToolCall]
    ) -> str:
        """Put where and why the turn failed in its metadata; the span's error message."""
        stage = self._stage
        provider_errors = [call.error for call in self._calls if call.error is not None]
        context: dict[str, object] = {
            "stage": stage,
            "code": failure.code,
            "retryable": failure.retryable,
            "message": failure.message,
        }
        if provider_errors:
            context["provider_error"] = provider_errors[-1]
        tool = next(iter(self._open_tools.values()), None) or (
            failed_tools[-1] if failed_tools else None
        )
        if tool is not None:
            about = {"name": tool.name, "input": tool.input, "error": tool.output}
            context["tool" if stage == "tool_call" else "last_failed_tool"] = about
        metadata["error"] = context
        cause = f"; provider: {provider_errors[-1]}" if provider_errors else ""
        return f"{failure.message} (stage: {stage}{cause})"

    def _log_model_call(self, turn: Span, call: ModelCall) -> None:
        from braintrust.span_types import SpanTypeAttribute

        metrics: dict[str, float] = {
            "prompt_tokens": call.input_tokens,
            "completion_tokens": call.output_tokens,
            "tokens": call.input_tokens + call.output_tokens,
            **_cache_metrics(call.cache_read_tokens, call.cache_creation_tokens),
        }
        if call.first_token_at is not None:
            metrics["time_to_first_token"] = max(0.0, call.first_token_at - call.started_at)
        metadata: dict[str, object] = {"model": call.model, "stop_reason": call.stop_reason}
        if call.message_id:
            metadata["message_id"] = call.message_id
        event: dict[str, Any] = {"input": call.input, "metadata": metadata, "metrics": metrics}
        if call.output is not None:
            event["output"] = call.output
        if call.error is not None:
            event["error"] = call.error
        span = turn.start_span(
            name=MODEL_SPAN, type=SpanTypeAttribute.LLM, start_time=call.started_at, **event
        )
        span.end(end_time=call.ended_at)

    def _log_tool_call(self, turn: Span, call: _ToolCall, turn_ended_at: float) -> None:
        from braintrust.span_types import SpanTypeAttribute

        event: dict[str, Any] = {
            "input": call.input,
            "metadata": {"tool_use_id": call.tool_use_id},
        }
        if call.ended_at is None:
            event["error"] = UNFINISHED_TOOL
        else:
            event["output"] = call.output
            if call.is_error:
                event["error"] = call.output
        span = turn.start_span(
            name=call.name, type=SpanTypeAttribute.TOOL, start_time=call.started_at, **event
        )
        span.end(end_time=call.ended_at or turn_ended_at)


def _count(value: object) -> int:
    return value if isinstance(value, int) else 0


def _cache_metrics(read: int, creation: int) -> dict[str, float]:
    """Braintrust's metrics for prompt caching; `prompt_tokens` already includes both."""
    if not read and not creation:
        return {}
    return {"prompt_cached_tokens": read, "prompt_cache_creation_tokens": creation}
