"""ChatSession: one per chat in use. It queues user messages, runs one turn at a time, and
turns engine events into numbered transcript events that it logs, saves and fans out.

Its parts live beside it: seqs come from `seqs.SeqCounter`, the answer being written is a
`drafts.Draft`, and the wire views of records are in `views.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, overload

from blogchat import protocol as wire
from blogchat.content import Blog
from blogchat.drafts import Draft, new_answer
from blogchat.engines.base import (
    STOP_DEADLINE,
    STOPPED_TOOL,
    AgentEngine,
    EngineEvent,
    Exchange,
    ModelCall,
    PastMessage,
    Retrying,
    TextDelta,
    ThinkingDelta,
    ToolFinished,
    ToolStarted,
    TurnEnded,
    TurnFailed,
    TurnRequest,
)
from blogchat.eventlog import EventLog, Fanout, MemoryEventLog, MemoryFanout, Subscriber
from blogchat.personas import Persona, Personas
from blogchat.quotas import GateTimeout, Quotas, Slot, TurnGate, Who
from blogchat.saves import PartialSaves
from blogchat.seqs import SeqCounter, SeqsExhausted
from blogchat.store import ChatRecord, MessageRecord, Store
from blogchat.store.chats import Status, conversation_order
from blogchat.telemetry import NO_TRACE, Telemetry, TurnStart, TurnTrace
from blogchat.views import Renderer, chat_info, message_info, usage_of, user_message_event

log = logging.getLogger(__name__)

NOT_SAVED = "The answer could not be saved. Try again in a moment."
NO_SEQS = "The chat could not be saved. Try again in a moment."
RESTARTED = "The server restarted while writing this answer, so it ends here. Ask again to go on."
BUSY = "Every assistant is busy right now, and your message waited too long. Try again soon."
NOT_ANSWERED = (
    "Not answered: nobody was watching the chat when this message's turn came. Ask again."
)


# Called (not awaited) when a turn's answer is saved: the session, the turn, the answer.
AfterTurn = Callable[["ChatSession", "PendingTurn", MessageRecord], None]


class SessionState(enum.Enum):
    """Where a chat session is in its life."""

    IDLE = "idle"
    RUNNING = "running"
    CLOSED = "closed"


class SessionClosed(Exception):
    """The session was closed (chat deleted, idle reclaim, shutdown)."""


class AlreadySent(Exception):
    """The chat's owner sent a message with this clientMessageId before: `previous`."""

    def __init__(self, previous: MessageRecord) -> None:
        super().__init__(previous.client_message_id)
        self.previous = previous


class RewriteRefused(Exception):
    """A regenerate or edit that no longer applies (the chat changed meanwhile)."""


@dataclass(frozen=True)
class SessionTimings:
    """How often partial answers are saved, and how long a graceful stop may take."""

    save_interval: float = 1.0
    # One saver for every running answer of the process (saves.py); False: each turn saves
    # its own answer, the way it was done before, kept to measure the two side by side.
    batched_saves: bool = True
    # A turn still running this long after a stop is cut; the engines' graceful stops are
    # built to end before it (engines/base.py).
    stop_grace: float = STOP_DEADLINE


@dataclass(frozen=True)
class SessionLimits:
    """What one chat may hold, and how long its turns may wait (docs/deployment.md)."""

    # Messages waiting behind the running turn.
    queue: int = 3
    # Input tokens of the last request past which the chat takes no more messages.
    context: int = 150_000
    # How long a turn may wait for its place at the gate.
    turn_wait: float = 60.0
    # A chat nobody has watched this long drops its waiting messages.
    unwatched: float = 300.0


@dataclass(frozen=True)
class PendingTurn:
    """A saved user message waiting for its answer, and the model it asked for."""

    user: MessageRecord
    model_alias: wire.ModelAlias
    model_id: str
    anonymous: bool
    # It replaced the chat's last turn: the engine rebuilds its context (TurnRequest).
    rewritten: bool = False

    def who(self, visitor: str) -> Who:
        """Whose allowance the turn counts against (its chat's owner, its address)."""
        return Who(visitor, self.user.client_address or "", self.anonymous)


@dataclass
class _Outcome:
    reason: wire.DoneReason = "complete"
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    stop_reason: str | None = None
    warning: str | None = None
    failure: TurnFailed | None = None
    context_tokens: int = 0


