"""Scripted partners for in-process tests of the Claude engine, with no CLI process.

`ScriptedAgent` stands in for an agent process under an `Attempt`: it replays inbox items
(recorded from the real CLI, see recorded_stream.py) and a few cues between them. `Member`
stands in for an agent process in the `ProcessPool`: it starts and closes when the test
says so.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from claude_agent_sdk import ResultMessage

from blogchat.engines.claude.process import WAKE, AgentSpec, Inbound, ProcessState


@dataclass(frozen=True)
class PressStop:
    """Cue: the reader presses stop (the engine then puts a WAKE in the inbox)."""


@dataclass(frozen=True)
class Silence:
    """Cue: nothing arrives for the whole wait, while `tools_running` of our tools run."""

    tools_running: int = 0


Cue = Inbound | PressStop | Silence


class ScriptedAgent:
    """An agent process that answers a prompt with a script of inbox items and cues.

    When interrupted, it goes on with `after_interrupt` if given (what the CLI sent after
    an interrupt when the script was recorded), else with the rest of the script.
    """

    def __init__(
        self,
        script: Iterable[Cue],
        stop: asyncio.Event,
        *,
        after_interrupt: Iterable[Cue] | None = None,
        fail_query: BaseException | None = None,
    ) -> None:
        self.spec = AgentSpec("chat-1", "claude-haiku-4-5", "You help readers.", ())
        self.tools_running = 0
        self.owed_results = 0
        self.alive = True
        self.prompts: list[str] = []
        # How many inbox items had been received when the attempt interrupted, if it did.
        self.interrupted_after: int | None = None
        self.received = 0
        # How long the attempt was ready to wait at each `Silence`.
        self.silent_waits: list[float | None] = []
        self._script = deque(script)
        self._after_interrupt = list(after_interrupt) if after_interrupt is not None else None
        self._stop = stop
        self._fail_query = fail_query

    async def query(self, prompt: str) -> None:
        """Take the prompt (or fail to, when told to)."""
        if self._fail_query is not None:
            raise self._fail_query
        self.prompts.append(prompt)
        self.owed_results += 1

    async def receive(self, within: float | None) -> Inbound:
        """The next scripted item; TimeoutError at a `Silence` or when the script ran out."""
        self.tools_running = 0
        if not self._script:
            raise TimeoutError
        cue = self._script.popleft()
        if isinstance(cue, Silence):
            self.silent_waits.append(within)
            self.tools_running = cue.tools_running
            raise TimeoutError
        if isinstance(cue, PressStop):
            self._stop.set()
            return WAKE
        self.received += 1
        if isinstance(cue, ResultMessage):
            self.owed_results -= 1
        return cue

    def interrupt(self) -> None:
        """Note the interrupt; the CLI's answer to it comes next."""
        if self.interrupted_after is not None:
            return
        self.interrupted_after = self.received
        if self._after_interrupt is not None:
            self._script = deque(self._after_interrupt)


class Member:
    """A pool member whose start and close finish when the test lets them."""

    def __init__(self, spec: AgentSpec, *, instant: bool = True) -> None:
        self.spec = spec
        self.state = ProcessState.STARTING
        self.retire = False
        self.spare = False
        self.last_used = 0.0
        self.start_error: BaseException | None = None
        self.starting = asyncio.Event()
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.killed = False
        # Let the start, or the close, finish (set at once unless `instant` is False).
        self.may_start = asyncio.Event()
        self.may_close = asyncio.Event()
        if instant:
            self.may_start.set()
            self.may_close.set()
        self.fail_start: BaseException | None = None
        self.settles = True
        self.alive = False

    def __repr__(self) -> str:
        return f"<Member {self.spec.chat_id} {self.state.value}>"

    @property
    def pid(self) -> int | None:
        """No real process."""
        return None

    async def start(self) -> None:
        """Start once allowed to (or fail as told)."""
        self.starting.set()
        await self.may_start.wait()
        if self.fail_start is not None:
            raise self.fail_start
        self.alive = True
        self.started.set()

    async def settle(self, within: float) -> bool:
        """Whether the process got back to idle after a turn was cut off (as told)."""
        return self.settles and self.alive

    async def close(self, *, grace: float) -> None:
        """Exit once allowed to (a kill allows it)."""
        await self.may_close.wait()
        self.alive = False
        self.state = ProcessState.CLOSED
        self.closed.set()

    def kill(self) -> None:
        """SIGKILL stands in: the close finishes at once."""
        self.killed = True
        self.may_close.set()
