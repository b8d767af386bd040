"""A chat's seqs: handed out one by one, strictly increasing, never used twice.

Each chat has one counter. A seq must never be reused, not after a failed write, a closed
session, a restart or a crash, or a client that saw it would take a new event for one it
already has. So seqs are reserved in the database ahead of use (`chats.last_seq` is a
high-water mark), a block at a time, and a seq beyond the reservation is never handed out:
a counter that cannot reserve more ends the turn instead of streaming on unprotected.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

# Seqs reserved per database write: handing one out rarely costs a write.
BLOCK = 1000
# A new block is reserved this long before the current one runs out, so that a failed
# reservation can be tried again while the turn goes on.
AHEAD = 100
# Kept back for the events that end a turn (`error` and `done`, and the `error` and `done`
# that replace a `done` whose answer could not be saved): a turn that can reserve
# no more seqs can still end properly.
FOR_THE_END = 3
# After a failed reservation, the next try waits for this many more seqs.
BACKOFF = 10

Reserve = Callable[[int], Awaitable[None]]
Settle = Callable[[int, int], Awaitable[bool]]


class SeqsExhausted(Exception):
    """No seq can be handed out safely: the database refused to reserve more."""


class SeqCounter:
    """Hands out one chat's seqs from a reservation kept in the database."""

    def __init__(self, last_seq: int, reserve: Reserve, *, block: int = BLOCK) -> None:
        # The chat's high-water mark: every seq up to it may have been used before.
        self.allocated = last_seq
        self.reserved = last_seq
        self._reserve = reserve
        self._block = block
        self._next_try = last_seq + 1

    async def next(self, *, ending: bool = False) -> int:
        """The next seq. Only the events that end a turn (`ending`) may use the last
        `FOR_THE_END` seqs of the reservation; raises SeqsExhausted when none is left."""
        seq = self.allocated + 1
        if seq > self.reserved - AHEAD and seq >= self._next_try:
            try:
                await self._reserve(seq + self._block - 1)
            except Exception:
                log.exception("could not reserve seqs after %d", self.reserved)
                self._next_try = seq + BACKOFF
            else:
                self.reserved = seq + self._block - 1
        limit = self.reserved if ending else self.reserved - FOR_THE_END
        if seq > limit:
            raise SeqsExhausted(f"seq {seq} is beyond the reservation {self.reserved}")
        self.allocated = seq
        return seq

    def take(self) -> tuple[int, int | None]:
        """The next seq for an event saved in a transaction that can record a reservation
        too (a user message): the seq, and the high-water mark that transaction must write
        with it (None: the reservation covers it already). Once the transaction committed,
        `reserved_to` that mark; if it failed, `give_back` the seq."""
        seq = self.allocated + 1
        upto = seq + self._block - 1 if seq > self.reserved - AHEAD else None
        self.allocated = seq
        return seq, upto

    def reserved_to(self, upto: int) -> None:
        """The database holds a reservation up to `upto` now (see `take`)."""
        if upto > self.reserved:
            self.reserved = upto

    def give_back(self, seq: int) -> None:
        """A seq handed out but never published (its event could not be saved): the next
        event takes it, so the published seqs stay contiguous."""
        if seq == self.allocated:
            self.allocated = seq - 1

    async def settle(self, published: int, settle: Settle) -> None:
        """Give back the unused part of the reservation (a clean close), so the next
        session continues right after `published`: only if nobody reserved since."""
        if self.reserved <= published:
            return
        try:
            settled = await settle(self.reserved, published)
        except Exception:
            log.exception("could not give back the seqs after %d", published)
            return
        if settled:
            self.reserved = self.allocated = published
