"""A chat's session on one of several instances: the owner's, which runs the turns and
appends every event to the shared log, or a follower's, which mirrors that log for the
readers connected to its instance.

Both are `ChatSession`s, so the hub and the chat service treat them alike: a follower's
`subscribe` answers from its mirror (history, replay, live events) exactly as the owner's
does from its own log, in one synchronous step.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from blogchat import protocol as wire
from blogchat.cluster.bus import Bus, Fenced, Lease, LiveEvent
from blogchat.drafts import Draft, draft_of, new_answer
from blogchat.eventlog import MemoryEventLog
from blogchat.session import ChatSession, PendingTurn, SessionState
from blogchat.store import STREAMING, ChatRecord, ChatStore, Database, MessageRecord, Store
from blogchat.store.chats import StaleOwner, conversation_order
from blogchat.store.tables import utcnow
from blogchat.views import usage_of, user_message_event

log = logging.getLogger(__name__)

CUT_OFF = "The server answering this chat stopped; the answer was cut short. Ask again."
# The most events one append to Redis carries.
BATCH = 256
# Retries of an append that failed on the connection, before the owner gives the chat up.
APPEND_RETRIES = 5
# Appends of one chat's events under way at once (each carries those not confirmed yet).
APPENDS_IN_FLIGHT = 2
# How long a turn's end waits for its last events to reach the shared log (seconds).
FLUSH_BEFORE_THE_END = 1.0


class NotOwner(Exception):
    """A follower was asked to do what only the chat's owner does."""


