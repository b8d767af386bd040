"""One attempt at a turn: a prompt sent to a chat's agent process, and the facts of its
stream (stream.py) turned into engine events, with graceful stop, a stall watchdog and
failure detection. `Phase` names where an attempt is; docs/claude.md draws the phases.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from claude_agent_sdk import ResultMessage

from blogchat.engines.base import (
    STOP_DEADLINE,
    EngineEvent,
    Retrying,
    TextDelta,
    ThinkingDelta,
    ToolFinished,
    ToolStarted,
    TurnFailed,
)
from blogchat.engines.claude import failures
from blogchat.engines.claude.calls import ModelCalls
from blogchat.engines.claude.process import AgentSpec, Inbound
from blogchat.engines.claude.stream import (
    BlockEnded,
    CallUsage,
    Delta,
    Fact,
    Finished,
    ProcessEnded,
    ProviderError,
    RefusalAnnounced,
    ResponseEnded,
    ResponseStarted,
    RetryAnnounced,
    StreamReader,
    ToolCall,
    ToolResult,
    UnstreamedReply,
    WholeBlock,
)
from blogchat.engines.text import sentence_end
from blogchat.protocol import DoneReason

log = logging.getLogger(__name__)

# After a stop: how long the agent may take to finish its sentence or its tool call.
STOP_GRACE = 0.7
# After an interrupt: how long the CLI may take to end the turn before the process is
# given up on (it usually takes 20-50 ms).
DRAIN = 0.5
# A graceful stop must end before the session cuts the turn (engines/base.py).
assert STOP_GRACE + DRAIN < STOP_DEADLINE, "STOP_GRACE + DRAIN must stay under STOP_DEADLINE"

# Stop reasons that end the turn, whatever the CLI would do next (see Attempt._cut_short).
CutReason = Literal["refusal", "max_tokens"]
CUT_SHORT: dict[str | None, CutReason] = {"refusal": "refusal", "max_tokens": "max_tokens"}


class Phase(enum.Enum):
    """Where an attempt is. What reaches the reader, and how long the attempt waits for the
    CLI's next message, follow from it."""

    # The prompt is being sent.
    SENDING = "sending"
    # Everything the model says reaches the reader; a silence of stall_seconds is a failure.
    STREAMING = "streaming"
    # Stopped mid-text: text up to the end of the sentence still reaches the reader.
    FINISHING_SENTENCE = "finishing_sentence"
    # Stopped while our tool runs: its result still reaches the reader.
    FINISHING_TOOL = "finishing_tool"
    # The answer is over (a refusal, a provider error): nothing more reaches the reader,
    # and the CLI ends the turn by itself.
    ENDING = "ending"
    # Interrupted: nothing more reaches the reader; the CLI has DRAIN to end the turn.
    DRAINING = "draining"
    # The CLI's result was read, or the process was given up on.
    DONE = "done"


FINISHING = frozenset({Phase.FINISHING_SENTENCE, Phase.FINISHING_TOOL})
FORWARDING = FINISHING | {Phase.STREAMING}


class Agent(Protocol):
    """What an attempt needs of an agent process (an `AgentProcess`, or a test's stand-in)."""

    @property
    def spec(self) -> AgentSpec: ...

    @property
    def tools_running(self) -> int: ...

    @property
    def owed_results(self) -> int: ...

    @property
    def alive(self) -> bool: ...

    async def query(self, prompt: str) -> None: ...

    async def receive(self, within: float | None) -> Inbound: ...

    def interrupt(self) -> object: ...


@dataclass
class Tally:
    """What a whole turn produced, across its attempts."""

    # Whether anything reached the reader (then a failure can no longer be retried unseen).
    forwarded: bool = False
    # Tokens per model call, by message id.
    usage: dict[str, CallUsage] = field(default_factory=dict)
    # Tool calls announced to the reader that have not returned: plain names by tool_use_id.
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

    @property
    def context_tokens(self) -> int:
        """Input tokens of the turn's last model call: how long the conversation has grown."""
        return next(reversed(self.usage.values())).input if self.usage else 0


