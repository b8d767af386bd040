"""The cluster bus on a real Redis: fenced leases, a gap-free log, the live feed, the epoch,
the list of leases; and what a new owner finds unfinished in the log and the rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio
from redis.asyncio.client import PubSub

from blogchat import protocol as wire
from blogchat.cluster.bus import Bus, Fenced, Holder, Lease, Listed, LiveEvent, LogRead, SeqGap
from blogchat.cluster.sessions import cut_answers
from blogchat.store import STREAMING, MessageRecord
from tests.support.redis import REDIS_URL, forget_prefix, require_redis, unique_prefix

CHAT = "chat-1"


@pytest.fixture
async def client() -> AsyncIterator[redis.asyncio.Redis]:
    await require_redis()
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    prefix = unique_prefix()
    client.test_prefix = prefix  # type: ignore[attr-defined]
    try:
        yield client
    finally:
        await forget_prefix(client, prefix)
        await client.aclose()


def bus(client: redis.asyncio.Redis, instance: str) -> Bus:
    prefix: str = client.test_prefix  # type: ignore[attr-defined]
    return Bus(client, prefix, instance=instance, lease_seconds=5)


async def lapse(client: redis.asyncio.Redis, one: Bus, chat_id: str = CHAT) -> None:
    """The holder stops renewing and its lease runs out (as after a crash or a pause): the
    lease key expires, and the list shows it past its time."""
    await client.delete(one.key(chat_id, "lease"))
    await client.zadd(one.leases, {f"{chat_id} {one.instance}": 0})


def frames(first: int, last: int) -> list[tuple[int, str]]:
    return [(seq, f'{{"seq":{seq}}}') for seq in range(first, last + 1)]


async def listening(client: redis.asyncio.Redis, one: Bus) -> PubSub:
    """A subscriber to the chat's live channel, its subscription confirmed."""
    pubsub = client.pubsub()
    await pubsub.subscribe(one.channel(CHAT))
    confirmation = await pubsub.get_message(timeout=5)
    assert confirmation is not None
    assert confirmation["type"] == "subscribe"
    return pubsub


async def published(pubsub: PubSub, *, until_seq: int) -> list[LiveEvent]:
    """Every event published to the subscriber up to `until_seq`, in order; then it closes."""
    seen: list[LiveEvent] = []
    while not seen or seen[-1].seq != until_seq:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None, "an appended event was not published"
        seen.append(Bus.parse_live(message["data"]))
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    return seen


async def test_a_lease_is_held_by_one_instance_at_a_time(client: redis.asyncio.Redis) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    lease = await a.acquire(CHAT, floor=0)
    assert isinstance(lease, Lease)
    assert (lease.fence, lease.seq) == (1, 0)
    assert await b.acquire(CHAT, floor=0) == Holder("a", 1)
    assert await b.holder(CHAT) == Holder("a", 1)
    await b.release(Lease(CHAT, "b", 1, 0, lease.epoch))  # not b's to release
    assert await b.holder(CHAT) == Holder("a", 1)
    assert await a.renew(lease)
    await a.release(lease)
    assert await a.holder(CHAT) is None
    assert not await a.renew(lease)


async def test_every_new_holder_gets_a_higher_token(client: redis.asyncio.Redis) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    tokens = []
    for holder in (a, b, a, b):
        lease = await holder.acquire(CHAT, floor=0)
        assert isinstance(lease, Lease)
        tokens.append(lease.fence)
        await lapse(client, holder)
    assert tokens == sorted(set(tokens))


async def test_a_stale_holder_can_append_nothing_after_a_takeover(
    client: redis.asyncio.Redis,
) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    old = await a.acquire(CHAT, floor=0)
    assert isinstance(old, Lease)
    assert await a.append(old, frames(1, 3)) == 3
    await lapse(client, a)
    new = await b.acquire(CHAT, floor=0)
    assert isinstance(new, Lease)
    assert new.fence > old.fence
    assert new.seq == 3, "the new holder continues the log"
    with pytest.raises(Fenced):
        await a.append(old, frames(4, 4))
    assert not await a.renew(old)
    await a.release(old)
    assert await a.holder(CHAT) == Holder("b", new.fence), "a stale release frees nothing"
    assert await b.append(new, frames(4, 5)) == 5
    read = await a.read(CHAT)
    assert [seq for seq, _ in read.events] == [1, 2, 3, 4, 5]