class FencedLog:
    """The owner's event log. Each event goes to the chat's shared log first (appended in
    order, in batches, fenced by the lease), and only once it is there to this instance:
    to its copy of the log, for resumes, and to `deliver`, for its readers. So every event
    any reader was sent is in the shared log, and an owner that takes over after a crash
    continues right after the log's last seq.

    Appends overlap, up to APPENDS_IN_FLIGHT: a new event does not wait for the append
    before it to be confirmed (a round trip) before it is sent; each append carries every
    event not confirmed yet, the script skips those the log has, and an event is delivered
    once any append carrying it is confirmed. (A turn's first token would otherwise wait
    for its question's append, then for its own.)"""

    def __init__(
        self,
        memory: MemoryEventLog,
        bus: Bus,
        lease: Lease,
        on_lost: Callable[[str], None],
        deliver: Callable[[int, str], None],
        said: Callable[[str], None] | None = None,
    ) -> None:
        self.memory = memory
        self.bus = bus
        self.lease = lease
        self._on_lost = on_lost
        self._deliver = deliver
        self._said = said
        self._pending: deque[tuple[Literal["append", "trim", "say"], int, str]] = deque()
        # The last seq the shared log confirmed, and the last one an append under way carries.
        self._confirmed = 0
        self._sent = 0
        self._flying: set[asyncio.Task[int]] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.lost = False
        self._writer = asyncio.create_task(self._write_forever(), name=f"log-{lease.chat_id}")

    @property
    def pending(self) -> bool:
        """Whether some events are still on their way to the shared log."""
        return bool(self._pending)

    def append(self, seq: int, frame: str) -> None:
        """Queue the next event: it is delivered once the shared log has it."""
        self._queue("append", seq, frame)

    def since(self, after_seq: int) -> list[str] | None:
        """Every event after `after_seq` delivered here, from this instance's copy."""
        return self.memory.since(after_seq)

    def trim(self, before_seq: int) -> None:
        """Forget events before `before_seq`, in the shared log and then here."""
        self._queue("trim", before_seq, "")

    def say(self, after_seq: int, frame: str) -> None:
        """Queue a frame without a seq for every instance's readers, in its place after the
        event `after_seq`: published, then handed to `said` (this instance's readers), in
        order with the events queued before it."""
        if not self._writer.done():
            self._queue("say", after_seq, frame)

    async def flush(self) -> None:
        """Wait until everything queued so far reached the shared log (or was refused)."""
        await self._idle.wait()

    async def aclose(self) -> None:
        """Flush, then stop writing."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 10)
        for task in (self._writer, *self._flying):
            task.cancel()
        for task in (self._writer, *self._flying):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _queue(self, kind: Literal["append", "trim", "say"], seq: int, frame: str) -> None:
        if self.lost:
            return
        self._pending.append((kind, seq, frame))
        self._idle.clear()
        self._wake.set()

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending and not self.lost:
                kind, seq, frame = self._pending[0]
                if kind == "append":
                    self._send_appends()
                    break  # (What lands wakes this loop again.)
                if self._flying:
                    break  # A trim or a frame without a seq waits for the appends before it.
                try:
                    if kind == "trim":
                        await self.bus.trim(self.lease, seq)
                        self._pending.popleft()
                        self.memory.trim(seq)
                    else:
                        await self.bus.say(self.lease, seq, frame)
                        self._pending.popleft()
                        if self._said is not None:
                            self._said(frame)
                except Exception as exc:
                    self._lose(exc)
            if not self._pending and not self._flying:
                self._idle.set()

    def _send_appends(self) -> None:
        """Send the events at the head of the queue not under way yet, with those before
        them not confirmed yet (the script skips the ones the log has by then)."""
        if len(self._flying) >= APPENDS_IN_FLIGHT:
            return
        batch: list[tuple[int, str]] = []
        for kind, seq, frame in self._pending:
            if kind != "append" or len(batch) == BATCH:
                break
            batch.append((seq, frame))
        if not batch or batch[-1][0] <= self._sent:
            return
        self._sent = batch[-1][0]
        task = asyncio.create_task(self._append(batch))
        self._flying.add(task)
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[int]) -> None:
        self._flying.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._lose(exc)
        else:
            self._confirmed = max(self._confirmed, task.result())
            while self._pending and not self.lost:
                kind, seq, frame = self._pending[0]
                if kind != "append" or seq > self._confirmed:
                    break
                self._pending.popleft()
                self.memory.append(seq, frame)
                self._deliver(seq, frame)
        self._wake.set()

    def _lose(self, exc: BaseException) -> None:
        """Refused (another instance holds the chat now) or Redis is gone: this instance
        may no longer speak for the chat, and what it could not append nobody is sent."""
        if self.lost:
            return
        log.error("chat %s: the shared log refused us: %s", self.lease.chat_id, exc)
        self.lost = True
        self._pending.clear()
        self._on_lost(self.lease.chat_id)

    async def _append(self, batch: list[tuple[int, str]]) -> int:
        """Append a batch (retried on a failed connection); the last seq it carries."""
        for attempt in range(APPEND_RETRIES):
            try:
                await self.bus.append(self.lease, batch)
                return batch[-1][0]
            except Fenced:
                raise
            except (OSError, ConnectionError) as exc:
                if attempt == APPEND_RETRIES - 1:
                    raise
                log.warning("chat %s: append failed (%s); again", self.lease.chat_id, exc)
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover


class FencedChatStore(ChatStore):
    """The chat store as an owner writes to it: every message save carries its token, so a
    save by an owner that was taken over is refused by the database itself."""

    def __init__(self, db: Database, fence: int, on_lost: Callable[[], None]) -> None:
        super().__init__(db)
        self.fence = fence
        self._on_lost = on_lost

    async def add_message(self, record: MessageRecord, *, fence: int | None = None) -> None:
        """Insert a new message, fenced."""
        try:
            await super().add_message(record, fence=self.fence)
        except StaleOwner:
            self._on_lost()
            raise

    async def add_user_message(
        self, record: MessageRecord, *, fence: int | None = None, **options: Any
    ) -> MessageRecord | None:
        """Save a reader's message (or find it sent before), fenced."""
        try:
            return await super().add_user_message(record, fence=self.fence, **options)
        except StaleOwner:
            self._on_lost()
            raise

    async def save_message(self, record: MessageRecord, *, fence: int | None = None) -> None:
        """Save a message, fenced."""
        try:
            await super().save_message(record, fence=self.fence)
        except StaleOwner:
            self._on_lost()
            raise