class ChatSession:
    """The live state of one chat: its queue, its running turn, its log and subscribers."""

    def __init__(
        self,
        chat: ChatRecord,
        history: list[MessageRecord],
        *,
        store: Store,
        engine: AgentEngine,
        personas: Personas,
        blog: Blog,
        render: Renderer,
        timings: SessionTimings,
        telemetry: Telemetry | None = None,
        limits: SessionLimits | None = None,
        gate: TurnGate | None = None,
        quotas: Quotas | None = None,
        saves: PartialSaves | None = None,
        after_turn: AfterTurn | None = None,
    ) -> None:
        self.after_turn = after_turn
        self.blog = blog
        # The process's saver of running answers (None: this session saves its own).
        self.saves = saves
        # The token the saver's saves of this session's answers carry (an owner's, with
        # several instances), or None.
        self.save_fence: int | None = None
        self.telemetry = telemetry or Telemetry()
        self.limits = limits or SessionLimits()
        self.gate = gate
        self.quotas = quotas
        self.chat = chat
        self.history = history
        self.store = store
        self.engine = engine
        self.personas = personas
        self.render = render
        self.timings = timings
        self.state = SessionState.IDLE
        # The seq of the last event published: what subscribers and histories see.
        self.last_seq = chat.last_seq
        self.seqs = SeqCounter(chat.last_seq, self._reserve)
        self.log: EventLog = MemoryEventLog(chat.last_seq)
        self.fanout: Fanout = MemoryFanout()
        self.draft: Draft | None = None
        self.last_activity = time.monotonic()
        self._queue: deque[PendingTurn] = deque()
        # Held while a seq is handed out and until its event is published, so that events
        # reach the log and subscribers in seq order even when saving one takes a while.
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        # The place taken for the turn of a message to an idle chat while it was being
        # saved (see `_place_at_once`): that message's id, and the place being taken.
        self._placed: tuple[str, asyncio.Task[Slot | None]] | None = None
        self._unplacing: set[asyncio.Task[None]] = set()
        self._consumer: asyncio.Task[_Outcome] | None = None
        self._hard_stop: asyncio.TimerHandle | None = None
        self._aborted = False
        # Shutting down: nothing new starts, and the running turn ends as interrupted.
        self._draining = False
        self._interrupted = False
        # Where the last finished turn began: the log keeps everything from there on.
        self._last_turn_start: int | None = None
        # When the last subscriber left (or the session opened without one).
        self._unwatched_since: float | None = time.monotonic()
        # The size the conversation has reached: its last answer's last request.
        self.context_tokens = next(
            (m.context_tokens for m in reversed(history) if m.context_tokens), 0
        )

    # --- queries ----------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a turn is running or waiting."""
        return self.state is SessionState.RUNNING or bool(self._queue)

    @property
    def waiting(self) -> int:
        """Messages waiting for their turn behind the running one."""
        return len(self._queue)

    def admits(self) -> wire.ErrorCode | None:
        """Why the chat takes no more messages now (None: it does): its queue is full, or
        its conversation has grown past the context limit."""
        if self.context_tokens >= self.limits.context:
            return "chat_too_long"
        if self.busy and self.waiting >= self.limits.queue:
            return "queue_full"
        return None

    @property
    def persona(self) -> Persona:
        """The chat's persona (the default one if the chat's is no longer configured)."""
        return self.personas.get(self.chat.persona, self.personas.default)

    def rewrite(self, *, regenerate: str | None, edit: str | None) -> list[MessageRecord]:
        """The messages a regenerate (of this answer) or an edit (of this user message)
        replaces, first its question; ValueError says why it cannot be done. Only the chat's
        last turn can be replaced, and only once it has ended."""
        if self.busy:
            raise ValueError("Wait for the answer to end (or stop it) first.")
        messages = conversation_order(self.history)
        if regenerate is not None:
            last = messages[-1] if messages else None
            if last is None or last.id != regenerate or last.role != "assistant":
                raise ValueError("Only the chat's last answer can be asked for again.")
            question = next((m for m in messages if m.id == last.reply_to), None)
            if question is None:
                raise ValueError("This answer has no question to ask again.")
            return [question, *messages[messages.index(question) + 1 :]]
        users = [m for m in messages if m.role == "user"]
        if not users or users[-1].id != edit:
            raise ValueError("Only your last message in the chat can be edited.")
        return messages[messages.index(users[-1]) :]

    def prepare(self, model_id: str) -> None:
        """A reader opened the chat and may ask next: let the engine get ready, unless a
        turn is running or waiting anyway."""
        if not self.busy:
            self.engine.prepare(self.chat.id, self.persona, model_id)

    def messages(self) -> list[MessageRecord]:
        """The transcript as published so far, including the running answer."""
        records = list(self.history)
        if self.draft is not None and self.draft.started:
            records.append(self.draft.record)
        return conversation_order(records)

    def message_infos(self) -> list[wire.MessageInfo]:
        """The transcript in protocol form."""
        return [message_info(record, self.render) for record in self.messages()]

    # --- subscribers ------------------------------------------------------------------

    def subscribe(
        self,
        subscriber: Subscriber,
        *,
        after_seq: int | None,
        request_id: str | None,
        announce: bool = True,
    ) -> None:
        """Answer `subscribe`: history or replay, then live events, with nothing between.

        With `announce` false (automatic subscriptions), the `subscribed` answer is left
        out unless the history has to be sent.
        """
        self._ensure_open()
        replay = None if after_seq is None else self.log.since(after_seq)
        # A replay that the log cannot serve (too old, or lost in a crash) falls back to
        # the whole history, so the client rebuilds its transcript instead of missing part.
        if announce or replay is None:
            answer = wire.Subscribed(
                chat_id=self.chat.id,
                last_seq=self.last_seq,
                busy=self.busy,
                chat=chat_info(self.chat),
                messages=self.message_infos() if replay is None else None,
                request_id=request_id,
            )
            subscriber.deliver(answer.to_json())
        if replay:
            subscriber.replay(replay)
        self.fanout.add(subscriber)
        self.last_activity = time.monotonic()
        self._unwatched_since = None

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop sending this chat's events to a subscriber."""
        self.fanout.discard(subscriber)
        self.last_activity = time.monotonic()
        if not len(self.fanout) and self._unwatched_since is None:
            self._unwatched_since = self.last_activity

    def watched_by(self, subscriber: Subscriber) -> bool:
        """Whether this subscriber gets the chat's events."""
        return subscriber in self.fanout

    def deleted(self) -> str:
        """The chat was deleted: tell its subscribers, and stop sending them anything.
        Returns what they were told."""
        gone = wire.Error(code="not_found", message="This chat was deleted.", chat_id=self.chat.id)
        frame = gone.to_json()
        self.fanout.publish(frame)
        self.fanout.clear()
        return frame

    # --- commands ---------------------------------------------------------------------

    async def accept(
        self,
        *,
        client_message_id: str,
        text: str,
        model_alias: wire.ModelAlias,
        model_id: str,
        anonymous: bool,
        address: str = "",
        replaces: Sequence[MessageRecord] = (),
        admit: Callable[[], Awaitable[None]] | None = None,
    ) -> MessageRecord:
        """Save a user message, announce it, and queue its turn. A message that `replaces`
        the chat's last turn (see `rewrite`) takes its place: the replaced messages are
        marked superseded in the same save and leave the conversation.

        The save is one transaction: the idempotency lookup (AlreadySent if the chat's
        owner sent this clientMessageId before: nothing is saved), then `admit` (what it
        raises refuses the message), the insert, the chat's model when it changes, and the
        chat's seq reservation when it runs low."""
        self._ensure_open()
        async with self._lock:
            if replaces and (self.busy or any(m not in self.history for m in replaces)):
                # (Checked again under the lock: another turn may have begun since.)
                raise RewriteRefused("The chat changed meanwhile; try again.")
            await self._flush()
            seq, reserve = self.seqs.take()
            record = MessageRecord(
                id=str(uuid.uuid4()),
                chat_id=self.chat.id,
                role="user",
                seq_start=seq,
                seq_end=seq,
                text=text,
                client_message_id=client_message_id,
                client_address=address or None,
                replaces=[message.id for message in replaces],
            )
            placing = self._place_at_once(Who(self.chat.owner_id, address, anonymous))
            try:
                previous = await self.store.chats.add_user_message(
                    record,
                    owner_id=self.chat.owner_id,
                    admit=admit,
                    reserve=reserve,
                    model=model_alias if model_alias != self.chat.model else None,
                )
            except asyncio.CancelledError:
                # The save goes on without us (store.database.runs_to_completion) and may
                # land: its seq is never handed out again.
                self._unplace(placing)
                raise
            except BaseException:
                # Nothing was published with this seq: the next event takes it.
                self.seqs.give_back(seq)
                await self._give_back(placing)
                raise
            if previous is not None:
                self.seqs.give_back(seq)
                await self._give_back(placing)
                raise AlreadySent(previous)
            if placing is not None:
                self._placed = (record.id, placing)
            if reserve is not None:
                self.seqs.reserved_to(reserve)
            new_model = model_alias != self.chat.model
            if new_model:
                self.chat = dataclasses.replace(self.chat, model=model_alias)
            if replaces:
                gone = set(record.replaces)
                self.history = [m for m in self.history if m.id not in gone]
                # Its size is the conversation's without the replaced answer.
                self.context_tokens = next(
                    (m.context_tokens for m in reversed(self.history) if m.context_tokens), 0
                )
            self.history.append(record)
            self._publish(seq, user_message_event(record))
            if new_model:
                # Every reader's chat summary (another tab, another instance) shows it.
                self._say(
                    wire.ChatUpdated(chat_id=self.chat.id, chat=chat_info(self.chat)).to_json()
                )
        try:
            self.enqueue(
                PendingTurn(record, model_alias, model_id, anonymous, rewritten=bool(replaces))
            )
        finally:
            if self._placed is not None and (self._runner is None or self._runner.done()):
                self._unplace(self._placed[1])  # No turn runs now (shutting down).
                self._placed = None
        return record

    def _place_at_once(self, who: Who) -> asyncio.Task[Slot | None] | None:
        """A message to an idle chat has its turn's place taken while it is being saved:
        with several instances that is a round trip to the shared counts, which the turn
        then no longer makes on its way to the first token."""
        if self.gate is None or self.busy or self._draining or self._placed is not None:
            return None
        return asyncio.create_task(self.gate.take_now(who))

    async def _give_back(self, placing: asyncio.Task[Slot | None] | None) -> None:
        """Give back the place taken for a turn that will not run (once it is taken)."""
        if placing is None:
            return
        slot = await asyncio.shield(placing)
        if slot is not None and self.gate is not None:
            await self.gate.leave(slot)

    def _unplace(self, placing: asyncio.Task[Slot | None] | None) -> None:
        """`_give_back`, in a task of its own (where nothing may wait)."""
        if placing is not None:
            task = asyncio.create_task(self._give_back(placing))
            self._unplacing.add(task)
            task.add_done_callback(self._unplacing.discard)

    def enqueue(self, *turns: PendingTurn) -> None:
        """Queue saved user messages for their answers, in order (new ones, or those left
        waiting when the server stopped)."""
        self._ensure_open()
        self._queue.extend(turns)
        self.last_activity = time.monotonic()
        if self._draining:
            return  # saved: the next start answers them
        if self._queue and (self._runner is None or self._runner.done()):
            self._runner = asyncio.create_task(self._run_queue(), name=f"chat-{self.chat.id}")

    def stop(self) -> None:
        """Stop the running turn gracefully; a no-op when nothing runs."""
        if self.state is not SessionState.RUNNING or self._stop.is_set():
            return
        self._stop.set()
        self._hard_stop = asyncio.get_running_loop().call_later(
            self.timings.stop_grace, self._abort_turn
        )

    async def interrupt(self) -> None:
        """The server is shutting down: the running turn ends now (its sentence finished) as
        stopped, with a warning that says why, while its readers are still connected; the
        messages waiting behind it stay saved for the next start, and nothing new starts."""
        self._draining = True
        self._queue.clear()
        if self.state is SessionState.RUNNING:
            self._interrupted = True
            self.stop()
        runner = self._runner
        if runner is not None and not runner.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(runner), self.timings.stop_grace + 2)

    def set_chat(self, chat: ChatRecord) -> None:
        """Take a changed chat row (new model or title)."""
        self.chat = chat

    def update_chat(self, chat: ChatRecord) -> None:
        """Take a changed chat row and tell the chat's subscribers (`chat_updated`)."""
        self.chat = chat
        self._say(wire.ChatUpdated(chat_id=chat.id, chat=chat_info(chat)).to_json())

    async def close(self) -> None:
        """Stop whatever runs, free the engine's resources and settle the seq counter.

        Messages still waiting stay saved without an answer: the next start runs them.
        """
        if self.state is SessionState.CLOSED:
            return
        self._queue.clear()
        self.stop()
        # From here on nothing new is accepted; a running turn ends as "stopped".
        self.state = SessionState.CLOSED
        runner = self._runner
        if runner is not None and not runner.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(runner), self.timings.stop_grace + 2)
            if not runner.done():
                runner.cancel()
                with contextlib.suppress(BaseException):
                    await runner
        try:
            await self.engine.release(self.chat.id)
        except Exception:
            log.exception("chat %s: the engine could not release it", self.chat.id)
        # Nothing beyond last_seq was published: the unused reservation goes back.
        await self.seqs.settle(self.last_seq, self._settle)

    # --- the turn loop ----------------------------------------------------------------

    async def _run_queue(self) -> None:
        try:
            await self._run_waiting()
        finally:
            if self._placed is not None:
                self._unplace(self._placed[1])
                self._placed = None

    async def _run_waiting(self) -> None:
        while self._queue and self.state is not SessionState.CLOSED:
            if self._unwatched_for() >= self.limits.unwatched:
                await self._drop_waiting()
                break
            pending = self._queue.popleft()
            self.state = SessionState.RUNNING
            try:
                await self._run_turn(pending)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("chat %s: turn failed unexpectedly", self.chat.id)
            finally:
                if self.state is SessionState.RUNNING:
                    self.state = SessionState.IDLE
                self.last_activity = time.monotonic()

    async def _run_turn(self, pending: PendingTurn) -> None:
        draft = Draft(
            new_answer(str(uuid.uuid4()), self.chat.id, pending.user.id, pending.model_id)
        )
        draft.record.client_address = pending.user.client_address
        self.draft = draft
        self._stop.clear()
        self._aborted = False
        who = pending.who(self.chat.owner_id)
        taken: Slot | None = None
        if self._placed is not None:
            message_id, placing = self._placed
            self._placed = None
            if message_id == pending.user.id:
                try:
                    taken = await asyncio.shield(placing)
                except asyncio.CancelledError:
                    self._unplace(placing)
                    raise
            else:
                self._unplace(placing)
        if self.gate is None:
            await self._play_turn(pending, draft)
        else:
            try:
                async with self.gate.turn(
                    who,
                    wait=self.limits.turn_wait,
                    on_place=lambda place: self._waiting_at(draft, place),
                    taken=taken,
                ):
                    await self._play_turn(pending, draft)
            except GateTimeout:
                log.warning("chat %s: a turn waited too long for an assistant", self.chat.id)
                failed = _Outcome(
                    reason="error",
                    model=pending.model_id,
                    failure=TurnFailed(BUSY, retryable=True, code="busy"),
                )
                await self._finish(draft, pending, failed)
        if self.quotas is not None:
            record = self.history[-1] if self.history else None
            if record is not None and record.id == draft.record.id:
                spent = (record.input_tokens or 0) + (record.output_tokens or 0)
                self.quotas.spent(who, spent)
        if self.after_turn is not None and self.history and self.history[-1] is draft.record:
            try:
                self.after_turn(self, pending, draft.record)
            except Exception:
                log.exception("chat %s: what follows a turn failed", self.chat.id)

    def _waiting_at(self, draft: Draft, place: int) -> None:
        self._announce(
            wire.Status(
                chat_id=self.chat.id, message_id=draft.record.id, state="waiting", position=place
            )
        )

    async def _play_turn(self, pending: PendingTurn, draft: Draft) -> None:
        """Run a turn on the engine, from its request to its `done`."""
        persona = self.persona
        request = TurnRequest(
            chat_id=self.chat.id,
            text=pending.user.text,
            persona=persona,
            model_alias=pending.model_alias,
            model_id=pending.model_id,
            history=PastConversation(self.history, pending.user),
            anonymous=pending.anonymous,
            post=self.blog.post(self.chat.post_slug) if self.chat.post_slug else None,
            rewritten=pending.rewritten,
        )
        trace = self.telemetry.start_turn(
            TurnStart(
                chat_id=self.chat.id,
                text=request.text,
                persona=persona.id,
                model_alias=pending.model_alias,
                model_id=pending.model_id,
                anonymous=pending.anonymous,
                engine=self.engine.name,
            )
        )
        finished = asyncio.Event()
        saver = None
        if self.saves is not None:
            self.saves.track(draft, self.save_fence)
        else:
            saver = asyncio.create_task(self._save_periodically(draft, finished))
        self._consumer = asyncio.create_task(self._consume(request, draft, trace))
        try:
            outcome = await self._consumer
        except asyncio.CancelledError:
            if not self._aborted:
                finished.set()
                if self.saves is not None:
                    self.saves.forget(draft)
                trace.abandon()
                raise
            # The graceful stop ran out of time: end the turn here with what we have.
            outcome = _Outcome(reason="stopped", model=pending.model_id)
            await self._end_open_tools(draft)
        except Exception as exc:
            log.exception("chat %s: engine crashed", self.chat.id)
            outcome = _Outcome(
                reason="error",
                model=pending.model_id,
                failure=TurnFailed(f"The assistant failed: {type(exc).__name__}.", code="internal"),
            )
        finally:
            if self._hard_stop is not None:
                self._hard_stop.cancel()
                self._hard_stop = None
        # Let a save in progress finish rather than cutting it off mid-transaction: a
        # partial save landing after the final one would overwrite the answer.
        finished.set()
        if saver is not None:
            await saver
        if self.saves is not None:
            await self.saves.settle(draft)
        await self._finish(draft, pending, outcome, trace)

    async def _consume(
        self, request: TurnRequest, draft: Draft, trace: TurnTrace = NO_TRACE
    ) -> _Outcome:
        outcome = _Outcome(model=request.model_id)
        ended = False
        async with contextlib.aclosing(self.engine.run_turn(request, self._stop)) as events:
            async for event in events:
                trace.observe(event)
                match event:
                    case ModelCall():
                        continue  # For telemetry only: readers never see it.
                    case Exchange(messages=messages):
                        # The conversation as the provider saw it, kept with the answer.
                        draft.record.content = [dict(message) for message in messages]
                    case TurnEnded():
                        outcome.reason = event.reason
                        outcome.model = event.model or request.model_id
                        outcome.input_tokens = event.input_tokens
                        outcome.output_tokens = event.output_tokens
                        outcome.cache_read_tokens = event.cache_read_tokens
                        outcome.cache_creation_tokens = event.cache_creation_tokens
                        outcome.stop_reason = event.stop_reason
                        outcome.warning = event.warning
                        outcome.context_tokens = event.context_tokens
                        ended = True
                        break
                    case Retrying():
                        self._announce(
                            wire.Status(
                                chat_id=self.chat.id,
                                message_id=draft.record.id,
                                state="retrying",
                                attempt=event.attempt,
                                max_attempts=event.max_attempts,
                                retry_in_ms=round(event.delay * 1000),
                            )
                        )
                    case TurnFailed():
                        outcome.failure = event
                    case TextDelta() | ThinkingDelta() | ToolStarted() | ToolFinished():
                        try:
                            await self._publish_event(draft, event)
                        except SeqsExhausted:
                            # The database refuses to reserve seqs: streaming on could
                            # reuse one after a crash. The turn ends here.
                            outcome.failure = TurnFailed(NO_SEQS, code="internal")
                            break
        if not ended:
            outcome.reason = "error"
            outcome.failure = outcome.failure or TurnFailed(
                "The assistant stopped without finishing its answer.", code="internal"
            )
        if outcome.failure is not None:
            outcome.reason = "error"
        return outcome

    def _abort_turn(self) -> None:
        self._hard_stop = None
        if self._consumer is not None and not self._consumer.done():
            log.warning("chat %s: graceful stop timed out; cutting the turn", self.chat.id)
            self._aborted = True
            self._consumer.cancel()

    async def _end_open_tools(self, draft: Draft) -> None:
        """A cut turn's tool calls that never reported back end as stopped, as the engine's
        own graceful stop would have ended them: no saved call is left running."""
        for call in list(draft.record.tool_calls):
            if call.output is None:
                ended = ToolFinished(call.tool_use_id, STOPPED_TOOL, is_error=True)
                with contextlib.suppress(SeqsExhausted):
                    await self._publish_event(draft, ended)

    async def _publish_event(self, draft: Draft, event: EngineEvent) -> None:
        async with self._lock:
            seq = await self.seqs.next()
            base = {"chat_id": self.chat.id, "seq": seq, "message_id": draft.record.id}
            frame: wire.TranscriptEvent
            match event:
                case TextDelta(text=text):
                    frame = wire.Token(text=text, **base)
                case ThinkingDelta(text=text):
                    frame = wire.Thinking(text=text, **base)
                case ToolStarted(tool_use_id=tool_use_id, name=name, input=tool_input):
                    frame = wire.ToolUse(
                        tool_use_id=tool_use_id, name=name, input=tool_input, **base
                    )
                case ToolFinished(tool_use_id=tool_use_id, output=output, is_error=is_error):
                    frame = wire.ToolResult(
                        tool_use_id=tool_use_id, output=output, is_error=is_error, **base
                    )
                case _:  # pragma: no cover - only answer events are published
                    raise TypeError(event)
            draft.apply(frame)
            self._publish(seq, frame)

    async def _finish(
        self,
        draft: Draft,
        pending: PendingTurn,
        outcome: _Outcome,
        trace: TurnTrace = NO_TRACE,
        *,
        status: Status | None = None,
    ) -> None:
        """End the turn: its `error` if it failed, the final save, then `done`. `done` is
        only ever sent for an answer that is saved; when the save fails, the readers get a
        retryable `error` and a `done` with reason `error` instead."""
        if self._interrupted and outcome.reason == "stopped":
            outcome.warning = RESTARTED
        self._interrupted = False
        await self._before_the_end()
        async with self._lock:
            try:
                if outcome.failure is not None:
                    failure = outcome.failure
                    self._end_with(draft, self._error(failure, await self._ending_seq()))
                done = self._done(draft, outcome, await self._ending_seq())
                final = draft.apply(done)
                if status is not None:
                    # (A status the protocol's `done` has no reason for, such as not_answered.)
                    final.status = status
                if outcome.context_tokens:
                    final.context_tokens = self.context_tokens = outcome.context_tokens
                try:
                    await self.store.chats.save_message(draft.snapshot())
                except Exception:
                    log.exception("chat %s: could not save the final answer", self.chat.id)
                    not_saved = TurnFailed(NOT_SAVED, code="internal")
                    done = await self._not_saved(draft, done, not_saved)
                    outcome = dataclasses.replace(outcome, reason="error", failure=not_saved)
                    final = draft.record
                self.history.append(final)
                self._publish(done.seq, done)
            except SeqsExhausted:
                final = draft.record
                self._end_without_seqs(draft, outcome)
            finally:
                self.draft = None
            # Keep the last finished turn (from its user message on) and everything after.
            if self._last_turn_start is not None:
                self.log.trim(self._last_turn_start)
            self._last_turn_start = pending.user.seq_start
        # Once `done` is queued, so that building the spans never delays it; nothing awaits
        # since, so the trace is logged before that frame goes out.
        trace.finish(
            reason=outcome.reason,
            model=outcome.model,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            warning=outcome.warning,
            answer=final.text,
            failure=outcome.failure,
        )

    async def _not_saved(self, draft: Draft, done: wire.Done, failure: TurnFailed) -> wire.Done:
        """The final save failed: the `done` that was ready becomes an `error` (same seq),
        and a `done` with reason `error` follows; the answer is saved as such if it can be."""
        self._end_with(draft, self._error(failure, done.seq))
        failed = done.model_copy(update={"seq": await self._ending_seq(), "reason": "error"})
        draft.apply(failed)
        try:
            await self.store.chats.save_message(draft.snapshot())
        except Exception:
            log.exception("chat %s: could not save the failed answer either", self.chat.id)
        return failed

    def _end_with(self, draft: Draft, error: wire.Error) -> None:
        assert error.seq is not None
        draft.apply(error)
        self._publish(error.seq, error)

    def _end_without_seqs(self, draft: Draft, outcome: _Outcome) -> None:
        """Not even the end of the turn can get a seq (the database refused every
        reservation): the readers are told without one, and the answer stays unsaved."""
        log.error("chat %s: no seq left to end the turn", self.chat.id)
        draft.record.status = "error"
        self.history.append(draft.record)
        failure = wire.Error(code="internal", message=NO_SEQS, chat_id=self.chat.id, retryable=True)
        self.fanout.publish(failure.to_json())
        outcome.reason = "error"

    def _error(self, failure: TurnFailed, seq: int) -> wire.Error:
        return wire.Error(
            code=failure.code,
            message=failure.message,
            chat_id=self.chat.id,
            seq=seq,
            retryable=failure.retryable,
        )

    def _done(self, draft: Draft, outcome: _Outcome, seq: int) -> wire.Done:
        text = draft.record.text
        return wire.Done(
            chat_id=self.chat.id,
            seq=seq,
            message_id=draft.record.id,
            reason=outcome.reason,
            model=outcome.model,
            usage=usage_of(
                outcome.input_tokens,
                outcome.output_tokens,
                outcome.cache_read_tokens,
                outcome.cache_creation_tokens,
            ),
            warning=outcome.warning,
            html=self.render(text),
            stop_reason=outcome.stop_reason,
        )

    async def _save_periodically(self, draft: Draft, finished: asyncio.Event) -> None:
        """Save the partial answer every `save_interval` until the turn is `finished`."""
        saved_seq = -1
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), self.timings.save_interval)
            if finished.is_set():
                return
            if not draft.started or draft.record.seq_end == saved_seq:
                continue
            snapshot = draft.snapshot()
            try:
                await self.store.chats.save_message(snapshot)
                saved_seq = snapshot.seq_end
            except Exception:
                log.exception("chat %s: could not save the partial answer", self.chat.id)

    # --- unwatched chats --------------------------------------------------------------

    def _unwatched_for(self) -> float:
        since = self._unwatched_since
        return 0.0 if since is None else time.monotonic() - since

    async def _drop_waiting(self) -> None:
        """Nobody has watched the chat for a while: its waiting messages go unanswered
        (each gets an answer that says so, in the history), so no turn runs for nobody."""
        log.info(
            "chat %s: %d waiting message(s) dropped, unwatched", self.chat.id, len(self._queue)
        )
        # Busy until the last of them is saved as not answered.
        self.state = SessionState.RUNNING
        try:
            while self._queue:
                await self._drop(self._queue.popleft())
        finally:
            if self.state is SessionState.RUNNING:
                self.state = SessionState.IDLE

    async def _drop(self, pending: PendingTurn) -> None:
        """Answer a waiting message with "not answered": `error`, `done`, and a saved answer
        whose status says so."""
        answer = new_answer(str(uuid.uuid4()), self.chat.id, pending.user.id, pending.model_id)
        draft = Draft(answer)
        self.draft = draft
        outcome = _Outcome(
            reason="error",
            model=pending.model_id,
            failure=TurnFailed(NOT_ANSWERED, retryable=True, code="not_answered"),
        )
        await self._finish(draft, pending, outcome, status="not_answered")

    # --- seq and publishing -----------------------------------------------------------

    async def _ending_seq(self) -> int:
        return await self.seqs.next(ending=True)

    async def _flush(self) -> None:
        """Wait until the events published so far went out (here they did at once; an owner
        among several instances sends each to the shared log first)."""

    async def _before_the_end(self) -> None:
        """Before a turn's end is worked out and saved: here every event went out at once
        (an owner among several instances lets the last ones reach the shared log first)."""

    async def _reserve(self, upto: int) -> None:
        await self.store.chats.reserve_seq(self.chat.id, upto)

    async def _settle(self, reserved: int, published: int) -> bool:
        return await self.store.chats.settle_seq(self.chat.id, reserved, published)

    def _publish(self, seq: int, event: wire.TranscriptEvent) -> None:
        frame = event.to_json()
        self.last_seq = seq
        self.log.append(seq, frame)
        self.fanout.publish(frame)
        self.last_activity = time.monotonic()

    def _announce(self, status: wire.Status) -> None:
        """Tell the chat's subscribers what the turn waits for: no seq, not logged."""
        self._say(status.to_json())

    def _say(self, frame: str) -> None:
        """Send the chat's subscribers a frame that is no part of the transcript (no seq,
        not logged): `status`, `chat_updated`. (The owner of a chat among several instances
        tells the other instances' subscribers too.)"""
        self.fanout.publish(frame)

    def _ensure_open(self) -> None:
        if self.state is SessionState.CLOSED:
            raise SessionClosed(self.chat.id)


