"""Quotas in process: turn rates (in memory and on a real Redis), token budgets and the
fair-share gate, on a moved clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Literal

import pytest
import redis.asyncio
import time_machine

from blogchat.quotas import (
    DAY,
    HOUR,
    Connections,
    GateTimeout,
    QuotaExceeded,
    Quotas,
    Spending,
    TurnGate,
    Who,
)
from blogchat.ratelimit import RateLimiter
from blogchat.settings import Settings
from tests.support.redis import REDIS_URL, forget_prefix, require_redis, unique_prefix

ALICE = Who("alice", "203.0.113.7", anonymous=True)
BOB = Who("bob", "203.0.113.7", anonymous=True)
CAROL = Who("carol", "198.51.100.2", anonymous=True)
DAN = Who("dan", "203.0.113.7", anonymous=False)


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, **values)  # type: ignore[arg-type]


class Ledger:
    """The token usage the database holds: (when, tokens) per visitor and per address."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Spending] = {}
        self.reads = 0

    def add(self, kind: str, key: str, at: float, tokens: int) -> None:
        self.rows.setdefault((kind, key), []).append((at, tokens))

    async def since(self, kind: Literal["visitor", "address"], key: str, since: float) -> Spending:
        self.reads += 1
        return [(at, t) for at, t in self.rows.get((kind, key), []) if at >= since]


@pytest.fixture
def clock() -> Iterator[time_machine.Traveller]:
    with time_machine.travel(1_800_000_000.0, tick=False) as traveller:
        yield traveller


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    """The turn counts in memory (one instance), then on Redis (several), alone on their
    keys."""
    if request.param == "memory":
        yield RateLimiter()
        return
    await require_redis()
    prefix = unique_prefix()
    limiter = RateLimiter(REDIS_URL, prefix=prefix)
    try:
        yield limiter
    finally:
        await limiter.aclose()
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            await forget_prefix(client, prefix)
        finally:
            await client.aclose()


async def test_an_anonymous_visitor_gets_its_turns_per_hour_then_a_refusal_with_the_wait(
    tmp_path: Path, clock: time_machine.Traveller, limiter: RateLimiter
) -> None:
    quotas = Quotas(settings(tmp_path, visitor_turns_per_hour=3), limiter, Ledger().since)
    for _ in range(3):
        await quotas.admit(ALICE)
        clock.shift(60)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(ALICE)
    assert refused.value.code == "rate_limited"
    # The first of the three leaves the window an hour after it was counted.
    assert refused.value.retry_after == pytest.approx(HOUR - 180, abs=1)
    assert "most messages allowed in an hour (3)" in refused.value.message
    # Another visitor of the same address still has turns: the address allows more.
    await quotas.admit(BOB)
    clock.shift(HOUR - 180 + 1)
    await quotas.admit(ALICE)


async def test_all_anonymous_visitors_of_one_address_share_its_rate(
    tmp_path: Path, clock: time_machine.Traveller, limiter: RateLimiter
) -> None:
    quotas = Quotas(
        settings(tmp_path, visitor_turns_per_hour=10, address_turns_per_hour=4),
        limiter,
        Ledger().since,
    )
    for who in (ALICE, BOB, ALICE, BOB):
        await quotas.admit(who)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(Who("new-cookie", ALICE.address, anonymous=True))
    assert "Your network has sent" in refused.value.message
    # A refused message counts nothing: elsewhere, and for signed-in readers, all is well.
    await quotas.admit(CAROL)
    await quotas.admit(DAN)


async def test_a_refusal_holds_until_the_window_frees_a_place_and_not_a_moment_longer(
    tmp_path: Path, clock: time_machine.Traveller, limiter: RateLimiter
) -> None:
    # (On Redis the refusal is remembered and `check` answers from it, asking nothing.)
    quotas = Quotas(settings(tmp_path, visitor_turns_per_hour=2), limiter, Ledger().since)
    await quotas.admit(ALICE)
    clock.shift(600)
    await quotas.admit(ALICE)
    for elapsed in (0, 1200, HOUR - 600 - 1):
        clock.move_to(1_800_000_000.0 + 600 + elapsed)
        with pytest.raises(QuotaExceeded) as refused:
            await quotas.admit(ALICE)
        assert refused.value.retry_after == pytest.approx(HOUR - 600 - elapsed, abs=1)
    clock.move_to(1_800_000_000.0 + HOUR + 1)
    await quotas.admit(ALICE)
    with pytest.raises(QuotaExceeded):
        await quotas.admit(ALICE)