def fenced_store(store: Store, fence: int, on_lost: Callable[[], None]) -> Store:
    """The store with its chats fenced by an owner's token."""
    fenced = copy.copy(store)
    fenced.chats = FencedChatStore(store.db, fence, on_lost)
    return fenced


class OwnedSession(ChatSession):
    """The session of a chat this instance owns: it runs the turns; its events reach its
    readers through the shared log (`FencedLog`). Closing it gives the lease up once the
    log has everything."""

    def __init__(
        self,
        chat: ChatRecord,
        history: list[MessageRecord],
        *,
        lease: Lease,
        bus: Bus,
        memory: MemoryEventLog,
        on_lost: Callable[[str], None],
        on_closed: Callable[[OwnedSession], Awaitable[None]],
        **options: Any,
    ) -> None:
        options["store"] = fenced_store(options["store"], lease.fence, lambda: on_lost(chat.id))
        super().__init__(chat, history, **options)
        # The process's batched saver saves the running answers, fenced by the lease.
        self.save_fence = lease.fence
        self.lease = lease
        self.shared = FencedLog(memory, bus, lease, on_lost, self._delivered, self._said_here)
        self.log = self.shared
        self._on_closed = on_closed
        # Events published and not delivered yet (on their way to the shared log), by seq.
        self._sending: dict[int, wire.TranscriptEvent] = {}
        # The delivered events of the answer whose `done` was not delivered yet.
        self._sent: list[wire.TranscriptEvent] = []

    def _publish(self, seq: int, event: wire.TranscriptEvent) -> None:
        """Send an event to the shared log; this instance's readers get it from there."""
        self._sending[seq] = event
        self.shared.append(seq, event.to_json())

    def _delivered(self, seq: int, frame: str) -> None:
        """The shared log has the event: this instance's readers get it now."""
        event = self._sending.pop(seq)
        self.last_seq = seq
        self.fanout.publish(frame)
        self.last_activity = time.monotonic()
        if isinstance(event, wire.Done):
            self._sent = []
        elif not isinstance(event, wire.UserMessage):
            self._sent.append(event)

    def messages(self) -> list[MessageRecord]:
        """The transcript as its readers were sent it: as of `last_seq`, the last event
        delivered, though the turn may have published a few more, still on their way."""
        if not self._sending:
            return super().messages()
        records = [record for record in self.history if _settled(record, self.last_seq)]
        answer = self._sent_answer()
        if answer is not None:
            records.append(answer)
        return conversation_order(records)

    def _sent_answer(self) -> MessageRecord | None:
        """The answer being delivered, as far as it was."""
        ids = [event.message_id for event in self._sent if not isinstance(event, wire.Error)]
        if not ids:
            return None
        answer_id = ids[-1]
        live = next((m for m in self.history if m.id == answer_id), None)
        if self.draft is not None and self.draft.record.id == answer_id:
            live = self.draft.record
        if live is None:
            return None
        start = new_answer(answer_id, self.chat.id, live.reply_to or "", live.model or "")
        start.created_at = live.created_at
        start.client_address = live.client_address
        return draft_of(start, self._sent)

    async def _flush(self) -> None:
        """Before a message takes a seq: every event before it is in the shared log, so
        that if this instance dies once the message is saved, it is the one event the
        saved rows hold beyond the log (and the next owner publishes it)."""
        await self.shared.flush()
        if self.shared.lost:
            raise StaleOwner(self.chat.id)

    async def _before_the_end(self) -> None:
        """The turn's last events reach the shared log, and so their readers, before the
        turn's end is worked out and saved: that work (on this event loop too) would hold
        their append up. Not for long if Redis stalls: the end goes on regardless."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.shared.flush(), FLUSH_BEFORE_THE_END)

    async def _settle(self, reserved: int, published: int) -> bool:
        """Give back the seqs after the last one the shared log has: once what is on its
        way got there. An owner refused by the log keeps its reservation (a message it
        saved may hold a seq the log never had)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.shared.flush(), 10)
        if self.shared.lost or self.shared.pending:
            return False
        return await super()._settle(reserved, self.last_seq)

    async def republish(self, users: list[MessageRecord]) -> None:
        """User messages the previous owner saved but never got into the shared log (it
        died in between): published now, in order, right after the log's last event. A
        message's seq is kept when it is the next one (as it always is, `_flush`)."""
        async with self._lock:
            for user in users:
                seq = await self.seqs.next()
                if user.seq_start != seq:
                    moved = dataclasses.replace(user, seq_start=seq, seq_end=seq)
                    await self.store.chats.save_message(moved)
                    self.history = [moved if m.id == user.id else m for m in self.history]
                    user = moved
                self._publish(seq, user_message_event(user))

    async def end_cut_answer(
        self, cut: MessageRecord, streamed: list[wire.TranscriptEvent]
    ) -> None:
        """The previous owner died while writing `cut` (rebuilt from the shared log, as
        `streamed`): every watcher gets `error` then `done`, and it is saved incomplete."""
        async with self._lock:
            draft = Draft(cut)
            error = wire.Error(
                code="internal",
                message=CUT_OFF,
                chat_id=self.chat.id,
                seq=await self.seqs.next(ending=True),
                retryable=True,
            )
            draft.apply(error)
            done = wire.Done(
                chat_id=self.chat.id,
                seq=await self.seqs.next(ending=True),
                message_id=cut.id,
                reason="error",
                model=cut.model or "",
                usage=usage_of(cut.input_tokens, cut.output_tokens),
                html=self.render(cut.text),
            )
            record = draft.apply(done)
            record.status = "incomplete"
            await self.store.chats.save_message(draft.snapshot())
            self.history = [m for m in self.history if m.id != record.id] + [record]
            self._sent = list(streamed)
            self._publish(error.seq or 0, error)
            self._publish(done.seq, done)

    def _say(self, frame: str) -> None:
        """Through the shared log's writer, in order with the events before it, to every
        instance's readers: this instance's get it once it is published (as its events),
        so a `status` never overtakes the `user_message` or the tokens it follows."""
        self.shared.say(max(self._sending, default=self.last_seq), frame)

    def _said_here(self, frame: str) -> None:
        super()._say(frame)

    async def close(self) -> None:
        """Close as any session, then flush the shared log and give the lease up."""
        try:
            await super().close()
        finally:
            await self.shared.aclose()
            await self._on_closed(self)