class PastConversation(Sequence[PastMessage]):
    """The conversation before a user message, as the engine takes it (`TurnRequest.history`),
    built the first time it is read: an engine that keeps its own context (a warm agent
    process) never reads it, and building it costs time proportional to the chat's length
    on the way to every turn's first token."""

    def __init__(self, history: list[MessageRecord], user: MessageRecord) -> None:
        # (A copy of the list: the session's own goes on changing.)
        self._history = list(history)
        self._user = user
        self._built: Sequence[PastMessage] | None = None

    def _messages(self) -> Sequence[PastMessage]:
        if self._built is None:
            self._built = _past(conversation_order(self._history), self._user)
        return self._built

    @overload
    def __getitem__(self, index: int) -> PastMessage: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[PastMessage]: ...

    def __getitem__(self, index: int | slice) -> PastMessage | Sequence[PastMessage]:
        return self._messages()[index]

    def __len__(self) -> int:
        return len(self._messages())


def _past(messages: list[MessageRecord], user: MessageRecord) -> Sequence[PastMessage]:
    """The conversation up to (not including) a user message, as the engine takes it."""
    past: list[PastMessage] = []
    for message in messages:
        if message is user:
            break
        past.append(
            PastMessage(
                message.role,
                message.text,
                message.content,
                incomplete=message.status == "incomplete",
            )
        )
    return past