async def test_a_visitor_refused_by_its_address_keeps_its_turns_in_memory_and_one_less_on_redis(
    tmp_path: Path, clock: time_machine.Traveller, limiter: RateLimiter
) -> None:
    quotas = Quotas(
        settings(tmp_path, visitor_turns_per_hour=2, address_turns_per_hour=2),
        limiter,
        Ledger().since,
    )
    await quotas.admit(ALICE)
    await quotas.admit(ALICE)
    clock.shift(1800)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(BOB)
    assert "Your network has sent" in refused.value.message
    clock.shift(HOUR - 1800 + 1)  # Alice's two turns leave the address's window.
    await quotas.admit(BOB)
    if limiter.remote:
        # Redis asks each rate once, side by side: the refused message kept its own hit.
        with pytest.raises(QuotaExceeded) as refused:
            await quotas.admit(BOB)
        assert "You have sent the most messages allowed in an hour (2)" in refused.value.message
    else:
        await quotas.admit(BOB)


async def test_a_registered_reader_has_a_daily_rate_of_their_own(
    tmp_path: Path, clock: time_machine.Traveller, limiter: RateLimiter
) -> None:
    quotas = Quotas(settings(tmp_path, user_turns_per_day=2), limiter, Ledger().since)
    await quotas.admit(DAN)
    await quotas.admit(DAN)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(DAN)
    assert refused.value.retry_after == pytest.approx(DAY, abs=1)
    clock.shift(DAY + 1)
    await quotas.admit(DAN)


async def test_a_token_budget_counts_saved_usage_and_frees_up_as_old_answers_leave_the_day(
    tmp_path: Path, clock: time_machine.Traveller
) -> None:
    ledger = Ledger()
    now = 1_800_000_000.0
    ledger.add("visitor", "alice", now - DAY + 600, 700)  # leaves the window in 10 minutes
    ledger.add("visitor", "alice", now - 60, 250)
    quotas = Quotas(settings(tmp_path, visitor_tokens_per_day=1000), RateLimiter(), ledger.since)
    await quotas.admit(ALICE)  # 950 < 1000
    quotas.spent(ALICE, 100)  # this instance's own turn counts at once
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(ALICE)
    assert refused.value.code == "budget_exceeded"
    assert refused.value.retry_after == pytest.approx(600, abs=1)
    assert "used up today's share" in refused.value.message
    assert ledger.reads == 2  # one per budget key (visitor, address), then from memory
    clock.shift(601)
    await quotas.admit(ALICE)


async def test_the_address_budget_is_shared_and_only_anonymous_readers_count_against_it(
    tmp_path: Path, clock: time_machine.Traveller
) -> None:
    ledger = Ledger()
    ledger.add("address", ALICE.address, 1_800_000_000.0 - 10, 5000)
    quotas = Quotas(settings(tmp_path, address_tokens_per_day=5000), RateLimiter(), ledger.since)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(BOB)
    assert "Your network has used up" in refused.value.message
    await quotas.admit(DAN)  # signed in: their own budget only


async def test_an_addresss_turns_refusal_is_exact_and_frees_up_as_the_window_moves(
    tmp_path: Path, clock: time_machine.Traveller, limiter: RateLimiter
) -> None:
    quotas = Quotas(
        settings(tmp_path, visitor_turns_per_hour=10, address_turns_per_hour=2),
        limiter,
        Ledger().since,
    )
    await quotas.admit(ALICE)
    clock.shift(300)
    await quotas.admit(BOB)
    eve = Who("eve", ALICE.address, anonymous=True)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(eve)
    assert refused.value.code == "rate_limited"
    # Alice's turn leaves the address's window an hour after it was counted.
    assert refused.value.retry_after == pytest.approx(HOUR - 300, abs=1)
    assert "Your network has sent" in refused.value.message
    clock.shift(HOUR - 300 + 1)
    await quotas.admit(eve)


async def test_an_addresss_token_budget_refusal_is_exact_and_frees_up_as_old_usage_leaves_the_day(
    tmp_path: Path, clock: time_machine.Traveller
) -> None:
    ledger = Ledger()
    now = 1_800_000_000.0
    ledger.add("address", ALICE.address, now - DAY + 900, 3000)  # leaves in 15 minutes
    ledger.add("address", ALICE.address, now - 60, 2000)
    quotas = Quotas(settings(tmp_path, address_tokens_per_day=5000), RateLimiter(), ledger.since)
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(BOB)
    assert refused.value.code == "budget_exceeded"
    assert refused.value.retry_after == pytest.approx(900, abs=1)
    clock.shift(901)
    await quotas.admit(BOB)