class FollowerSession(ChatSession):
    """The session of a chat another instance owns: it mirrors the chat's shared log for
    the readers of this instance. Messages and stops go to the owner (`ClusterNode`)."""

    def __init__(
        self,
        chat: ChatRecord,
        history: list[MessageRecord],
        *,
        bus: Bus,
        fill: Callable[[FollowerSession], None],
        on_stop: Callable[[str], None],
        on_closed: Callable[[FollowerSession], Awaitable[None]],
        on_deleted: Callable[[FollowerSession], None],
        on_new_epoch: Callable[[FollowerSession], None],
        **options: Any,
    ) -> None:
        super().__init__(chat, history, **options)
        self.bus = bus
        self.epoch: str | None = None
        self._fill = fill
        self._on_stop = on_stop
        self._on_closed = on_closed
        self._on_deleted = on_deleted
        self._on_new_epoch = on_new_epoch
        # The log it mirrors was lost: it waits to be rebuilt, and takes nothing more.
        self.outdated = False
        # Live events that arrived while the mirror was loading or a gap was being filled.
        self.held: list[LiveEvent] = []
        # Frames without a seq that wait for the events they follow, in the owner's order.
        self.said: list[LiveEvent] = []
        self.filling = True
        # Set (and replaced) each time the mirror takes an event.
        self._advanced = asyncio.Event()

    # --- building the mirror ----------------------------------------------------------

    def load(
        self,
        epoch: str | None,
        top: int,
        events: list[tuple[int, str]],
        rows: list[MessageRecord],
    ) -> None:
        """Build the transcript as of `top`: the saved messages every event up to `top`
        is in, plus what the log's events add (the running answer, exactly as streamed).
        `rows` must be read after `top` was, so every message published by then is there.
        """
        self.epoch = epoch
        self.last_seq = top
        self.log = MemoryEventLog(events[0][0] - 1 if events else top)
        self.history = [row for row in rows if _settled(row, top)]
        self.draft = None
        known = {row.id for row in self.history}
        unsettled = {row.id: row for row in rows if row.id not in known and row.seq_start <= top}
        settled = _seq_ranges(self.history)
        for seq, frame in events:
            self.log.append(seq, frame)
            # Most of a long log is answers already saved: their frames are only relayed,
            # never taken apart (the parse was most of a cold follower's CPU).
            if settled.covers(seq):
                continue
            event = wire.parse_server_message(frame)
            if getattr(event, "message_id", None) in known:
                continue
            self._mirror(seq, event, unsettled)
        self.context_tokens = next(
            (m.context_tokens for m in reversed(self.history) if m.context_tokens), 0
        )
        self.filling = False
        held, self.held = sorted(self.held, key=lambda live: live.seq), []
        for live in held:
            self.receive(live)
        self._release_said(final=not self.filling)

    def receive(self, event: LiveEvent) -> None:
        """A live event of the chat, in any order: mirrored and delivered in seq order."""
        if self.outdated:
            return
        if self.filling:
            (self.said if event.said else self.held).append(event)
            return
        if event.epoch != self.epoch:
            self.new_epoch()
            return
        if event.said:
            self._hear(event)
            return
        if event.seq <= self.last_seq:
            return
        if event.seq > self.last_seq + 1:
            self.held.append(event)
            self.filling = True
            self._fill(self)
            return
        self._take(event.seq, event.frame)

    def resync(self) -> None:
        """Live events may have been missed (the pub/sub connection was lost): read the
        log after `last_seq`, holding what arrives meanwhile."""
        if not self.filling and self.state is not SessionState.CLOSED:
            self.filling = True
            self._fill(self)

    def new_epoch(self) -> None:
        """The shared log was lost (Redis restarted empty) and began again: what this
        mirrors, and what its readers resume from, is gone. The session is rebuilt (its
        readers get the history); meanwhile it takes nothing more."""
        if self.outdated or self.state is SessionState.CLOSED:
            return
        log.warning("chat %s: the shared log has a new epoch; rebuilding", self.chat.id)
        self.outdated = True
        self.held, self.said = [], []
        self._on_new_epoch(self)

    def filled(self, epoch: str | None, events: list[tuple[int, str]]) -> None:
        """The log's events after `last_seq`, read to fill a gap; then what was held."""
        if self.outdated:
            return
        if epoch != self.epoch:
            self.new_epoch()
            return
        held, self.held = self.held, []
        self.filling = False
        by_seq = dict(events)
        for event in held:
            by_seq.setdefault(event.seq, event.frame)
        for seq in sorted(by_seq):
            if seq <= self.last_seq:
                continue
            if seq > self.last_seq + 1 and (self.last_seq + 1) not in by_seq:
                # Nothing in between in the log itself: seqs the owner skipped (a crash
                # left a reservation unused), not events lost on the way.
                self.log = MemoryEventLog(seq - 1)
            self._take(seq, by_seq[seq])
        self._release_said(final=True)

    def _take(self, seq: int, frame: str) -> None:
        self.log.append(seq, frame)
        self._mirror(seq, wire.parse_server_message(frame), {})
        self.last_seq = seq
        self.fanout.publish(frame)
        self.last_activity = time.monotonic()
        self._advanced.set()
        self._advanced = asyncio.Event()
        if self.said:
            self._release_said(final=False)

    def _hear(self, event: LiveEvent) -> None:
        """A frame without a seq: delivered once the events before it are, so every reader
        gets it where the owner's readers did."""
        if self.filling or (event.epoch == self.epoch and event.seq > self.last_seq):
            self.said.append(event)
            if not self.filling:
                # The events it follows were lost on the way: read them from the log.
                self.filling = True
                self._fill(self)
            return
        self._deliver_said(event.frame)

    def _release_said(self, *, final: bool) -> None:
        """Deliver the said frames whose events are in; `final`: the log has no more to
        give (loaded or filled), so every one of them."""
        while self.said and (final or self.said[0].seq <= self.last_seq):
            said = self.said.pop(0)
            if said.epoch != self.epoch:
                self.new_epoch()
                return
            self._deliver_said(said.frame)

    def _deliver_said(self, frame: str) -> None:
        if self.state is SessionState.CLOSED:
            return
        event = wire.parse_server_message(frame)
        if isinstance(event, wire.ChatUpdated):
            # Later subscribers get it in `subscribed.chat` too.
            self.chat = dataclasses.replace(
                self.chat,
                title=event.chat.title,
                model=event.chat.model,
                updated_at=event.chat.updated_at or self.chat.updated_at,
            )
        self.fanout.publish(frame)
        if isinstance(event, wire.Error) and event.code == "not_found":
            # The chat was deleted (its owner said so after its last event): nothing more,
            # and a subscribe from now on is refused.
            self.fanout.clear()
            self.state = SessionState.CLOSED
            self._on_deleted(self)

    async def catch_up(self, seq: int) -> None:
        """Wait until the mirror has every event up to `seq` (or is closed): a reader coming
        from the owner may have seen events still on their way here. The caller bounds it."""
        while self.last_seq < seq and self.state is not SessionState.CLOSED:
            await self._advanced.wait()

    def _mirror(self, seq: int, event: wire.ServerMessage, saved: dict[str, MessageRecord]) -> None:
        """Apply one event to the transcript, as the owner's turn did."""
        match event:
            case wire.UserMessage():
                if event.replaces:
                    # A regenerate or an edit: the replaced turn leaves the conversation.
                    gone = set(event.replaces)
                    self.history = [m for m in self.history if m.id not in gone]
                    self.context_tokens = next(
                        (m.context_tokens for m in reversed(self.history) if m.context_tokens),
                        0,
                    )
                self.history.append(
                    MessageRecord(
                        id=event.message_id,
                        chat_id=self.chat.id,
                        role="user",
                        seq_start=seq,
                        seq_end=seq,
                        text=event.text,
                        client_message_id=event.client_message_id or None,
                        created_at=event.created_at or utcnow(),
                        replaces=list(event.replaces or []),
                    )
                )
            case wire.Token() | wire.Thinking() | wire.ToolUse() | wire.ToolResult():
                self._draft_for(event.message_id, saved).apply(event)
            case wire.Error():
                if self.draft is not None:
                    self.draft.apply(event)
            case wire.Done():
                draft = self._draft_for(event.message_id, saved)
                self.history.append(draft.apply(event))
                self.draft = None
            case _:
                pass

    def _draft_for(self, message_id: str, saved: dict[str, MessageRecord]) -> Draft:
        if self.draft is not None and self.draft.record.id == message_id:
            return self.draft
        row = saved.get(message_id)
        if row is not None:
            answer = new_answer(message_id, self.chat.id, row.reply_to or "", row.model or "")
            answer.created_at = row.created_at
        else:
            answer = new_answer(message_id, self.chat.id, self._unanswered() or "", "")
        self.draft = Draft(answer)
        return self.draft

    def _unanswered(self) -> str | None:
        answered = {m.reply_to for m in self.history if m.role == "assistant"}
        for message in conversation_order(self.history):
            if message.role == "user" and message.id not in answered:
                return message.id
        return None

    # --- what differs from the owner --------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a turn is running or waiting, as the log tells."""
        return self.draft is not None or self._unanswered() is not None

    def admits(self) -> wire.ErrorCode | None:
        """Only the owner knows its queue; the context limit is known here too."""
        if self.context_tokens >= self.limits.context:
            return "chat_too_long"
        return None

    def prepare(self, model_id: str) -> None:
        """Nothing to get ready: turns run on the owner."""

    async def accept(self, **_: Any) -> MessageRecord:
        """Messages are accepted by the owner only."""
        raise NotOwner(self.chat.id)

    def enqueue(self, *turns: PendingTurn) -> None:
        """Turns run on the owner only."""
        raise NotOwner(self.chat.id)

    def stop(self) -> None:
        """Ask the owner to stop the running turn."""
        self._on_stop(self.chat.id)

    async def close(self) -> None:
        """Stop mirroring; the chat goes on on its owner."""
        if self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSED
        self.fanout.clear()
        await self._on_closed(self)