async def test_seqs_in_the_log_are_contiguous(client: redis.asyncio.Redis) -> None:
    a = bus(client, "a")
    lease = await a.acquire(CHAT, floor=0)
    assert isinstance(lease, Lease)
    await a.append(lease, frames(1, 2))
    for bad in ([(2, "again")], [(4, "skips 3")], [(3, "x"), (5, "hole inside")]):
        with pytest.raises(SeqGap):
            await a.append(lease, bad)
    await a.append(lease, frames(3, 4))
    read = await a.read(CHAT, after_seq=1)
    assert read.events == frames(2, 4)
    assert read.top == 4
    assert read.epoch == lease.epoch


async def test_a_new_holder_continues_right_after_the_log_whatever_the_database_reserved(
    client: redis.asyncio.Redis,
) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    first = await a.acquire(CHAT, floor=0)
    assert isinstance(first, Lease)
    await a.append(first, frames(1, 2))
    await lapse(client, a)
    # The dead holder had reserved seqs up to 1000 in the database, but no reader was sent
    # any event the log does not have: the log goes on without a hole.
    second = await b.acquire(CHAT, floor=1000)
    assert isinstance(second, Lease)
    assert second.seq == 2
    with pytest.raises(SeqGap):
        await b.append(second, frames(1001, 1001))
    await b.append(second, frames(3, 3))
    assert [seq for seq, _ in (await b.read(CHAT)).events] == [1, 2, 3]


async def test_every_append_is_published_in_order_with_its_epoch(
    client: redis.asyncio.Redis,
) -> None:
    a = bus(client, "a")
    lease = await a.acquire(CHAT, floor=0)
    assert isinstance(lease, Lease)
    pubsub = await listening(client, a)
    await a.append(lease, frames(1, 2))
    await a.append(lease, frames(3, 3))
    seen = await published(pubsub, until_seq=3)
    assert [(event.seq, event.frame) for event in seen] == frames(1, 3)
    assert {event.epoch for event in seen} == {lease.epoch}


async def test_overlapping_appends_skip_what_the_log_has_and_publish_each_event_once(
    client: redis.asyncio.Redis,
) -> None:
    a = bus(client, "a")
    lease = await a.acquire(CHAT, floor=0)
    assert isinstance(lease, Lease)
    pubsub = await listening(client, a)
    # Each append carries every event not confirmed yet, in whichever order they land.
    assert await a.append(lease, frames(1, 3)) == 3
    assert await a.append(lease, frames(1, 2)) == 3  # Landed after the one above.
    assert await a.append(lease, frames(2, 5)) == 5
    # An event the log has must be the same: otherwise it is no overlap but a gap.
    for bad in ([(4, "changed"), (5, '{"seq":5}')], [(5, '{"seq":5}'), (7, "hole")]):
        with pytest.raises(SeqGap):
            await a.append(lease, bad)
    await a.append(lease, frames(6, 6))  # The last one published: every earlier one came.
    seen = await published(pubsub, until_seq=6)
    assert [(event.seq, event.frame) for event in seen] == frames(1, 6)
    assert (await a.read(CHAT)).events == frames(1, 6)


async def test_frames_without_a_seq_are_said_in_order_by_the_holder_only(
    client: redis.asyncio.Redis,
) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    old = await a.acquire(CHAT, floor=0)
    assert isinstance(old, Lease)
    pubsub = client.pubsub()
    await pubsub.subscribe(a.channel(CHAT))
    confirmation = await pubsub.get_message(timeout=5)
    assert confirmation is not None
    await a.append(old, frames(1, 2))
    await a.say(old, 2, '{"type":"status"}')
    await a.append(old, frames(3, 3))
    await lapse(client, a)
    new = await b.acquire(CHAT, floor=3)
    assert isinstance(new, Lease)
    with pytest.raises(Fenced):
        await a.say(old, 3, '{"type":"stale"}')
    await b.say(new, 3, '{"type":"chat_updated"}')
    seen: list[LiveEvent] = []
    while len(seen) < 5:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None, "a frame was not published"
        seen.append(Bus.parse_live(message["data"]))
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    assert [(event.seq, event.frame, event.said) for event in seen] == [
        (1, '{"seq":1}', False),
        (2, '{"seq":2}', False),
        (2, '{"type":"status"}', True),
        (3, '{"seq":3}', False),
        (3, '{"type":"chat_updated"}', True),
    ]
    # Said frames are no part of the log.
    assert [seq for seq, _ in (await b.read(CHAT)).events] == [1, 2, 3]


