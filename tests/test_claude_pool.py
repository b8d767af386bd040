"""The pool of agent processes (engines/claude/pool.py), in process, with stand-in processes
that start and close when a test lets them: the cap, reclaiming the least recently used
idle process, waiting for room, spares, starting a chat's process ahead, the idle sweep
and shutdown. tests/test_claude_engine.py covers the same rules with real CLI processes.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable

import pytest

from blogchat.engines.claude.pool import ProcessPool, StartFailed
from blogchat.engines.claude.process import AgentSpec, ProcessState
from tests.support.scripted import Member

IDLE_SECONDS = 3600.0


def spec(chat_id: str, model_id: str = "claude-haiku-4-5") -> AgentSpec:
    """What a chat's process is started with."""
    return AgentSpec(chat_id, model_id, "You help readers.", ("searchBlogContent",))


class Launches:
    """The pool's launcher: every process it asked for, by chat, in order."""

    def __init__(self) -> None:
        self.members: list[Member] = []
        self.gated_starts = False

    def __call__(self, wanted: AgentSpec) -> Member:
        member = Member(wanted)
        if self.gated_starts:
            member.may_start.clear()
        self.members.append(member)
        return member

    def of(self, chat_id: str) -> list[Member]:
        """The processes launched for a chat, oldest first."""
        return [member for member in self.members if member.spec.chat_id == chat_id]


_spare_ids = (f"spare-{n}" for n in itertools.count(1))


def spare_spec() -> AgentSpec:
    """A spare's spec: the default persona, under a fresh id."""
    return spec(next(_spare_ids))


async def run_ready_tasks() -> None:
    """Let every task that can make progress run until it waits (no time passes)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool]) -> None:
    """Run ready tasks until `condition` holds."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


@pytest.fixture
def launches() -> Launches:
    """Records the processes the pool launches."""
    return Launches()


@pytest.fixture
async def make_pool(launches: Launches) -> AsyncIterator[Callable[..., ProcessPool[Member]]]:
    """Pools over stand-in processes; each is shut down after the test."""
    pools: list[ProcessPool[Member]] = []

    def make(
        cap: int = 4, *, spares: int = 0, parallel_starts: int = 4, spare_hold: float = 3600.0
    ) -> ProcessPool[Member]:
        pool = ProcessPool(
            launches,
            cap=cap,
            idle_seconds=IDLE_SECONDS,
            parallel_starts=parallel_starts,
            spares=spares,
            spare_spec=spare_spec if spares else None,
            spare_hold=spare_hold,
        )
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        for member in launches.members:
            member.may_start.set()
            member.may_close.set()
        await pool.aclose(grace=1.0)


async def turn(pool: ProcessPool[Member], chat_id: str) -> Member:
    """A chat takes its process for a turn and gives it back."""
    process = await pool.acquire(spec(chat_id))
    await pool.give_back(process)
    return process