def cut_answers(
    events: list[tuple[int, str]], history: list[MessageRecord], chat_id: str, top: int
) -> list[tuple[MessageRecord, list[wire.TranscriptEvent]]]:
    """The answers a dead owner left unfinished, in order: those the shared log (up to
    `top`) shows begun and not done, and those saved with seqs beyond the log (their last
    events never got there). Each rebuilt exactly as streamed, with its events."""
    parsed = [wire.parse_server_message(frame) for _, frame in events]
    finished = {event.message_id for event in parsed if isinstance(event, wire.Done)}
    answers = (wire.Token, wire.Thinking, wire.ToolUse, wire.ToolResult)
    streamed: dict[str, list[wire.TranscriptEvent]] = {}
    for event in parsed:
        if isinstance(event, answers) and event.message_id not in finished:
            streamed.setdefault(event.message_id, []).append(event)
    for message in sorted(history, key=lambda m: m.seq_start):
        beyond = message.role == "assistant" and message.seq_end > top
        if beyond and message.id not in finished:
            streamed.setdefault(message.id, [])
    saved = {message.id: message for message in history}
    return [
        (_rebuilt(answer_id, own, saved.get(answer_id), history, chat_id), own)
        for answer_id, own in streamed.items()
        if not _ended(saved.get(answer_id), top)
    ]