async def test_a_lost_log_gets_a_new_epoch_and_refuses_the_old_holder(
    client: redis.asyncio.Redis,
) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    old = await a.acquire(CHAT, floor=0)
    assert isinstance(old, Lease)
    await a.append(old, frames(1, 5))
    await forget_prefix(client, a.prefix)
    with pytest.raises(Fenced):
        await a.append(old, frames(6, 6))
    # The database saw seqs up to 1005 reserved; the new log starts after them.
    new = await b.acquire(CHAT, floor=1005)
    assert isinstance(new, Lease)
    assert new.epoch != old.epoch
    assert new.seq == 1005
    read = await b.read(CHAT)
    assert (read.epoch, read.events) == (new.epoch, [])
    with pytest.raises(Fenced):
        await a.append(old, frames(1006, 1006))


async def test_only_the_holder_trims_the_log(client: redis.asyncio.Redis) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    old = await a.acquire(CHAT, floor=0)
    assert isinstance(old, Lease)
    await a.append(old, frames(1, 6))
    await a.trim(old, before_seq=3)
    assert [seq for seq, _ in (await a.read(CHAT)).events] == [3, 4, 5, 6]
    await lapse(client, a)
    assert isinstance(await b.acquire(CHAT, floor=6), Lease)
    await a.trim(old, before_seq=6)
    assert [seq for seq, _ in (await a.read(CHAT)).events] == [3, 4, 5, 6]


async def test_two_instances_racing_for_a_chat_get_one_lease(client: redis.asyncio.Redis) -> None:
    buses = [bus(client, f"i{n}") for n in range(8)]
    results = await asyncio.gather(*(one.acquire(CHAT, floor=0) for one in buses))
    leases = [result for result in results if isinstance(result, Lease)]
    assert len(leases) == 1
    assert all(
        result == Holder(leases[0].instance, leases[0].fence)
        for result in results
        if not isinstance(result, Lease)
    )


async def test_after_a_lost_log_tokens_stay_above_what_the_database_saw(
    client: redis.asyncio.Redis,
) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    for _ in range(3):
        lease = await a.acquire(CHAT, floor=0)
        assert isinstance(lease, Lease)
        await lapse(client, a)
    assert lease.fence == 3
    await forget_prefix(client, a.prefix)
    # The database's chat row says token 3 saved last: the next one must be higher.
    new = await b.acquire(CHAT, floor=0, fence_floor=3)
    assert isinstance(new, Lease)
    assert new.fence == 4
    await lapse(client, b)
    following = await a.acquire(CHAT, floor=0, fence_floor=3)
    assert isinstance(following, Lease)
    assert following.fence == 5


async def test_a_read_gives_the_frames_exactly_and_nothing_past_the_log(
    client: redis.asyncio.Redis,
) -> None:
    a = bus(client, "a")
    assert await a.read(CHAT) == LogRead(None, 0, []), "no log yet"
    lease = await a.acquire(CHAT, floor=0)
    assert isinstance(lease, Lease)
    odd = [(1, '{"text":"a b\\n\\u00e9"}'), (2, "é ✓ \n two lines"), (3, " ")]
    await a.append(lease, odd)
    assert (await a.read(CHAT)).events == odd
    assert (await a.read(CHAT, after_seq=2)).events == odd[2:]
    assert await a.read(CHAT, after_seq=3) == LogRead(lease.epoch, 3, [])