class Attempt:
    """Sends one prompt and streams what comes back, until the CLI's result for it.

    How it ends (`outcome`) is decided once, by the first of: the reader's stop taking
    effect, a failure, the model ending its answer early (`cut_reason`), or the CLI's
    result. A stop seen while a sentence or tool call is finishing takes effect when it
    is done, so a failure in between still counts. The CLI's result only refines a
    failure: its HTTP status, or a refusal it reports as an error.
    """

    def __init__(
        self,
        process: Agent,
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
        self.phase = Phase.SENDING
        self.outcome: DoneReason | None = None
        self.failure: TurnFailed | None = None
        self.cut_reason: CutReason | None = None
        # Whether the process read this attempt's result and can take the next prompt.
        self.settled = False
        self.reader = StreamReader(process.spec.chat_id)
        self.calls = ModelCalls(process.spec.model_id, prompt)
        # When the wait of a finishing or draining phase runs out (monotonic seconds).
        self._deadline = 0.0
        # The SDK's kind of the provider error reported, to classify the result's status.
        self._error_kind: str | None = None
        # Whether text or thinking of the response being streamed reached the reader.
        self._shown_in_response = False

    @property
    def chat_id(self) -> str:
        """The chat this attempt belongs to."""
        return self.process.spec.chat_id

    @property
    def forwarding(self) -> bool:
        """Whether what the model says now reaches the reader."""
        return self.phase in FORWARDING

    async def events(self) -> AsyncGenerator[EngineEvent, None]:
        """The attempt's engine events; `outcome`, `failure` and `settled` are set after."""
        self.tally.attempts += 1
        try:
            await self.process.query(self.prompt)
        except Exception as exc:
            log.warning("chat %s: could not send the prompt: %r", self.chat_id, exc)
            self._decide("error", failures.CRASHED.because(repr(exc)))
            self.phase = Phase.DONE
            return
        self.phase = Phase.STREAMING
        while self.phase is not Phase.DONE:
            if self.stop.is_set():
                self._on_stop()
            try:
                item = await self.process.receive(self._wait())
            except TimeoutError:
                self._on_timeout()
                continue
            for fact in self.reader.read(item):
                for call in self.calls.observe(fact):
                    yield call
                for event in self._on(fact):
                    if not isinstance(event, Retrying):
                        self.tally.forwarded = True
                    if isinstance(event, (TextDelta, ThinkingDelta)):
                        self._shown_in_response = True
                    yield event
        if self.outcome == "error":
            failure = self.failure or failures.CRASHED
            ended = self.calls.close(failure.detail or failure.message)
        else:
            ended = self.calls.close(None, "interrupted")
        for call in ended:
            yield call

    # --- transitions ----------------------------------------------------------------------

    def _decide(self, outcome: DoneReason, failure: TurnFailed | None = None) -> None:
        if self.outcome is None:
            self.outcome, self.failure = outcome, failure

    def _on_stop(self) -> None:
        """The reader pressed stop (called on every message until the attempt ends)."""
        if self.phase is Phase.STREAMING:
            if self.tally.open_tools:
                self._finish(Phase.FINISHING_TOOL)
            elif self.reader.open_block == "text":
                self._finish(Phase.FINISHING_SENTENCE)
            else:
                self._stop_now()
        elif self.phase is Phase.ENDING:
            self._interrupt()  # The answer is over: wait for the CLI's result no longer.

    def _finish(self, phase: Phase) -> None:
        self.phase = phase
        self._deadline = time.monotonic() + STOP_GRACE

    def _stop_now(self) -> None:
        """The reader's stop takes effect: nothing more reaches them."""
        self._decide("stopped")
        self.calls.stopped = True
        self._interrupt()

    def _fail(self, failure: TurnFailed) -> None:
        self._decide("error", failure)
        self._interrupt()

    def _end_quietly(self) -> None:
        """Nothing more reaches the reader, and the CLI ends the turn by itself (after a
        stop, within a drain's time)."""
        if self.phase in FINISHING:
            self._interrupt()
        elif self.phase is Phase.STREAMING:
            self.phase = Phase.ENDING

    def _interrupt(self) -> None:
        if self.phase in (Phase.DRAINING, Phase.DONE):
            return
        self.phase = Phase.DRAINING
        self._deadline = time.monotonic() + DRAIN
        self.process.interrupt()

    def _conclude(self, result: ResultMessage | None) -> None:
        finishing = self.phase in FINISHING
        self.phase = Phase.DONE
        if result is not None:
            self._read_result(result, finishing=finishing)
        elif finishing:
            self._decide("stopped")  # The process ended while its answer wound down.
        else:
            self._decide("error", failures.CRASHED)

    # --- timing ---------------------------------------------------------------------------

    def _wait(self) -> float:
        if self.phase in FINISHING or self.phase is Phase.DRAINING:
            return max(0.0, self._deadline - time.monotonic())
        return self.stall_seconds

    def _on_timeout(self) -> None:
        if self.phase is Phase.DRAINING:
            log.warning(
                "chat %s: the agent did not end its turn after an interrupt; giving it up",
                self.chat_id,
            )
            self.settled = False
            self._conclude(None)
        elif self.phase in FINISHING:
            self._stop_now()
        elif self.process.tools_running:
            pass  # Our own tool is working; the CLI has nothing to say meanwhile.
        else:
            log.warning(
                "chat %s: nothing from the model for %.0f s", self.chat_id, self.stall_seconds
            )
            self._fail(failures.STALLED.because(f"no event for {self.stall_seconds} s"))

    # --- facts ----------------------------------------------------------------------------

    def _on(self, fact: Fact) -> list[EngineEvent]:
        match fact:
            case ResponseStarted(message_id=message_id, model=model, usage=usage):
                self.tally.usage[message_id] = usage
                if self.forwarding and model:
                    self.tally.model = model
                self._shown_in_response = False
            case Delta(kind="text", text=text):
                return self._text(text)
            case Delta(kind="thinking", text=text):
                return self._thinking(text)
            case BlockEnded(kind="text") if self.phase is Phase.FINISHING_SENTENCE:
                self._stop_now()  # The block ended before its sentence did.
            case ResponseEnded():
                self._response_ended(fact)
            case UnstreamedReply(message_id=message_id, usage=usage):
                self.tally.usage[message_id] = usage
            case WholeBlock(kind="text", text=text, streamed=False):
                return self._text(text)
            case WholeBlock(kind="thinking", text=text, streamed=False):
                return self._thinking(text)
            case ToolCall() if self.forwarding:
                self.tally.open_tools[fact.tool_use_id] = fact.name
                return [ToolStarted(fact.tool_use_id, fact.name, fact.input)]
            case ToolResult():
                return self._tool_result(fact)
            case RetryAnnounced():
                return self._on_retry(fact)
            case RefusalAnnounced() if self.forwarding:
                self._cut_short("refusal")
            case ProviderError():
                self._on_provider_error(fact)
            case Finished(result=result):
                self.tally.result = result
                self.settled = self.process.owed_results == 0 and self.process.alive
                self._conclude(result)
            case ProcessEnded(error=error):
                if self.phase is Phase.STREAMING:
                    detail = repr(error) if error else "the CLI exited"
                    log.warning(
                        "chat %s: the agent process ended mid-turn: %s", self.chat_id, detail
                    )
                    self._decide("error", failures.CRASHED.because(detail))
                self.settled = False
                self._conclude(None)
        return []

    def _text(self, text: str) -> list[EngineEvent]:
        if not self.forwarding:
            return []
        if self.phase in FINISHING and (cut := sentence_end(text)) is not None:
            # The sentence being written is finished: the stop takes effect here.
            self._stop_now()
            text = text[:cut]
        return [TextDelta(text)] if text else []

    def _thinking(self, text: str) -> list[EngineEvent]:
        if self.phase in FINISHING:
            self._stop_now()  # No new thinking after a stop.
            return []
        return [ThinkingDelta(text)] if text and self.forwarding else []

    def _response_ended(self, fact: ResponseEnded) -> None:
        self.tally.usage[fact.message_id] = fact.usage
        shown, self._shown_in_response = self._shown_in_response, False
        if not self.forwarding:
            return
        if fact.broke_off:
            if shown:
                # The CLI would ask again or ask the model to resume; the reader already
                # has the start of this answer, so the turn cannot go on.
                log.warning("chat %s: the model's answer broke off mid-stream", self.chat_id)
                self._fail(failures.CUT_OFF.because("a response ended without a stop reason"))
            return
        self.tally.stop_reason = fact.stop_reason
        if (reason := CUT_SHORT.get(fact.stop_reason)) is not None:
            self._cut_short(reason)

    def _tool_result(self, fact: ToolResult) -> list[EngineEvent]:
        # After an interrupt the CLI reports the cancelled call itself; the engine says so
        # in its own words at the end of the turn.
        if not self.forwarding or fact.tool_use_id not in self.tally.open_tools:
            return []
        del self.tally.open_tools[fact.tool_use_id]
        if self.phase is Phase.FINISHING_TOOL and not self.tally.open_tools:
            self._stop_now()
        return [ToolFinished(fact.tool_use_id, fact.output, fact.is_error)]

    def _on_retry(self, fact: RetryAnnounced) -> list[EngineEvent]:
        """The CLI will send a failed model request again after a delay (the provider's
        retry-after when it gave one): tell the readers, unless the wait is too long."""
        log.info(
            "chat %s: the CLI retries a model call in %.1f s (retry %d of %d, status %s)",
            self.chat_id,
            fact.delay,
            fact.attempt,
            fact.max_retries,
            fact.status,
        )
        if not self.forwarding:
            return []
        if self.tally.forwarded:
            # Part of the answer reached the reader: a new request would start it over.
            self._fail(failures.CUT_OFF.because(f"the CLI would retry after status {fact.status}"))
            return []
        failure = failures.classify(
            fact.status, fact.error, f"the CLI would retry in {fact.delay:.1f} s"
        )
        if not failure.retryable:
            # A refused key, a missing model, a bad request: trying again cannot help.
            self._fail(failure)
        elif fact.delay > self.retry_max_wait:
            self._fail(failure.because(f"retry in {fact.delay:.0f} s is beyond the limit"))
        else:
            return [Retrying(fact.attempt + 1, fact.max_retries + 1, fact.delay)]
        return []

    def _on_provider_error(self, fact: ProviderError) -> None:
        # The text ("API Error: ...") is not an answer: it never reaches the reader.
        if self.cut_reason is not None:
            return  # The CLI's word on an answer that already ended the turn.
        self._error_kind = fact.kind
        self._decide("error", failures.classify(None, fact.kind, fact.text))
        self._end_quietly()

    def _cut_short(self, reason: CutReason) -> None:
        """The model ended its answer on a refusal or at the output limit. The turn ends
        here, with what the model said, and nothing after it reaches the reader.

        After a refusal the CLI ends the turn itself (CLAUDE_CODE_DISABLE_REFUSAL_RETRY);
        at the output limit it would ask the model to go on, so it is interrupted."""
        log.info("chat %s: the model's answer ended with stop reason %s", self.chat_id, reason)
        self.cut_reason = self.tally.stop_reason = reason
        if self.phase in FINISHING:
            self._stop_now()  # The reader had asked to stop: the answer ends here anyway.
        elif reason == "refusal":
            self._decide("complete")
            self._end_quietly()
        else:
            self._decide("complete")
            self._interrupt()

    def _read_result(self, result: ResultMessage, *, finishing: bool) -> None:
        cut = CUT_SHORT.get(result.stop_reason)
        if cut and not self.cut_reason and not finishing and self.outcome != "stopped":
            # The CLI reports a refusal as an error result: the answer still stands.
            self.cut_reason = self.tally.stop_reason = cut
            self.outcome, self.failure = "complete", None
        if self.outcome == "error" and result.api_error_status is not None:
            self.failure = failures.classify(
                result.api_error_status, self._error_kind, result.result or ""
            )
        elif finishing:
            self._decide("stopped")
        elif result.subtype == "error_max_turns" or result.terminal_reason == "max_turns":
            self._decide("max_turns")
        elif result.is_error:
            detail = result.result or "; ".join(result.errors or []) or result.subtype
            failure = failures.classify(result.api_error_status, self._error_kind, detail)
            self._decide("error", failure)
        else:
            self._decide("complete")
