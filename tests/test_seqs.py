"""The seq counter in process: strictly increasing, never beyond what the database holds."""

from __future__ import annotations

import pytest

from blogchat.seqs import AHEAD, BACKOFF, FOR_THE_END, SeqCounter, SeqsExhausted


class Database:
    """The chat's `last_seq` as the counter's partner sees it; it can refuse."""

    def __init__(self, last_seq: int = 0) -> None:
        self.last_seq = last_seq
        self.refuse = False
        self.reservations: list[int] = []

    async def reserve(self, upto: int) -> None:
        self.reservations.append(upto)
        if self.refuse:
            raise OSError("the database is gone")
        self.last_seq = max(self.last_seq, upto)

    async def settle(self, reserved: int, published: int) -> bool:
        if self.refuse or self.last_seq != reserved:
            return False
        self.last_seq = published
        return True


async def test_seqs_follow_the_high_water_mark_and_reserve_a_block_ahead() -> None:
    db = Database(last_seq=41)
    counter = SeqCounter(41, db.reserve, block=100)
    seqs = [await counter.next() for _ in range(250)]
    assert seqs == list(range(42, 292))
    # Every seq handed out was reserved first, and blocks are reserved before running out.
    assert db.last_seq >= 291 + AHEAD - 100 + 1
    assert all(seq <= db.last_seq for seq in seqs)


async def test_a_refused_reservation_is_tried_again_later_and_the_turn_can_still_end() -> None:
    db = Database()
    counter = SeqCounter(0, db.reserve, block=200)
    for _ in range(200 - AHEAD):
        await counter.next()
    db.refuse = True
    handed = [await counter.next() for _ in range(AHEAD - FOR_THE_END)]
    with pytest.raises(SeqsExhausted):
        await counter.next()
    # Ordinary events stop short of the reservation, leaving seqs to end the turn with.
    assert handed[-1] == 200 - FOR_THE_END
    # Tries were spaced out, not made for every seq.
    tries = db.reservations[1:]
    assert len(tries) == len(range(200 - AHEAD + 1, 200 - FOR_THE_END + 1, BACKOFF))
    ending = [await counter.next(ending=True) for _ in range(FOR_THE_END)]
    assert ending == list(range(200 - FOR_THE_END + 1, 201))
    with pytest.raises(SeqsExhausted):
        await counter.next(ending=True)
    # The database comes back: the counter goes on right after the last seq it gave.
    db.refuse = False
    counter._next_try = 0
    assert await counter.next() == 201


async def test_a_counter_that_never_reserved_hands_out_nothing() -> None:
    db = Database(last_seq=7)
    db.refuse = True
    counter = SeqCounter(7, db.reserve)
    with pytest.raises(SeqsExhausted):
        await counter.next()
    with pytest.raises(SeqsExhausted):
        await counter.next(ending=True)


async def test_a_seq_given_back_is_handed_out_again_only_if_it_was_the_last() -> None:
    counter = SeqCounter(0, Database().reserve)
    first = await counter.next()
    second = await counter.next()
    counter.give_back(first)
    assert await counter.next() == second + 1
    counter.give_back(second + 1)
    assert await counter.next() == second + 1


async def test_settling_gives_back_the_unused_reservation_unless_someone_reserved_since() -> None:
    db = Database()
    counter = SeqCounter(0, db.reserve, block=100)
    for _ in range(5):
        await counter.next()
    await counter.settle(5, db.settle)
    assert db.last_seq == 5
    # A new counter starts right after; another one's reservation is never lowered.
    other = SeqCounter(5, db.reserve, block=100)
    await other.next()
    await other.next()
    db.last_seq = 900
    await other.settle(7, db.settle)
    assert db.last_seq == 900


async def test_a_user_message_takes_its_seq_with_the_reservation_its_save_must_write() -> None:
    db = Database(last_seq=10)
    counter = SeqCounter(10, db.reserve, block=1000)
    # Nothing reserved yet: the message's own transaction writes the reservation.
    seq, upto = counter.take()
    assert (seq, upto) == (11, 1010)
    counter.reserved_to(1010)
    # Covered now: the events that follow need no write until the block runs low.
    assert counter.take() == (12, None)
    assert [await counter.next() for _ in range(3)] == [13, 14, 15]
    assert db.reservations == []
    # A save that failed gives its seq back; the reservation it carried was not written.
    seq, upto = counter.take()
    counter.give_back(seq)
    assert counter.take() == (seq, upto)


async def test_a_taken_seq_past_the_reservation_always_comes_with_a_reservation() -> None:
    counter = SeqCounter(0, Database().reserve, block=1000)
    seq, upto = counter.take()
    counter.reserved_to(upto or 0)
    while True:
        seq, upto = counter.take()
        if upto is not None:
            break
        assert seq <= 1000 - AHEAD
    # Asked for ahead, as `next` does, so the block never runs out under a message.
    assert (seq, upto) == (1000 - AHEAD + 1, 1000 - AHEAD + 1000)