async def test_a_registered_readers_token_budget_is_their_own_exact_and_frees_up(
    tmp_path: Path, clock: time_machine.Traveller
) -> None:
    ledger = Ledger()
    now = 1_800_000_000.0
    # Signed in, the reader's usage counts under their own id, and the address's does not.
    ledger.add("visitor", DAN.visitor, now - DAY + 1200, 1500)  # leaves in 20 minutes
    ledger.add("visitor", DAN.visitor, now - 30, 600)
    ledger.add("address", DAN.address, now - 30, 10_000_000)
    quotas = Quotas(
        settings(tmp_path, user_tokens_per_day=2000, address_tokens_per_day=1000),
        RateLimiter(),
        ledger.since,
    )
    with pytest.raises(QuotaExceeded) as refused:
        await quotas.admit(DAN)
    assert refused.value.code == "budget_exceeded"
    assert refused.value.retry_after == pytest.approx(1200, abs=1)
    clock.shift(1201)
    await quotas.admit(DAN)  # 600 < 2000
    quotas.spent(DAN, 1400)
    with pytest.raises(QuotaExceeded):
        await quotas.admit(DAN)


async def test_the_gate_runs_each_visitors_turns_one_at_a_time_and_others_go_ahead(
    tmp_path: Path,
) -> None:
    gate = TurnGate(settings(tmp_path), capacity=None)
    places: list[int] = []
    first = asyncio.Event()
    done = asyncio.Event()

    async def alice_first() -> None:
        async with gate.turn(ALICE, wait=10, on_place=places.append):
            first.set()
            await done.wait()

    running = asyncio.create_task(alice_first())
    await first.wait()
    second_entered = asyncio.Event()

    async def alice_second() -> None:
        async with gate.turn(ALICE, wait=10, on_place=places.append):
            second_entered.set()

    waiting = asyncio.create_task(alice_second())
    await asyncio.sleep(0)
    assert (gate.running, gate.waiting, places) == (1, 1, [1])
    # Carol, behind Alice's waiting turn, goes ahead: her own caps are free.
    async with gate.turn(CAROL, wait=10, on_place=places.append):
        assert gate.running == 2
    assert not second_entered.is_set()
    done.set()
    await asyncio.gather(running, waiting)
    assert second_entered.is_set()
    assert (gate.running, gate.waiting) == (0, 0)


async def test_the_gate_caps_an_addresss_and_a_registered_readers_running_turns(
    tmp_path: Path,
) -> None:
    gate = TurnGate(
        settings(tmp_path, visitor_running_turns=5, address_running_turns=2, user_running_turns=1),
        capacity=None,
    )
    places: list[int] = []
    eve = Who("eve", ALICE.address, anonymous=True)
    dan_again = asyncio.Event()
    eve_in = asyncio.Event()
    at_once: list[int] = []
    async with (
        gate.turn(ALICE, wait=10, on_place=at_once.append),
        gate.turn(BOB, wait=10, on_place=at_once.append),
        gate.turn(DAN, wait=10, on_place=at_once.append),
    ):
        # A third anonymous cookie at the address waits (its address runs 2); so does Dan's
        # second turn (a signed-in reader runs 1, whatever the address runs).

        async def eve_turn() -> None:
            async with gate.turn(eve, wait=10, on_place=places.append):
                eve_in.set()

        async def dan_turn() -> None:
            async with gate.turn(DAN, wait=10, on_place=places.append):
                dan_again.set()

        waiting = [asyncio.create_task(eve_turn()), asyncio.create_task(dan_turn())]
        await asyncio.sleep(0)
        assert (gate.running, gate.waiting, places) == (3, 2, [1, 2])
        assert not eve_in.is_set()
        assert not dan_again.is_set()
        # Elsewhere, a reader runs at once.
        async with gate.turn(CAROL, wait=10, on_place=at_once.append):
            assert gate.running == 4
    await asyncio.gather(*waiting)
    assert eve_in.is_set()
    assert dan_again.is_set()
    assert at_once == []
    assert (gate.running, gate.waiting) == (0, 0)


async def test_the_gate_holds_the_engines_capacity_and_a_long_wait_ends_with_gate_timeout(
    tmp_path: Path,
) -> None:
    gate = TurnGate(settings(tmp_path), capacity=1)
    release = asyncio.Event()
    inside = asyncio.Event()

    async def hold() -> None:
        async with gate.turn(CAROL, wait=10, on_place=lambda place: None):
            inside.set()
            await release.wait()

    holder = asyncio.create_task(hold())
    await inside.wait()
    places: list[int] = []
    with pytest.raises(GateTimeout):
        async with gate.turn(DAN, wait=0.01, on_place=places.append):
            pytest.fail("no room was free")
    assert places == [1]
    assert gate.waiting == 0
    release.set()
    await holder
    async with gate.turn(DAN, wait=1, on_place=places.append):
        assert gate.running == 1


async def test_connections_are_capped_per_visitor_and_per_address(tmp_path: Path) -> None:
    connections = Connections(settings(tmp_path, visitor_connections=2, address_connections=3))
    first = await connections.open("alice", "a")
    assert first is not None
    assert await connections.open("alice", "a")
    assert not await connections.open("alice", "a")
    assert await connections.open("bob", "a")
    assert not await connections.open("carol", "a")
    assert await connections.open("carol", "b")
    await connections.close(first)
    assert await connections.open("carol", "a")
