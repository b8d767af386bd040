"""The AgentEngine interface: what a chat session asks of a model, and what it gets back."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from blogchat.content import Post
from blogchat.personas import Persona
from blogchat.protocol import DoneReason
from blogchat.store import MessageRecord


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
    history: Sequence[MessageRecord] = ()
    anonymous: bool = True
    # The post the chat was started from, if any: the agent should know the reader's context.
    post: Post | None = None


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
    """The turn cannot go on (the provider failed); a TurnEnded with reason "error" follows."""

    message: str
    retryable: bool = True
    code: Literal["model_error", "internal"] = "model_error"


@dataclass(frozen=True)
class TurnEnded:
    """The turn is over; always the last event."""

    reason: DoneReason
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    warning: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)


EngineEvent = ThinkingDelta | TextDelta | ToolStarted | ToolFinished | TurnFailed | TurnEnded


class AgentEngine(ABC):
    """Runs turns for chat sessions. One engine serves every chat of the process."""

    name: str

    @abstractmethod
    def run_turn(self, request: TurnRequest, stop: asyncio.Event) -> AsyncIterator[EngineEvent]:
        """Stream one turn's events, ending with TurnEnded.

        When `stop` is set, finish the current sentence or tool call, then end with
        reason "stopped". The caller may also cancel the iteration outright (a hard
        stop after the graceful one took too long); the engine must then clean up.
        """

    async def release(self, chat_id: str) -> None:  # noqa: B027 - optional hook
        """The chat's session closed: free whatever the engine keeps for it."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Shut down: free everything."""
