"""One chat's agent process: the Claude Code CLI, driven through a ClaudeSDKClient."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, Message, ResultMessage

log = logging.getLogger(__name__)

# After interrupt(), the CLI ends the turn within tens of milliseconds; give it this long
# before a close goes ahead anyway.
INTERRUPT_WAIT = 0.3
# How long a killed CLI may take to be reaped before we give up on it.
KILL_WAIT = 5.0


class ProcessState(enum.Enum):
    """Where an agent process is in its life."""

    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    CLOSING = "closing"
    CLOSED = "closed"


@dataclass(frozen=True)
class AgentSpec:
    """What a chat's process is started with; when any of it changes, the process is replaced."""

    chat_id: str
    model_id: str
    system_prompt: str
    tools: tuple[str, ...]


class Wake:
    """Put in an inbox to make the turn reading it look at its stop event and tools again."""


WAKE = Wake()


@dataclass(frozen=True)
class Ended:
    """The CLI's message stream ended: the process exited or the client was closed."""

    error: BaseException | None = None


Inbound = Message | Wake | Ended


def _cli_of(client: ClaudeSDKClient) -> Any:
    # The SDK keeps the CLI's process object private, but only it lets us kill a CLI that
    # hangs on close, and tell its pid to the benchmark and the tests.
    transport = getattr(client, "_transport", None)
    return getattr(transport, "_process", None)


@dataclass(frozen=True)
class Launch:
    """How to start a chat's CLI: its options, and whether it resumes a stored transcript."""

    options: ClaudeAgentOptions
    resumed: bool
    # Files the CLI writes for this chat that are useless once it exits.
    local_files: tuple[Path, ...] = ()


Prepare = Callable[["AgentProcess"], Awaitable[Launch]]


class AgentProcess:
    """A CLI process for one chat, with the inbox its messages arrive in."""

    def __init__(
        self,
        spec: AgentSpec,
        prepare: Prepare,
        *,
        on_start_failed: Callable[[AgentProcess], None] | None = None,
    ) -> None:
        self.spec = spec
        self._prepare = prepare
        self._on_start_failed = on_start_failed
        self.state = ProcessState.STARTING
        self.client: ClaudeSDKClient | None = None
        self.launch: Launch | None = None
        self.inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        # Prompts sent whose ResultMessage has not been read yet.
        self.owed_results = 0
        # Calls of our tools running right now (the CLI sends nothing while they run).
        self.tools_running = 0
        self.turns = 0
        # Where the chat's stored transcript ended when this process last held all of it:
        # when it loaded it, and after each of its turns (see ClaudeEngine.run_turn).
        self.synced = 0
        self.last_used = time.monotonic()
        # Close this process when its turn ends instead of keeping it.
        self.retire = False
        # Started ahead for a chat that does not exist yet (see ProcessPool.claim_spare).
        self.spare = False
        self.start_seconds = 0.0
        self.start_error: BaseException | None = None
        self._cli: Any = None
        self._reader: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<AgentProcess chat={self.spec.chat_id} pid={self.pid} {self.state.value}>"

    @property
    def pid(self) -> int | None:
        """The CLI's process id, once started."""
        return getattr(self._cli, "pid", None)

    @property
    def alive(self) -> bool:
        """Whether the CLI process is running."""
        return self._cli is not None and self._cli.returncode is None

    @property
    def resumed(self) -> bool:
        """Whether the process continues a transcript from the store."""
        return self.launch is not None and self.launch.resumed

    async def start(self) -> None:
        """Spawn the CLI, run the SDK's handshake and start reading its messages."""
        started = time.monotonic()
        self.launch = await self._prepare(self)
        self.client = ClaudeSDKClient(self.launch.options)
        try:
            await self.client.connect()
        except BaseException:
            if self._on_start_failed is not None:
                self._on_start_failed(self)
            raise
        self._cli = _cli_of(self.client)
        self._reader = asyncio.create_task(self._read(), name=f"agent-reader-{self.spec.chat_id}")
        self.start_seconds = time.monotonic() - started

    async def _read(self) -> None:
        assert self.client is not None
        error: BaseException | None = None
        try:
            async for message in self.client.receive_messages():
                self.inbox.put_nowait(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
        finally:
            self.inbox.put_nowait(Ended(error))

    async def query(self, prompt: str) -> None:
        """Send a user message; its turn ends with a ResultMessage."""
        assert self.client is not None
        self.owed_results += 1
        self.turns += 1
        await self.client.query(prompt)

    async def receive(self, within: float | None) -> Inbound:
        """The next thing in the inbox; raises TimeoutError after `within` seconds."""
        item = await asyncio.wait_for(self.inbox.get(), within)
        if isinstance(item, ResultMessage):
            self.owed_results -= 1
        return item

    def tool_started(self) -> None:
        """One of our tools started running for this process."""
        self.tools_running += 1

    def tool_finished(self) -> None:
        """One of our tools returned (or was cancelled)."""
        self.tools_running -= 1
        self.inbox.put_nowait(WAKE)

    def interrupt(self) -> asyncio.Task[None]:
        """Ask the CLI to abandon its turn, in the background (the SDK call can hang)."""
        return asyncio.create_task(self._interrupt(), name=f"agent-interrupt-{self.spec.chat_id}")

    async def _interrupt(self) -> None:
        if self.client is None:
            return
        try:
            await self.client.interrupt()
        except Exception as exc:
            log.debug("chat %s: interrupt failed: %r", self.spec.chat_id, exc)

    async def settle(self, within: float) -> bool:
        """After a turn that ended early: interrupt and read up to its result.

        Returns whether the process is ready for the next prompt.
        """
        if self.owed_results <= 0:
            return self.alive
        self.interrupt()
        deadline = time.monotonic() + within
        while self.owed_results > 0:
            try:
                item = await self.receive(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return False
            if isinstance(item, Ended):
                return False
        return self.alive

    async def close(self, *, grace: float) -> None:
        """Disconnect; kill the CLI if it has not exited `grace` seconds later."""
        if self.state is ProcessState.CLOSED:
            return
        self.state = ProcessState.CLOSING
        if self.client is None:
            self.state = ProcessState.CLOSED
            return
        if self.owed_results > 0 and self.alive:
            # A disconnect in the middle of a turn waits 5 s for the CLI; after an
            # interrupt it takes milliseconds.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.interrupt()), INTERRUPT_WAIT)
        disconnect = asyncio.create_task(
            self.client.disconnect(), name=f"agent-disconnect-{self.spec.chat_id}"
        )
        done, _ = await asyncio.wait({disconnect}, timeout=grace)
        if not done:
            log.warning(
                "chat %s: agent process %s hangs on close; killing it", self.spec.chat_id, self.pid
            )
            self.kill()
            done, _ = await asyncio.wait({disconnect}, timeout=KILL_WAIT)
        if done:
            if not disconnect.cancelled() and disconnect.exception() is not None:
                log.debug(
                    "chat %s: disconnect failed: %r", self.spec.chat_id, disconnect.exception()
                )
        else:
            log.error("chat %s: agent process %s did not exit", self.spec.chat_id, self.pid)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        self.state = ProcessState.CLOSED
        for path in self.launch.local_files if self.launch else ():
            # The store holds the transcript; the CLI's own copy would only pile up.
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL the CLI (for one that does not exit on its own)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self._cli.kill()