async def test_a_dead_holder_is_outlived_when_its_lease_lapses_or_another_takes_the_chat(
    client: redis.asyncio.Redis,
) -> None:
    # A sender whose message found the owner not listening waits for it to be outlived:
    # the lease lapses, or an instance that follows the chat takes it over first (then the
    # sender forwards to that one instead of waiting out a lease nobody will let lapse).
    a, b, c = (bus(client, name) for name in ("a", "b", "c"))
    dead = await a.acquire(CHAT, floor=0)
    assert isinstance(dead, Lease)
    found = await c.holder(CHAT)
    assert found == Holder("a", dead.fence)
    assert not await c.outlived(CHAT, found, within=0.3, poll=0.05), "a still holds it"

    await lapse(client, a)
    assert await c.outlived(CHAT, found, within=0, poll=0.05), "lapsed"

    taken = await b.acquire(CHAT, floor=0)
    assert isinstance(taken, Lease)
    assert await c.outlived(CHAT, found, within=0, poll=0.05), "taken over by b"
    assert not await c.outlived(CHAT, await c.holder(CHAT), within=0, poll=0.05)
    # Nobody held it when the message was sent: anyone holding it now is a live owner.
    assert await c.outlived(CHAT, None, within=0, poll=0.05)


# --- the list of leases, for the sweep of lapsed ones -----------------------------------------


async def listed(client: redis.asyncio.Redis, one: Bus) -> list[str]:
    return [str(member) for member in await client.zrange(one.leases, 0, -1)]


async def test_a_lease_is_listed_while_held_and_leaves_the_list_when_given_up(
    client: redis.asyncio.Redis,
) -> None:
    a = bus(client, "a")
    lease = await a.acquire(CHAT, floor=0)
    assert isinstance(lease, Lease)
    assert await listed(client, a) == [f"{CHAT} a"]
    assert await a.lapsed(10) == [], "a lease just taken is not lapsed"
    assert await a.renew(lease)
    await a.release(lease)
    assert await listed(client, a) == []


async def test_a_lapsed_lease_is_found_and_exactly_one_instance_takes_the_chat_over(
    client: redis.asyncio.Redis,
) -> None:
    a = bus(client, "a")
    old = await a.acquire(CHAT, floor=0)
    assert isinstance(old, Lease)
    await a.append(old, frames(1, 4))
    await lapse(client, a)
    others = [bus(client, name) for name in ("b", "c", "d")]
    found = await asyncio.gather(*(one.lapsed(10) for one in others))
    assert found == [[Listed(CHAT, "a")]] * 3
    claims = await asyncio.gather(*(one.acquire(CHAT, floor=1000) for one in others))
    leases = [claim for claim in claims if isinstance(claim, Lease)]
    assert len(leases) == 1
    assert leases[0].fence > old.fence
    assert leases[0].seq == 4
    for one in others:
        await one.forget(Listed(CHAT, "a"))
    # The new holder is listed; the dead one is not any more.
    assert f"{CHAT} {leases[0].instance}" in await listed(client, a)
    assert f"{CHAT} a" not in await listed(client, a)


async def test_forgetting_a_lapsed_entry_spares_one_renewed_meanwhile(
    client: redis.asyncio.Redis,
) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    lease = await a.acquire(CHAT, floor=0)
    assert isinstance(lease, Lease)
    await client.zadd(a.leases, {f"{CHAT} a": 0})
    assert await b.lapsed(10) == [Listed(CHAT, "a")]
    # a was only late: it renews before b gets to forget the entry.
    assert await a.renew(lease)
    await b.forget(Listed(CHAT, "a"))
    assert f"{CHAT} a" in await listed(client, a)
    assert await b.lapsed(10) == []


# --- what a new owner finds unfinished -------------------------------------------------------


