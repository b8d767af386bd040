"""The Claude engine: chats run on Claude through the Claude Agent SDK and its CLI.

Each active chat has a long-lived CLI process (see pool.py) started with the persona's
system prompt, only the persona's blog tools (an in-process MCP server per process),
extended thinking and partial messages. Transcripts are mirrored to our database, so a
chat whose process was reclaimed, or that outlived a restart, resumes its context.
docs/claude.md explains the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from claude_agent_sdk import (
    ClaudeAgentOptions,
    McpSdkServerConfig,
    SdkMcpTool,
    ThinkingConfig,
    create_sdk_mcp_server,
    project_key_for_directory,
)

from blogchat import policy
from blogchat.content import Post
from blogchat.engines.base import (
    CUT_TOOL,
    STOPPED_TOOL,
    AgentEngine,
    EngineEvent,
    PastMessage,
    Retrying,
    ToolFinished,
    TurnEnded,
    TurnFailed,
    TurnRequest,
)
from blogchat.engines.claude import failures
from blogchat.engines.claude.confinement import AgentDirs, agent_environment
from blogchat.engines.claude.pool import ProcessPool, StartFailed
from blogchat.engines.claude.process import WAKE, AgentProcess, AgentSpec, Launch
from blogchat.engines.claude.stream import SERVER, TOOL_PREFIX
from blogchat.engines.claude.turn import CUT_SHORT, DRAIN, Attempt, CutReason, Tally
from blogchat.personas import Persona
from blogchat.protocol import DoneReason
from blogchat.settings import MIN_THINKING_BUDGET, Settings
from blogchat.store.transcripts import TranscriptStore
from blogchat.tools import BlogTools

log = logging.getLogger(__name__)

# The earlier conversation handed to a chat that has no stored transcript, at most.
MAX_CONTEXT_CHARS = 40_000
INTERRUPTED = (
    "The server stopped while you were answering; the reader saw your answer only up to "
    "where it breaks off below."
)
# What the reader is told when the model's answer ended early (done.warning).
CUT_SHORT_WARNINGS: dict[CutReason, str] = {
    "refusal": "Claude declined to go on with this answer, so it ends here.",
    "max_tokens": (
        "This answer reached the length limit for one reply and was cut off. "
        "Ask the assistant to go on if you need more."
    ),
}


def interrupted_exchange(history: Sequence[PastMessage]) -> str | None:
    """The chat's last exchange, if its answer was cut off by the death of the process
    writing it (a crash or restart, or the instance that owned the chat), as a block for
    the next prompt: the stored transcript is mirrored once per turn, at its end, so it
    never got that question nor the part of the answer the reader saw."""
    cut: list[PastMessage] = []
    for message in reversed(history):
        if message.role == "assistant" and not message.incomplete:
            break
        cut.append(message)
    if not any(message.incomplete for message in cut):
        return None
    lines = [
        f"{'Reader' if message.role == 'user' else 'You'}: {message.text}"
        for message in reversed(cut)
    ]
    exchange = "\n\n".join(lines)[-MAX_CONTEXT_CHARS:]
    return f"<interrupted_exchange>\n{INTERRUPTED}\n\n{exchange}\n</interrupted_exchange>"


def post_context(post: Post, tools: tuple[str, ...]) -> str:
    """What the reader is looking at, for a chat opened from a post.

    It goes with the chat's first prompt rather than into the system prompt, so that the
    system prompt is the persona's alone and a spare process fits any new chat.
    """
    context = (
        f"The reader opened this chat from the post “{post.title}” by {post.author.name} "
        f"({post.date.isoformat()}), at {post.url}. When they say “this post” they mean it."
    )
    if "getPost" in tools:
        context += f" Read it with getPost (slug “{post.slug}”) when you need its text."
    return f"<post_context>\n{context}\n</post_context>"


class ClaudeEngine(AgentEngine):
    """Runs turns on Claude, one CLI process per active chat."""

    name = "claude"

    def __init__(
        self,
        settings: Settings,
        tools: BlogTools,
        transcripts: TranscriptStore,
        spare_persona: Persona | None = None,
    ) -> None:
        self.settings = settings
        self.tools = tools
        self.transcripts = transcripts
        # Spares are started for new chats of this persona, on the model it gives anonymous
        # readers (a registered reader's chat fits them too when it uses that model).
        self._spare_persona = spare_persona
        root = (settings.agent_dir or settings.data_dir / "agent").resolve()
        # With several instances each has directories of its own (on one machine they
        # would clash), removed when it shuts down unless configured.
        self._own_dir: Path | None = None
        own = settings.agent_config_dir
        if own is None and settings.redis_url is not None:
            own = self._own_dir = root / "instances" / settings.instance_id
        self.dirs = AgentDirs(root, (own or root).resolve())
        self.dirs.create()
        # A stable working directory: the transcripts' project key derives from it.
        self.workdir = self.dirs.workdir
        self.config_dir = self.dirs.config
        self.project_key = project_key_for_directory(self.workdir)
        self.pool: ProcessPool[AgentProcess] = ProcessPool(
            self._new_process,
            cap=settings.max_live_clients,
            idle_seconds=settings.client_idle_seconds,
            parallel_starts=settings.max_parallel_starts or os.cpu_count() or 2,
            spares=settings.spare_processes,
            spare_spec=self._spare_spec if spare_persona is not None else None,
        )
        # Chats whose transcript could not be resumed: their next process starts over.
        self._start_over: set[str] = set()

    # --- the AgentEngine interface ------------------------------------------------------

    async def run_turn(
        self, request: TurnRequest, stop: asyncio.Event
    ) -> AsyncGenerator[EngineEvent, None]:
        """Stream one turn. A failed model request is retried by the CLI; a turn whose agent
        process failed before anything streamed is retried here, from the conversation as
        it was before the failed attempt."""
        spec = self._spec(request)
        tally = Tally()
        retries = self.settings.provider_retries
        delay = self.settings.provider_retry_delay
        outcome: DoneReason = "error"
        failure: TurnFailed | None = None
        if request.rewritten:
            await self._forget_context(request.chat_id)
        while True:
            # Where the stored conversation ends before this attempt: a retry goes back here.
            mark = await self.transcripts.mark(self.project_key, request.chat_id)
            try:
                process, mark = await self._acquire_current(spec, stop, mark)
            except StartFailed as exc:
                outcome, failure = "error", failures.NOT_STARTED.because(str(exc))
            else:
                if process is None:
                    outcome, failure = "stopped", None
                    break
                attempt = Attempt(
                    process,
                    self._prompt(request, process),
                    stop,
                    tally,
                    stall_seconds=self.settings.stall_seconds,
                    retry_max_wait=self.settings.provider_retry_max_wait,
                )
                async with contextlib.aclosing(self._attempt(attempt, process)) as events:
                    async for event in events:
                        yield event
                assert attempt.outcome is not None  # Decided before its events end.
                outcome, failure = attempt.outcome, attempt.failure
            if (
                outcome != "error"
                or failure is None
                or not failure.engine_retries
                or tally.forwarded
                or retries <= 0
            ):
                break
            log.info("chat %s: retrying in %.1f s after %s", request.chat_id, delay, failure.detail)
            yield Retrying(
                attempt=tally.attempts + 1,
                max_attempts=tally.attempts + retries,
                delay=delay,
            )
            await self._rewind(request.chat_id, mark)
            if await _stopped_within(stop, delay):
                outcome, failure = "stopped", None
                break
            retries -= 1
            delay *= 2
        note = STOPPED_TOOL if outcome == "stopped" else CUT_TOOL
        for tool_use_id in tally.open_tools:
            yield ToolFinished(tool_use_id, note, is_error=True)
        if failure is not None and outcome == "error":
            log.warning("chat %s: turn failed: %s", request.chat_id, failure.detail)
            yield failure
        yield self._ended(request, outcome, tally)

    @property
    def capacity(self) -> int:
        """One turn per agent process, and no more processes than the cap."""
        return self.pool.cap

    def start(self) -> None:
        """Start the spare processes in the background."""
        self.pool.start_spares()

    def new_chat_id(self, persona: Persona, model_id: str) -> str:
        """A spare's id when one fits the new chat (its first turn then starts at once)."""
        wanted = self._spec_for("", persona, model_id)
        claimed = self.pool.claim_spare(lambda spec: replace(spec, chat_id="") == wanted)
        if claimed is None:
            return super().new_chat_id(persona, model_id)
        log.debug("new chat %s takes a spare agent process", claimed)
        return claimed

    def prepare(self, chat_id: str, persona: Persona, model_id: str) -> None:
        """Start the chat's process now (resuming its transcript) if there is free room, so
        that a reader who comes back to a chat does not wait for a start when they ask."""
        if self.pool.prestart(self._spec_for(chat_id, persona, model_id)):
            log.debug("chat %s: its agent process starts ahead of the next question", chat_id)

    async def release(self, chat_id: str) -> None:
        """The chat's session closed: its process goes (its transcript stays in the store)."""
        await self.pool.forget(chat_id)

    async def aclose(self) -> None:
        """Close every process (and this instance's own directories, if they are ours)."""
        await self.pool.aclose()
        if self._own_dir is not None:
            await asyncio.to_thread(shutil.rmtree, self._own_dir, ignore_errors=True)

    # --- a turn's pieces ----------------------------------------------------------------

    def _spec(self, request: TurnRequest) -> AgentSpec:
        return self._spec_for(request.chat_id, request.persona, request.model_id)

    def _spec_for(self, chat_id: str, persona: Persona, model_id: str) -> AgentSpec:
        tools = tuple(tool.name for tool in self.tools.allowed(persona.allowed_tools))
        return AgentSpec(
            chat_id=chat_id, model_id=model_id, system_prompt=persona.system_prompt, tools=tools
        )

    def _spare_spec(self) -> AgentSpec:
        persona = self._spare_persona
        assert persona is not None  # No spares are kept without it.
        model = policy.model_id(self.settings, policy.default_for(persona, anonymous=True))
        return self._spec_for(str(uuid.uuid4()), persona, model)

    async def _attempt(
        self, attempt: Attempt, process: AgentProcess
    ) -> AsyncGenerator[EngineEvent, None]:
        """Run one attempt on `process`, then hand the process back to the pool."""
        wake = asyncio.create_task(_wake_on(attempt.stop, process))
        finished = False
        try:
            async with contextlib.aclosing(attempt.events()) as events:
                async for event in events:
                    yield event
            finished = True
        finally:
            wake.cancel()
            if not finished:
                # Cut off mid-attempt (a hard stop, or the session closed): settle the
                # process in the background, so the chat's next turn finds it ready.
                self.pool.recover(process, DRAIN * 2, on_lost=self._lost_mid_turn)
        if attempt.settled:
            # The turn's transcript is stored (the SDK writes it before the result).
            process.synced = await self.transcripts.mark(self.project_key, process.spec.chat_id)
            await self.pool.give_back(process)
        else:
            self._lost_mid_turn(process)
            await self.pool.discard(process)

    async def _acquire_current(
        self, spec: AgentSpec, stop: asyncio.Event, mark: int
    ) -> tuple[AgentProcess | None, int]:
        """The chat's process, holding the whole stored conversation, and where that ends
        now. A warm process is used only if the stored transcript has not grown since its
        last turn: if it has, the chat ran elsewhere meanwhile (another instance took it
        over), and a new process resumes the transcript instead."""
        while True:
            process = await self._acquire(spec, stop)
            if process is None or process.synced == mark:
                return process, mark
            # (A process started just now read the transcript after `mark` was taken.)
            mark = await self.transcripts.mark(self.project_key, spec.chat_id)
            if process.synced == mark:
                return process, mark
            log.info(
                "chat %s: it ran elsewhere since its agent process last saw it; resuming",
                spec.chat_id,
            )
            await self.pool.discard(process)
            await self.pool.gone(spec.chat_id)
            mark = await self.transcripts.mark(self.project_key, spec.chat_id)

    async def _acquire(self, spec: AgentSpec, stop: asyncio.Event) -> AgentProcess | None:
        """The chat's process, or None if the reader stopped the turn while waiting for it."""
        acquiring = asyncio.ensure_future(self.pool.acquire(spec))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({acquiring, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not acquiring.done():
                acquiring.cancel()
                # The pool may hand the process over just as we give up: put it back.
                acquiring.add_done_callback(self._return_unused)
        if not acquiring.done() or acquiring.cancelled():
            return None
        process = acquiring.result()
        if stop.is_set():
            await self.pool.give_back(process)
            return None
        return process

    async def _rewind(self, chat_id: str, mark: int) -> None:
        """Before a retry: close the chat's process and cut its stored conversation back to
        `mark`, so the next attempt's process resumes it as it was before the failed one
        (the CLI keeps a failed prompt in its conversation: resent into the same process,
        the question would appear twice)."""
        process = self.pool.get(chat_id)
        if process is not None:
            await self.pool.discard(process)
        await self.pool.gone(chat_id)
        await self.transcripts.truncate(self.project_key, chat_id, after=mark)
        # What was cut is gone: the transcript is sound again.
        self._start_over.discard(chat_id)

    async def _forget_context(self, chat_id: str) -> None:
        """The chat's last turn was replaced: its process and stored transcript still hold
        it, so both go, and the next process starts over from the chat's own messages."""
        process = self.pool.get(chat_id)
        if process is not None:
            await self.pool.discard(process)
        await self.pool.gone(chat_id)
        self._start_over.add(chat_id)

    def _return_unused(self, acquiring: asyncio.Future[AgentProcess]) -> None:
        if not acquiring.cancelled() and acquiring.exception() is None:
            self.pool.recover(acquiring.result(), DRAIN)

    def _prompt(self, request: TurnRequest, process: AgentProcess) -> str:
        """The prompt. The first one of a process that starts a conversation afresh also
        carries the post the chat was opened from and, for a chat with no stored
        transcript, the conversation so far; the first one of a process that resumes the
        stored transcript carries the exchange cut off after it, if any."""
        if process.turns:
            return request.text
        if process.resumed:
            cut = interrupted_exchange(request.history)
            return request.text if cut is None else f"{cut}\n\n{request.text}"
        parts = []
        if request.post is not None:
            parts.append(post_context(request.post, process.spec.tools))
        lines = [
            f"{'Reader' if message.role == 'user' else 'You'}: {message.text.strip()}"
            for message in request.history
            if message.text.strip()
        ]
        if lines:
            earlier = "\n\n".join(lines)[-MAX_CONTEXT_CHARS:]
            parts.append(f"<earlier_conversation>\n{earlier}\n</earlier_conversation>")
        return "\n\n".join([*parts, request.text])

    def _ended(self, request: TurnRequest, outcome: DoneReason, tally: Tally) -> TurnEnded:
        warning = None
        if outcome == "max_turns":
            warning = (
                f"The assistant reached its limit of {self.settings.max_turns} steps for one "
                "message, so this answer may be incomplete. Ask it to go on if you need more."
            )
        elif outcome == "complete" and (cut := CUT_SHORT.get(tally.stop_reason)) is not None:
            warning = CUT_SHORT_WARNINGS[cut]
        metadata: dict[str, object] = {"engine": self.name, "attempts": tally.attempts}
        if tally.result is not None:
            metadata.update(
                num_turns=tally.result.num_turns,
                cost_usd=tally.result.total_cost_usd,
                terminal_reason=tally.result.terminal_reason,
            )
        return TurnEnded(
            reason=outcome,
            # The model that answered, as the provider says in message_start.
            model=tally.model or request.model_id,
            input_tokens=tally.input_tokens,
            output_tokens=tally.output_tokens,
            warning=warning,
            metadata=metadata,
            stop_reason=tally.stop_reason if outcome != "stopped" else None,
            cache_read_tokens=tally.cache_read_tokens,
            cache_creation_tokens=tally.cache_creation_tokens,
            context_tokens=tally.context_tokens,
        )

    # --- processes ----------------------------------------------------------------------

    def _new_process(self, spec: AgentSpec) -> AgentProcess:
        return AgentProcess(spec, self._prepare, on_start_failed=self._start_failed)

    async def _prepare(self, process: AgentProcess) -> Launch:
        """Options for a chat's new process: resume its stored transcript if there is one."""
        chat_id = process.spec.chat_id
        if chat_id in self._start_over:
            # Its first prompt carries the conversation instead (see _prompt).
            self._start_over.discard(chat_id)
            await self.transcripts.delete({"project_key": self.project_key, "session_id": chat_id})
        resumed = await self.transcripts.has_session(self.project_key, chat_id)
        process.synced = await self.transcripts.mark(self.project_key, chat_id)
        local = self.config_dir / "projects" / self.project_key
        local_files = (local / f"{chat_id}.jsonl", local / chat_id)
        if not resumed:
            # A copy left by a process that was killed would make the CLI refuse the id.
            _remove(local_files)
        return Launch(self._options(process, resumed=resumed), resumed, local_files)

    def _options(self, process: AgentProcess, *, resumed: bool) -> ClaudeAgentOptions:
        spec = process.spec
        settings = self.settings
        # Each of these was checked against the bundled CLI (docs/claude.md, "Exactly what
        # the app decided"); tests/test_claude_exactness.py keeps checking it.
        flags = {
            # No update checks, telemetry or session-title requests: only the agent loop.
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            # Otherwise the CLI hides MCP tools behind its own ToolSearch tool.
            "ENABLE_TOOL_SEARCH": "false",
            # The CLI retries a failed model request itself, honouring retry-after.
            "CLAUDE_CODE_MAX_RETRIES": str(settings.provider_retries),
            # Send the configured model id as it is: not mapped onto a newer model, and no
            # other model after a refusal.
            "CLAUDE_CODE_DISABLE_LEGACY_MODEL_REMAP": "1",
            "CLAUDE_CODE_DISABLE_REFUSAL_FALLBACK": "1",
            # After a refusal the turn ends with it: no second request of the CLI's own.
            "CLAUDE_CODE_DISABLE_REFUSAL_RETRY": "1",
            # max_tokens from our settings, and the thinking budget below, not the CLI's
            # defaults for the model.
            "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(settings.max_output_tokens),
            "CLAUDE_CODE_DISABLE_ADAPTIVE_THINKING": "1",
        }
        thinking: ThinkingConfig = {"type": "disabled"}
        if settings.thinking_budget:
            thinking = {
                "type": "enabled",
                "budget_tokens": max(MIN_THINKING_BUDGET, settings.thinking_budget),
                # Newer models return no thinking text unless asked for a summary.
                "display": "summarized",
            }
        return ClaudeAgentOptions(
            system_prompt=spec.system_prompt,
            # No built-in tool at all (Bash, Read, WebFetch, ToolSearch, ...): only the
            # persona's blog tools, which the MCP server below is the only source of.
            tools=[],
            allowed_tools=[f"{TOOL_PREFIX}{name}" for name in spec.tools],
            mcp_servers={SERVER: self._mcp_server(process)},
            strict_mcp_config=True,
            setting_sources=[],
            cwd=str(self.workdir),
            # Started through our launcher, with nothing of the server's environment.
            cli_path=self.dirs.launcher,
            env=agent_environment(settings, self.dirs, flags),
            # A reader's text is delivered as written: no slash command, no @file.
            verbatim_prompts=True,
            extra_args={
                # And no command or skill exists to dispatch to, should that ever change.
                "disable-slash-commands": None,
                # No environment section (working directory, OS, shell) in the prompt.
                "bare": None,
            },
            model=spec.model_id,
            include_partial_messages=True,
            max_turns=settings.max_turns,
            thinking=thinking,
            session_store=self.transcripts,
            # The chat id is the session id: the store keeps the transcript under it.
            resume=spec.chat_id if resumed else None,
            session_id=None if resumed else spec.chat_id,
            stderr=lambda line: log.debug("chat %s: cli: %s", spec.chat_id, line.rstrip()),
        )

    def _mcp_server(self, process: AgentProcess) -> McpSdkServerConfig:
        """A server of its own for each process, holding only the persona's tools."""
        allowed = process.spec.tools
        tools: list[SdkMcpTool[Any]] = [
            SdkMcpTool(
                name=tool.name,
                description=tool.description,
                input_schema=tool.input_schema,
                handler=self._tool_handler(tool.name, allowed, process),
            )
            for tool in self.tools.allowed(allowed)
        ]
        return create_sdk_mcp_server(SERVER, tools=tools)

    def _tool_handler(self, name: str, allowed: tuple[str, ...], process: AgentProcess) -> Any:
        async def handle(arguments: dict[str, Any]) -> dict[str, Any]:
            process.tool_started()
            try:
                # BlogTools.call refuses any tool the persona does not list.
                result = await asyncio.to_thread(self.tools.call, name, arguments, allowed)
            finally:
                process.tool_finished()
            return {
                "content": [{"type": "text", "text": result.output}],
                "is_error": result.is_error,
            }

        return handle

    def _lost_mid_turn(self, process: AgentProcess) -> None:
        # A process that goes without finishing its turn (killed, crashed, hung) may have
        # stored the question but not what the reader was shown of the answer: the chat's
        # next process starts over from our own saved messages instead of that transcript.
        log.info(
            "chat %s: agent process lost mid-turn; its next one starts over", process.spec.chat_id
        )
        self._start_over.add(process.spec.chat_id)

    def _start_failed(self, process: AgentProcess) -> None:
        if process.resumed:
            log.warning(
                "chat %s: its stored transcript could not be resumed; the next process starts "
                "over from the chat's messages",
                process.spec.chat_id,
            )
            self._start_over.add(process.spec.chat_id)


async def _wake_on(stop: asyncio.Event, process: AgentProcess) -> None:
    await stop.wait()
    process.inbox.put_nowait(WAKE)


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def _remove(paths: tuple[Path, ...]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