class Placement(Protocol):
    """Where a chat's session runs when several instances serve one blog (`cluster/`):
    here as the chat's owner, or here as a follower of the owner elsewhere."""

    async def open(self, chat: ChatRecord, sessions: ChatSessions) -> ChatSession:
        """A new session of the chat on this instance, loaded from the store."""


class ChatSessions:
    """The live sessions of this process, by chat id, with idle reclaim."""

    def __init__(
        self,
        store: Store,
        engine: AgentEngine,
        personas: Personas,
        blog: Blog,
        render: Renderer,
        *,
        idle_seconds: float,
        timings: SessionTimings | None = None,
        telemetry: Telemetry | None = None,
        limits: SessionLimits | None = None,
        gate: TurnGate | None = None,
        quotas: Quotas | None = None,
        after_turn: AfterTurn | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.after_turn = after_turn
        self.placement = placement
        self.limits = limits or SessionLimits()
        self.gate = gate
        self.quotas = quotas
        self.store = store
        self.engine = engine
        self.personas = personas
        self.blog = blog
        self.render = render
        self.idle_seconds = idle_seconds
        self.timings = timings or SessionTimings()
        self.telemetry = telemetry or Telemetry()
        self.saves = (
            PartialSaves(store.chats, self.timings.save_interval)
            if self.timings.batched_saves
            else None
        )
        self._sessions: dict[str, ChatSession] = {}
        self._opening: dict[str, asyncio.Future[ChatSession]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def get(self, chat_id: str) -> ChatSession | None:
        """The live session of a chat, if there is one."""
        return self._sessions.get(chat_id)

    def __len__(self) -> int:
        return len(self._sessions)

    async def open(self, chat: ChatRecord, *, created: bool = False) -> ChatSession:
        """The chat's session, loading it if it is not live yet (once, even if asked twice).
        A chat `created` just now has nothing to load (on one instance)."""
        session = self._sessions.get(chat.id)
        if session is not None:
            return session
        pending = self._opening.get(chat.id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[ChatSession] = asyncio.get_running_loop().create_future()
        self._opening[chat.id] = future
        try:
            if self.placement is not None:
                session = await self.placement.open(chat, self)
            elif created:
                session = ChatSession(chat, [], **self.session_options())
            else:
                history = await self.store.chats.get_messages(chat.id)
                fresh = await self.store.chats.get_chat(chat.id) or chat
                session = ChatSession(fresh, history, **self.session_options())
            self._sessions[chat.id] = session
            future.set_result(session)
            return session
        except BaseException as exc:
            future.set_exception(exc)
            # Nobody else may be waiting; don't let the future warn about it.
            future.exception()
            raise
        finally:
            del self._opening[chat.id]

    def session_options(self) -> dict[str, Any]:
        """What every session of this process is made with, besides its chat."""
        return {
            "store": self.store,
            "engine": self.engine,
            "personas": self.personas,
            "blog": self.blog,
            "render": self.render,
            "timings": self.timings,
            "telemetry": self.telemetry,
            "limits": self.limits,
            "gate": self.gate,
            "quotas": self.quotas,
            "saves": self.saves,
            "after_turn": self.after_turn,
        }

    async def reopen(self, chat_id: str) -> ChatSession | None:
        """Close a chat's session and open it again, keeping its subscribers, who get what
        they missed in between (a follower becoming the owner, `cluster/`)."""
        old = self._sessions.pop(chat_id, None)
        if old is None:
            return None
        subscribers = list(old.fanout)
        await old.close()
        new = await self.open(old.chat)
        for subscriber in subscribers:
            new.subscribe(subscriber, after_seq=old.last_seq, request_id=None, announce=False)
        return new

    def chats_moved(self, from_owner: str, to_owner: str) -> None:
        """An anonymous visitor's chats now belong to an account: update live sessions."""
        for session in self._sessions.values():
            if session.chat.owner_id == from_owner:
                session.set_chat(dataclasses.replace(session.chat, owner_id=to_owner))

    async def close(self, chat_id: str) -> None:
        """Close a chat's session (before deleting the chat, for instance)."""
        session = self._sessions.pop(chat_id, None)
        if session is not None:
            await session.close()

    def start(self) -> None:
        """Start reclaiming idle sessions in the background."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever(), name="session-sweeper")

    async def interrupt_all(self) -> None:
        """At shutdown, before connections close: end every running turn (see
        ChatSession.interrupt), so that its readers get its end."""
        sessions = list(self._sessions.values())
        await asyncio.gather(*(s.interrupt() for s in sessions), return_exceptions=True)

    async def aclose(self) -> None:
        """Close every session (at shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(session.close() for session in sessions), return_exceptions=True)
        if self.saves is not None:
            await self.saves.aclose()

    async def sweep(self) -> int:
        """Close sessions that are idle, unwatched and past the idle time; return how many."""
        now = time.monotonic()
        idle = [
            session
            for session in self._sessions.values()
            if not session.busy
            and not len(session.fanout)
            and now - session.last_activity >= self.idle_seconds
        ]
        for session in idle:
            await self.close(session.chat.id)
        return len(idle)

    async def _sweep_forever(self) -> None:
        interval = max(1.0, min(30.0, self.idle_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("idle session sweep failed")