async def test_a_chat_keeps_its_process_from_one_turn_to_the_next(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool()
    process = await pool.acquire(spec("a"))
    states = [process.state]
    await pool.give_back(process)
    states.append(process.state)

    assert states == [ProcessState.BUSY, ProcessState.IDLE]
    assert process.alive

    assert await pool.acquire(spec("a")) is process
    assert launches.of("a") == [process]
    assert pool.started == 1


async def test_a_new_model_replaces_the_chats_process(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool()
    first = await turn(pool, "a")
    second = await pool.acquire(spec("a", model_id="claude-sonnet-4-5"))

    assert second is not first
    assert first.closed.is_set()
    assert launches.of("a") == [first, second]


async def test_the_cap_holds_and_the_least_recently_used_idle_process_makes_room(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool(cap=2)
    a = await turn(pool, "a")
    b = await turn(pool, "b")
    a.may_close.clear()
    needs_room = asyncio.create_task(pool.acquire(spec("c")))
    await run_ready_tasks()

    # The least recently used process is closing, and nothing starts until it is gone.
    assert a.state is ProcessState.CLOSING
    assert b.state is ProcessState.IDLE
    assert launches.of("c") == []
    assert pool.live == 2
    a.may_close.set()
    c = await needs_room
    assert a.closed.is_set()
    assert pool.get("b") is b
    assert pool.get("c") is c
    assert pool.peak == 2


async def test_a_process_running_a_turn_is_never_reclaimed_and_the_chat_waits_for_one(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool(cap=1)
    a = await pool.acquire(spec("a"))
    waiting = asyncio.create_task(pool.acquire(spec("b")))
    await run_ready_tasks()

    assert not waiting.done()
    assert a.state is ProcessState.BUSY
    assert not a.retire
    await pool.give_back(a)
    b = await waiting
    assert a.closed.is_set()
    assert launches.of("b") == [b]
    assert pool.peak == 1


async def test_a_chats_new_process_starts_only_once_its_old_one_is_gone(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool()
    old = await turn(pool, "a")
    old.may_close.clear()
    await pool.discard(old)
    acquiring = asyncio.create_task(pool.acquire(spec("a")))
    await run_ready_tasks()

    # The closing process may still be writing the transcript the new one resumes.
    assert not acquiring.done()
    assert launches.of("a") == [old]
    old.may_close.set()
    new = await acquiring
    assert new is not old
    assert old.closed.is_set()


async def test_no_more_processes_start_at_once_than_allowed(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool(parallel_starts=1)
    launches.gated_starts = True
    first = asyncio.create_task(pool.acquire(spec("a")))
    second = asyncio.create_task(pool.acquire(spec("b")))
    await until(lambda: len(launches.members) == 2)
    await run_ready_tasks()

    a, b = launches.members
    assert a.starting.is_set()
    assert not b.starting.is_set()
    a.may_start.set()
    assert await first is a
    await until(b.starting.is_set)
    b.may_start.set()
    assert await second is b


async def test_a_start_that_fails_fails_the_turns_acquire_and_frees_its_room(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool()
    launches.gated_starts = True
    acquiring = asyncio.create_task(pool.acquire(spec("a")))
    await until(lambda: bool(launches.members))
    (a,) = launches.members
    a.fail_start = RuntimeError("the CLI would not start")
    a.may_start.set()

    with pytest.raises(StartFailed, match="would not start"):
        await acquiring
    await until(lambda: pool.live == 0)
    assert pool.get("a") is None


async def test_a_cut_off_turns_process_is_recovered_in_the_background_or_closed(
    make_pool: Callable[..., ProcessPool[Member]],
) -> None:
    pool = make_pool()
    lost: list[Member] = []
    healthy = await pool.acquire(spec("a"))
    pool.recover(healthy, 0.5, on_lost=lost.append)
    await until(lambda: healthy.state is ProcessState.IDLE)

    hung = await pool.acquire(spec("b"))
    hung.settles = False
    pool.recover(hung, 0.5, on_lost=lost.append)
    await until(hung.closed.is_set)
    assert lost == [hung]
    assert pool.get("a") is healthy


async def test_forgetting_a_chat_closes_its_process_once_its_turn_is_over(
    make_pool: Callable[..., ProcessPool[Member]],
) -> None:
    pool = make_pool()
    idle = await turn(pool, "a")
    busy = await pool.acquire(spec("b"))
    await pool.forget("a")
    await pool.forget("b")
    await until(idle.closed.is_set)

    assert busy.state is ProcessState.BUSY
    await pool.give_back(busy)
    await until(busy.closed.is_set)
    assert pool.live == 0


async def test_the_idle_sweep_closes_processes_idle_too_long_but_no_spare_nor_a_running_turn(
    make_pool: Callable[..., ProcessPool[Member]],
) -> None:
    pool = make_pool(cap=4, spares=1)
    pool.start_spares()
    await until(lambda: pool.spare_count == 1 and pool.live == 1)
    (spare,) = pool.processes()
    await until(spare.started.is_set)
    idle = await turn(pool, "a")
    recent = await turn(pool, "b")
    busy = await pool.acquire(spec("c"))
    for process in (spare, idle, busy):
        process.last_used -= 2 * IDLE_SECONDS

    assert await pool.sweep() == 1
    await until(idle.closed.is_set)
    assert not spare.closed.is_set()
    assert not recent.closed.is_set()
    assert busy.state is ProcessState.BUSY
    # A spare that died while it waited is closed, and another takes its place.
    spare.alive = False
    assert await pool.sweep() == 1
    await until(spare.closed.is_set)
    await until(lambda: pool.spare_count == 1)


async def test_spares_only_use_free_room_and_go_first_when_a_chat_needs_it(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool(cap=2, spares=1)
    pool.start_spares()
    await until(lambda: pool.spare_count == 1)
    (spare,) = launches.members
    a = await pool.acquire(spec("a"))
    await until(spare.started.is_set)
    assert pool.live == 2

    b = await pool.acquire(spec("b"))
    # The spare made room, and none is started again while the cap is full of chats.
    assert spare.closed.is_set()
    assert {pool.get("a"), pool.get("b")} == {a, b}
    await run_ready_tasks()
    assert pool.spare_count == 0
    assert pool.peak == 2


async def test_a_new_chat_takes_a_spare_that_fits_and_another_spare_is_started(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool(cap=3, spares=1)
    pool.start_spares()
    await until(lambda: pool.spare_count == 1)
    (spare,) = launches.members

    assert pool.claim_spare(lambda candidate: candidate.model_id == "claude-opus-4-1") is None
    chat_id = pool.claim_spare(lambda candidate: True)
    assert chat_id == spare.spec.chat_id
    assert not spare.spare
    # The chat's first turn runs on the spare's process, with no other start beside it.
    assert await pool.acquire(spare.spec) is spare
    await run_ready_tasks()
    assert pool.spare_count == 0
    assert len(launches.members) == 1
    # Once that turn is over, another spare takes its place.
    await pool.give_back(spare)
    await until(lambda: pool.spare_count == 1)
    assert len(launches.members) == 2


async def test_a_taken_spares_replacement_starts_when_the_hold_runs_out_even_mid_turn(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    pool = make_pool(cap=3, spares=1, spare_hold=0.0)
    pool.start_spares()
    await until(lambda: pool.spare_count == 1)
    (spare,) = launches.members
    chat_id = pool.claim_spare(lambda candidate: True)
    assert chat_id is not None
    await pool.acquire(spare.spec)
    # The first turn is still running; the hold is over, so the replacement starts.
    await until(lambda: pool.spare_count == 1)
    assert len(launches.members) == 2
    assert spare.state is ProcessState.BUSY


async def test_a_chats_process_is_started_ahead_only_in_free_room(
    make_pool: Callable[..., ProcessPool[Member]], launches: Launches
) -> None:
    full = make_pool(cap=1)
    await turn(full, "a")
    assert not full.prestart(spec("b"))
    assert launches.of("b") == []
    assert full.get("a") is not None

    roomy = make_pool(cap=3)
    assert roomy.prestart(spec("c"))
    assert not roomy.prestart(spec("c"))
    (c,) = launches.of("c")
    assert await roomy.acquire(spec("c")) is c
    assert roomy.started == 1


async def test_shutdown_closes_every_process_and_kills_those_that_hang(
    make_pool: Callable[..., ProcessPool[Member]],
) -> None:
    pool = make_pool()
    idle = await turn(pool, "a")
    busy = await pool.acquire(spec("b"))
    busy.may_close.clear()
    await pool.aclose(grace=0.01)

    assert idle.closed.is_set()
    assert not idle.killed
    assert busy.killed
    assert busy.closed.is_set()
    assert pool.live == 0
    with pytest.raises(StartFailed, match="shut down"):
        await pool.acquire(spec("c"))