def test_a_new_owner_finds_every_answer_left_unfinished_and_rebuilds_it_as_streamed() -> None:
    def token(seq: int, answer: str, text: str) -> tuple[int, str]:
        event = wire.Token(chat_id=CHAT, seq=seq, message_id=answer, text=text)
        return seq, event.to_json()

    done = wire.Done(
        chat_id=CHAT,
        seq=4,
        message_id="finished",
        reason="complete",
        model="m",
        usage=wire.Usage(input_tokens=1, output_tokens=2),
    )
    log = [token(2, "finished", "Done "), token(3, "finished", "here."), (4, done.to_json())]
    log += [token(6, "cut", "Hel"), token(7, "cut", "lo")]
    top = 7
    history = [
        MessageRecord(id="q1", chat_id=CHAT, role="user", seq_start=1, seq_end=1),
        MessageRecord(
            id="finished", chat_id=CHAT, role="assistant", seq_start=2, seq_end=4, reply_to="q1"
        ),
        MessageRecord(id="q2", chat_id=CHAT, role="user", seq_start=5, seq_end=5),
        # Saved as finished, but its last events and its done never reached the log.
        MessageRecord(
            id="cut",
            chat_id=CHAT,
            role="assistant",
            seq_start=6,
            seq_end=11,
            text="Hello, world",
            reply_to="q2",
            model="m",
        ),
    ]
    cuts = cut_answers(log, history, CHAT, top)
    assert [(cut.id, cut.text, cut.seq_start, cut.seq_end) for cut, _ in cuts] == [
        ("cut", "Hello", 6, 7)
    ]
    rebuilt, streamed = cuts[0]
    assert (rebuilt.status, rebuilt.reply_to, rebuilt.model) == (STREAMING, "q2", "m")
    assert [event.seq for event in streamed] == [6, 7]
    # An answer saved beyond the log with none of its events in it: cut, with nothing shown.
    history.append(
        MessageRecord(id="q3", chat_id=CHAT, role="user", seq_start=12, seq_end=12),
    )
    history.append(
        MessageRecord(
            id="unseen", chat_id=CHAT, role="assistant", seq_start=13, seq_end=15, text="No."
        )
    )
    cuts = cut_answers(log, history, CHAT, top)
    assert [(cut.id, cut.text, cut.seq_start) for cut, _ in cuts] == [
        ("cut", "Hello", 6),
        ("unseen", "", 0),
    ]


async def test_every_owned_lease_is_renewed_in_one_call_and_a_lost_one_is_told_apart(
    client: redis.asyncio.Redis,
) -> None:
    a, b = bus(client, "a"), bus(client, "b")
    chats = [f"chat-{n}" for n in range(5)]
    leases = [await a.acquire(chat_id, floor=0) for chat_id in chats]
    assert all(isinstance(lease, Lease) for lease in leases)
    held = [lease for lease in leases if isinstance(lease, Lease)]
    # chat-2's lease lapses and b takes it: a's renewal of it must fail, the others hold.
    await lapse(client, a, "chat-2")
    assert isinstance(await b.acquire("chat-2", floor=0), Lease)
    # The others are about to lapse: the renewal must reach every one of them.
    for chat_id in chats:
        if chat_id != "chat-2":
            await client.pexpire(a.key(chat_id, "lease"), 500)
    assert await a.renew_all(held) == [True, True, False, True, True]
    for chat_id in chats:
        ttl = await client.pttl(a.key(chat_id, "lease"))
        assert ttl > 1000, f"{chat_id}: {ttl} ms left"
    assert await a.holders_and_epochs(chats) == [
        (Holder("a", held[0].fence), held[0].epoch),
        (Holder("a", held[1].fence), held[1].epoch),
        (Holder("b", held[2].fence + 1), held[2].epoch),
        (Holder("a", held[3].fence), held[3].epoch),
        (Holder("a", held[4].fence), held[4].epoch),
    ]
    # The list of leases has each renewed one past now, and b's new one.
    assert await a.lapsed(10) == [Listed("chat-2", "a")]
    assert await a.renew_all([]) == []
    assert await a.holders_and_epochs([]) == []
    # A lost log has no epoch; the next holder's log has a new one.
    await client.delete(a.key("chat-0", "meta"), a.key("chat-0", "lease"))
    assert await a.holders_and_epochs(["chat-0"]) == [(None, None)]
    again = await b.acquire("chat-0", floor=0)
    assert isinstance(again, Lease)
    assert again.epoch != held[0].epoch
    assert await a.holders_and_epochs(["chat-0"]) == [(Holder("b", again.fence), again.epoch)]
