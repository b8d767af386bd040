"""The AgentEngine interface: what a chat session asks of a model, and what it gets back."""

from __future__ import annotations

import asyncio
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from blogchat.content import Post
from blogchat.personas import Persona
from blogchat.protocol import DoneReason, ErrorCode


@dataclass(frozen=True)
class PastMessage:
    """An earlier message of the chat, as an engine needs it to rebuild a conversation."""

    role: Literal["user", "assistant"]
    text: str
    # An answer's messages in the Messages API's shape, as an engine gave them in its
    # `Exchange` (thinking with signatures, tool calls with their results); None for a
    # question, and for an answer of an engine that gives none (then `text` is what is known).
    content: Sequence[Mapping[str, Any]] | None = None
    # An answer cut off because the process writing it died (a crash, or the instance that
    # owned the chat): an engine that keeps its own context never got to keep this one.
    incomplete: bool = False


# A stop's time budget, in seconds. The protocol promises `done` within STOP_PROMISE of a
# stop (docs/protocol.md). The session cuts a turn that is still running STOP_DEADLINE
# after the stop (`SessionTimings.stop_grace`); an engine's graceful stop (finish the
# sentence or the tool, then wind down) must end before that. Each engine checks its own
# timings against STOP_DEADLINE where it defines them.
STOP_PROMISE = 2.0
STOP_DEADLINE = 1.6
assert STOP_DEADLINE < STOP_PROMISE, "the session must cut a turn before the protocol's limit"

# What a tool call still running when its turn ends reports, in every engine and when the
# session cuts a turn whose graceful stop ran out of time.
STOPPED_TOOL = "Stopped before the tool finished."
CUT_TOOL = "The turn ended before the tool finished."


@dataclass(frozen=True)
class TurnRequest:
    """Everything an engine needs for one turn: a new user message in a chat."""

    chat_id: str
    text: str
    persona: Persona
    model_alias: str
    model_id: str
    # The chat's earlier messages, oldest first (engines that keep their own context
    # may ignore them, except to rebuild it).
    history: Sequence[PastMessage] = ()
    anonymous: bool = True
    # The post the chat was started from, if any: the agent should know the reader's context.
    post: Post | None = None
    # The chat's last turn was replaced (regenerated, or its question edited): `history`
    # no longer ends as the engine's own context does, so an engine that keeps one must
    # rebuild it from `history`.
    rewritten: bool = False


@dataclass(frozen=True)
class ThinkingDelta:
    """A piece of extended-thinking text."""

    text: str


@dataclass(frozen=True)
class TextDelta:
    """A piece of answer text."""

    text: str


@dataclass(frozen=True)
class ToolStarted:
    """The agent called a tool (`name` is the plain tool name)."""

    tool_use_id: str
    name: str
    input: dict[str, object]


@dataclass(frozen=True)
class ToolFinished:
    """A tool call returned."""

    tool_use_id: str
    output: str
    is_error: bool = False


@dataclass(frozen=True)
class TurnFailed:
    """Why a turn could not finish, in words for the reader, and whether trying again may
    help. As an event, a TurnEnded with reason "error" follows it."""

    message: str
    retryable: bool = True
    code: ErrorCode = "model_error"
    # Whether the engine tries the turn again itself before anyone sees the failure (the
    # Claude engine: a crashed or stalled agent process, not a failed model request,
    # which its CLI already retried).
    engine_retries: bool = False
    # What was observed, for the logs only.
    detail: str = ""

    def because(self, detail: str) -> TurnFailed:
        """The same failure with what was observed, for the logs."""
        return replace(self, detail=detail)


@dataclass(frozen=True)
class Retrying:
    """The provider failed and the turn will try again: for the readers' `status` only.

    `attempt` is the attempt about to start (2 for the first retry), of `max_attempts`.
    """

    attempt: int
    max_attempts: int
    delay: float


@dataclass(frozen=True)
class TurnEnded:
    """The turn is over; always the last event.

    `model` is the model that answered, as the provider named it; `stop_reason` is the
    provider's reason for the last response of the turn, when there was one. Input tokens
    include the cached ones, which are also counted apart.
    """

    reason: DoneReason
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    warning: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)
    stop_reason: str | None = None
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    # Input tokens of the turn's last model request: the size the conversation has reached
    # (a chat past `BLOGCHAT_CHAT_CONTEXT_LIMIT` takes no more messages). 0: not known.
    context_tokens: int = 0


@dataclass(frozen=True)
class ModelCall:
    """One request to the model, reported once it is over: for telemetry only.

    Sessions pass it to the turn's trace and never to readers. Times are epoch seconds.
    """

    model: str
    started_at: float
    ended_at: float
    # What this request added to the conversation: the prompt, or the tool results.
    input: object = None
    # What the model answered: {"role": "assistant", "content": [blocks]}, if anything.
    output: object = None
    # Input tokens include the cached ones (read from or written to the cache).
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    first_token_at: float | None = None
    stop_reason: str | None = None
    # The provider's error (or why the response was cut short); None when it succeeded.
    error: str | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class Exchange:
    """The turn's messages in the Messages API's shape, exactly as the provider saw them
    (assistant messages with thinking blocks and their signatures, user messages with tool
    results), ending with what the reader was shown. The session keeps them with the
    answer, and hands them back in `PastMessage.content`: the database history is the
    conversation. Sent once, before TurnEnded, by engines that have it."""

    messages: tuple[Mapping[str, Any], ...]


EngineEvent = (
    ThinkingDelta
    | TextDelta
    | ToolStarted
    | ToolFinished
    | ModelCall
    | Exchange
    | Retrying
    | TurnFailed
    | TurnEnded
)


class AgentEngine(ABC):
    """Runs turns for chat sessions. One engine serves every chat of the process."""

    name: str

    @property
    def capacity(self) -> int | None:
        """How many turns it can run at once (None: as many as asked)."""
        return None

    @abstractmethod
    def run_turn(
        self, request: TurnRequest, stop: asyncio.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        """Stream one turn's events, ending with TurnEnded.

        When `stop` is set, finish the current sentence or tool call, then end with
        reason "stopped". The caller may also cancel the iteration outright (a hard
        stop after the graceful one took too long); the engine must then clean up.
        """

    def start(self) -> None:  # noqa: B027 - optional hook
        """The app is up: begin whatever the engine prepares ahead (without waiting for it)."""

    def new_chat_id(self, persona: Persona, model_id: str) -> str:
        """The id of a chat about to be created with this persona and model.

        An engine that prepared something ahead for such a chat (an agent process started
        in advance) hands out the id it prepared it under; otherwise a fresh one.
        """
        return str(uuid.uuid4())

    def prepare(self, chat_id: str, persona: Persona, model_id: str) -> None:  # noqa: B027
        """A reader opened this chat: get ready for its next turn, if that costs no one."""

    async def release(self, chat_id: str) -> None:  # noqa: B027 - optional hook
        """The chat's session closed: free whatever the engine keeps for it."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Shut down: free everything."""