def _ended(saved: MessageRecord | None, top: int) -> bool:
    """Saved as ended within the log, though its `done` is not there (the turn could not
    get a seq for it)."""
    return (
        saved is not None
        and saved.status not in (STREAMING, "incomplete")
        and (saved.seq_end <= top)
    )


def _rebuilt(
    answer_id: str,
    events: list[wire.TranscriptEvent],
    saved: MessageRecord | None,
    history: list[MessageRecord],
    chat_id: str,
) -> MessageRecord:
    if saved is not None:
        start = new_answer(answer_id, chat_id, saved.reply_to or "", saved.model or "")
        start.created_at = saved.created_at
        start.client_address = saved.client_address
    else:
        answered = {m.reply_to for m in history if m.role == "assistant"}
        waiting = [m for m in conversation_order(history) if m.role == "user"]
        reply_to = next((m.id for m in waiting if m.id not in answered), "")
        start = new_answer(answer_id, chat_id, reply_to, "")
    return draft_of(start, events)


class _SeqRanges:
    """The seqs of saved messages, asked about in rising order (as a log is read).

    Turns run one at a time, so every event whose seq lies within a saved answer's seqs
    belongs to that answer or to a message saved before it was published (a question
    queued behind it): an event there changes nothing in the transcript."""

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self._ranges = sorted(ranges)
        self._next = 0

    def covers(self, seq: int) -> bool:
        """Whether a saved message's seqs include `seq` (`seq` never goes down)."""
        ranges = self._ranges
        while self._next < len(ranges) and ranges[self._next][1] < seq:
            self._next += 1
        return self._next < len(ranges) and ranges[self._next][0] <= seq


def _seq_ranges(history: list[MessageRecord]) -> _SeqRanges:
    return _SeqRanges([(m.seq_start, m.seq_end) for m in history if m.seq_start])


def _settled(row: MessageRecord, top: int) -> bool:
    """Whether a saved message is complete as of the log's seq `top`."""
    if row.role == "user":
        return row.seq_start <= top
    return row.status != STREAMING and row.seq_end <= top


def starting_record(chat: ChatRecord, top: int) -> ChatRecord:
    """The chat's row as a session starting at `top` sees it."""
    return dataclasses.replace(chat, last_seq=top)
