"""Partial answers saved together: every running answer of the process, once a
`save_interval`, in one statement.

A running answer is saved now and then so that a crash loses at most an interval of it
(start-up marks it incomplete). Saved one by one, each running answer costs a transaction
of its own every interval, the largest CPU cost of a server streaming many answers. Here
one saver passes every running answer that changed to the store at once: an answer's first
save, and a save after its tool calls changed, still write the whole message; every other
save is a row of one bulk UPDATE.

A turn ends with `settle`: it waits for a save of its answer under way, so that the final
save, which follows, is the last one to land.

With several instances, an owner's running answers carry its lease's token (`track`'s
`fence`): each of their saves lands only while no higher token saved to the chat, so an
owner that was taken over cannot overwrite what the new owner saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from blogchat.drafts import Draft
from blogchat.store import MessageRecord
from blogchat.store.chats import ChatStore, StaleOwner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Saved:
    """What the database holds of a running answer: up to which seq, which tool calls."""

    seq_end: int
    tools: tuple[tuple[str, bool], ...]


def _tools_of(record: MessageRecord) -> tuple[tuple[str, bool], ...]:
    return tuple((call.tool_use_id, call.output is not None) for call in record.tool_calls)


class PartialSaves:
    """The saver of every running answer of this process (see the module's docstring)."""

    def __init__(self, chats: ChatStore, interval: float) -> None:
        self.chats = chats
        self.interval = interval
        self._drafts: dict[str, Draft] = {}
        self._saved: dict[str, _Saved] = {}
        # The owner's token of each fenced answer (several instances).
        self._fences: dict[str, int] = {}
        # The save under way, and the answers it holds.
        self._round: asyncio.Task[None] | None = None
        self._in_round: frozenset[str] = frozenset()
        self._ticker: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._drafts)

    def track(self, draft: Draft, fence: int | None = None) -> None:
        """Save this running answer every interval from now on, until `settle` or `forget`;
        with a `fence`, only while no higher token saved to its chat."""
        self._drafts[draft.record.id] = draft
        if fence is not None:
            self._fences[draft.record.id] = fence
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick(), name="partial-saves")

    def forget(self, draft: Draft) -> None:
        """Save this answer no more (a save of it under way may still land)."""
        self._drafts.pop(draft.record.id, None)
        self._saved.pop(draft.record.id, None)
        self._fences.pop(draft.record.id, None)

    async def settle(self, draft: Draft) -> None:
        """Save this answer no more, once a save of it under way has landed: the turn's
        final save, which comes next, must not be overwritten by a partial one."""
        self.forget(draft)
        running = self._round
        if running is not None and not running.done() and draft.record.id in self._in_round:
            await asyncio.shield(running)

    async def save_now(self) -> None:
        """Save every running answer that changed since its last save (after the save under
        way, if there is one)."""
        if self._round is not None and not self._round.done():
            await asyncio.shield(self._round)
        # Snapshots taken here, at once: each save holds what readers were sent by now.
        due = [
            draft.snapshot()
            for answer_id, draft in self._drafts.items()
            if draft.started and draft.record.seq_end != self._seq_saved(answer_id)
        ]
        if not due:
            return
        self._in_round = frozenset(record.id for record in due)
        self._round = asyncio.create_task(self._save(due), name="partial-save")
        await asyncio.shield(self._round)

    async def aclose(self) -> None:
        """Stop saving (at shutdown, once the sessions are closed)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._round is not None and not self._round.done():
            await asyncio.shield(self._round)

    def _seq_saved(self, answer_id: str) -> int:
        saved = self._saved.get(answer_id)
        return -1 if saved is None else saved.seq_end

    async def _save(self, due: list[MessageRecord]) -> None:
        whole: list[MessageRecord] = []
        rows: list[MessageRecord] = []
        # Taken now: a turn settled meanwhile forgets its answer's token.
        fences = {record.id: self._fences[record.id] for record in due if record.id in self._fences}
        for record in due:
            saved = self._saved.get(record.id)
            fresh = saved is None or saved.tools != _tools_of(record)
            (whole if fresh else rows).append(record)
        for record in whole:
            try:
                await self.chats.save_message(record, fence=fences.get(record.id))
            except StaleOwner:
                # Another instance took the chat over: its owner's log and final save are
                # refused too, and end the turn here.
                log.warning("chat %s: partial answer not saved: taken over", record.chat_id)
                continue
            except Exception:
                log.exception("chat %s: could not save the partial answer", record.chat_id)
                continue
            self._mark_saved(record)
        try:
            await self.chats.save_partial_answers(rows, fences)
        except Exception:
            log.exception("could not save %d partial answer(s)", len(rows))
            return
        for record in rows:
            self._mark_saved(record)

    def _mark_saved(self, record: MessageRecord) -> None:
        if record.id in self._drafts:  # (not settled meanwhile)
            self._saved[record.id] = _Saved(record.seq_end, _tools_of(record))

    async def _tick(self) -> None:
        while self._drafts:
            await asyncio.sleep(self.interval)
            try:
                await self.save_now()
            except Exception:  # pragma: no cover - _save logs its own failures
                log.exception("a round of partial saves failed")
